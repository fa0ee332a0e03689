"""The one denoiser interface, and classifier-free guidance as a wrapper around it.

A denoiser is called as ``denoiser(z, t, text, parametrisation="x0")`` with latents z (B,C,H,W),
integer timesteps t (B,), text states (B,L,D), and returns its prediction expressed in the asked
parametrisation (eps, x0 or v), whatever the U-Net was trained to predict. The teacher, the
CFG-wrapped teacher, a w-conditioned student and a fine-tuned model are all called this way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines import diffusion


def get_guidance_scale_embedding(w: Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the guidance weight, exactly as ``StableDiffusionPipeline`` computes
    it (VDM appendix; the pipeline passes w = guidance_scale - 1)."""
    assert w.ndim == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def is_guidance_conditioned(unet) -> bool:
    """True for a guidance-distilled (w-conditioned) U-Net, i.e. one with ``time_cond_proj_dim``:
    the stock pipeline feeds it the guidance embedding and runs one pass per step, no CFG doubling."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


class UNetDenoiser(nn.Module):
    """Adapts a diffusers ``UNet2DConditionModel`` plus its scheduler's alphas to the interface.

    If the U-Net has ``time_cond_proj_dim`` (a guidance-distilled student), pass
    ``guidance_scale`` and it is fed as the pipeline would feed it.
    """

    def __init__(self, unet: nn.Module, scheduler_config: dict, alphas_cumprod: Tensor):
        super().__init__()
        self.unet = unet
        self.native = diffusion.parametrisation_of(scheduler_config["prediction_type"])
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().clone().float(), persistent=False)

    @classmethod
    def from_pipeline(cls, pipe) -> UNetDenoiser:
        """The denoiser of a ``StableDiffusionPipeline``'s U-Net and scheduler."""
        return cls(pipe.unet, dict(pipe.scheduler.config), pipe.scheduler.alphas_cumprod)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t at integer timesteps t."""
        return diffusion.alpha_sigma(alphas_cumprod=self.alphas_cumprod, t=t)

    def forward(
        self,
        z: Tensor,
        t: Tensor,
        text: Tensor,
        *,
        parametrisation: str = "x0",
        guidance_scale: Tensor | None = None,
    ) -> Tensor:
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        timestep_cond = None
        if is_guidance_conditioned(self.unet):
            proj_dim = self.unet.config.time_cond_proj_dim
            if guidance_scale is None:
                raise ValueError("this U-Net is guidance-conditioned: pass guidance_scale")
            # w = s - 1 in float64 then float32, as the pipeline computes it (float32 s - 1 is an ulp off at s = 1.2)
            w = (torch.as_tensor(guidance_scale, dtype=torch.float64).expand(z.shape[0]) - 1).float()
            timestep_cond = get_guidance_scale_embedding(w, proj_dim).to(z)
        out = self.unet(z, t, encoder_hidden_states=text, timestep_cond=timestep_cond).sample
        alpha, sigma = self.alpha_sigma(t)
        return diffusion.convert(z=z, pred=out, source=self.native, target=parametrisation, alpha=alpha, sigma=sigma)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around any denoiser, itself a denoiser:
    guided = uncond + s (cond - uncond) = (1 + w) cond - w uncond with w = s - 1.

    Guidance is linear in the prediction, so it is the same in every parametrisation. ``uncond``
    holds the negative-prompt (or empty-prompt) states; s may differ per sample.
    """

    def __init__(self, denoiser: nn.Module, uncond: Tensor, guidance_scale: float | Tensor):
        super().__init__()
        self.denoiser = denoiser
        self.uncond = uncond
        self.guidance_scale = guidance_scale

    def forward(self, z: Tensor, t: Tensor, text: Tensor, *, parametrisation: str = "x0", **kwargs) -> Tensor:
        s = torch.as_tensor(self.guidance_scale, dtype=z.dtype, device=z.device).expand(z.shape[0])
        uncond = self.uncond.expand(z.shape[0], *self.uncond.shape[1:]) if self.uncond.shape[0] == 1 else self.uncond
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        both = self.denoiser(
            torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, text]), parametrisation=parametrisation, **kwargs
        )
        pred_uncond, pred_cond = both.chunk(2)
        return pred_uncond + s.reshape(-1, *([1] * (z.ndim - 1))) * (pred_cond - pred_uncond)


def text_batch(tokenizer, prompts: list[str]):
    """Token ids and attention mask padded/truncated to ``model_max_length``, as the Stable Diffusion
    pipeline tokenizes."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


def tokenize(tokenizer, prompts: list[str]) -> Tensor:
    """Token ids padded/truncated to ``model_max_length``, as the Stable Diffusion pipeline does."""
    return text_batch(tokenizer, prompts).input_ids


def encode_tokens(text_encoder: nn.Module, batch, rows: Tensor | None = None) -> Tensor:
    """Last hidden states of a ``text_batch`` (of its ``rows`` when given); the attention mask only where
    the encoder's config asks for it, as ``StableDiffusionPipeline.encode_prompt`` does."""
    device = next(text_encoder.parameters()).device
    ids, mask = batch.input_ids, batch.attention_mask
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    mask = mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(ids.to(device), attention_mask=mask)[0]


@torch.no_grad()
def encode_text(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
    """Text states exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (padded to
    ``model_max_length``, last hidden state; no clip_skip or LoRA scale)."""
    return encode_tokens(text_encoder, text_batch(tokenizer, prompts))
