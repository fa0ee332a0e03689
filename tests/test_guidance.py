import pytest
import torch

from baselines import diffusion as D
from baselines.guidance import CFGDenoiser, UNetDenoiser, encode_text, get_guidance_scale_embedding


def _inputs(pipe, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    z = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([10, 800][:n])
    text = encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle", "a blue square"][:n])
    return z, t, text


@torch.no_grad()
def test_denoiser_returns_any_parametrisation_consistently(tiny_pipe):
    den = UNetDenoiser.from_pipeline(tiny_pipe)
    z, t, text = _inputs(tiny_pipe)
    raw = tiny_pipe.unet(z, t, encoder_hidden_states=text).sample
    assert den.native == "v"
    torch.testing.assert_close(den(z, t, text, parametrisation="v"), raw)
    alpha, sigma = den.alpha_sigma(t)
    x0 = den(z, t, text, parametrisation="x0")
    torch.testing.assert_close(x0, D.x0_from_v(z=z, v=raw, alpha=alpha, sigma=sigma))
    eps = den(z, t, text, parametrisation="eps")
    torch.testing.assert_close(D.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma), z, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encode_text_matches_the_pipeline(tiny_pipe):
    prompts = ["a red circle", ""]
    ours = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, prompts)
    theirs, _ = tiny_pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)


@torch.no_grad()
def test_cfg_is_the_diffusers_combination(tiny_pipe):
    den = UNetDenoiser.from_pipeline(tiny_pipe)
    z, t, text = _inputs(tiny_pipe)
    uncond = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [""])
    s = 3.5
    guided = CFGDenoiser(den, uncond, s)(z, t, text, parametrisation="v")
    cond = den(z, t, text, parametrisation="v")
    unc = den(z, t, uncond.expand_as(text), parametrisation="v")
    torch.testing.assert_close(guided, unc + s * (cond - unc), atol=1e-5, rtol=1e-5)
    w = s - 1
    torch.testing.assert_close(guided, (1 + w) * cond - w * unc, atol=1e-5, rtol=1e-5)
    # guidance is linear: guiding in x0 space equals converting the guided v
    alpha, sigma = den.alpha_sigma(t)
    guided_x0 = CFGDenoiser(den, uncond, s)(z, t, text, parametrisation="x0")
    torch.testing.assert_close(guided_x0, D.x0_from_v(z=z, v=guided, alpha=alpha, sigma=sigma), atol=1e-5, rtol=1e-5)
    # s = 1 is the conditional model; per-sample scales are allowed
    torch.testing.assert_close(
        CFGDenoiser(den, uncond, 1.0)(z, t, text, parametrisation="v"), cond, atol=1e-5, rtol=1e-5
    )
    per = CFGDenoiser(den, uncond, torch.tensor([1.0, s]))(z, t, text, parametrisation="v")
    torch.testing.assert_close(per[1], guided[1], atol=1e-5, rtol=1e-5)


def test_guidance_embedding_matches_the_stock_pipeline(tiny_pipe):
    w = torch.tensor([0.0, 1.5, 6.5])
    ours = get_guidance_scale_embedding(w, 32)
    theirs = tiny_pipe.get_guidance_scale_embedding(w, embedding_dim=32)
    torch.testing.assert_close(ours, theirs)


def test_guidance_embedding_is_built_on_the_device_of_w():
    """A student on a GPU is fed the embedding of its own w: no CPU tensor meets it (checked on the meta
    device, which refuses to mix with the CPU as CUDA does)."""
    emb = get_guidance_scale_embedding(torch.tensor([2.0, 3.0], device="meta"), 8)
    assert emb.device.type == "meta" and emb.shape == (2, 8)


def test_denoising_loss_with_max_timestep_trains_only_at_low_noise():
    """``max_timestep`` bounds the drawn timesteps (inclusive) and nothing else changes."""
    from baselines.losses import denoising_loss, draw_timesteps

    t = draw_timesteps(4096, 1024, torch.Generator().manual_seed(0), max_timestep=100)
    assert t.min() == 0 and t.max() == 100
    assert torch.equal(
        draw_timesteps(64, 1024, torch.Generator().manual_seed(1)),
        torch.randint(0, 1024, (64,), generator=torch.Generator().manual_seed(1)),
    )

    recorder = _zero_denoiser("v", 1024)
    x0 = torch.randn(256, 4, 2, 2)
    denoising_loss(denoiser=recorder, x0=x0, text=None, generator=torch.Generator().manual_seed(0), max_timestep=7)
    assert int(recorder.seen[0].max()) <= 7


def _zero_denoiser(native: str, num_timesteps: int) -> torch.nn.Module:
    """A denoiser predicting zeros in ``native`` on a linear alpha-bar schedule that ends at 0 (zero terminal
    SNR); ``seen`` records the timesteps it was called with."""

    class Zero(torch.nn.Module):
        alphas_cumprod = torch.linspace(0.999, 0.0, num_timesteps)

        def alpha_sigma(self, t):
            a = self.alphas_cumprod[t]
            return a.sqrt(), (1 - a).sqrt()

        def forward(self, z, t, text, parametrisation):
            self.seen.append(t)
            return torch.zeros_like(z)

    denoiser = Zero()
    denoiser.native, denoiser.seen = native, []
    return denoiser


@pytest.mark.parametrize("native", ["eps", "x0", "v"])
def test_min_snr_weights_in_each_parametrisation_also_at_zero_terminal_snr(native):
    """Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for
    eps and min(SNR, gamma) / (SNR + 1) for v; at SNR = 0 (t = T - 1 here) the eps weight is its limit, 1."""
    from baselines.losses import denoising_loss

    denoiser, gamma = _zero_denoiser(native, 64), 5.0
    x0 = torch.randn(512, 4, 2, 2)

    def per_sample(snr_gamma):
        g = torch.Generator().manual_seed(0)
        return denoising_loss(denoiser=denoiser, x0=x0, text=None, generator=g, snr_gamma=snr_gamma, reduce=False)

    weighted, plain = per_sample(gamma), per_sample(None)
    t = denoiser.seen[0]
    assert torch.equal(t, denoiser.seen[1]) and (t == 63).any()
    a = denoiser.alphas_cumprod[t]
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.tensor(gamma))
    expected = {"eps": torch.where(snr > 0, clipped / snr, 1.0), "x0": clipped, "v": clipped / (snr + 1)}[native]
    assert torch.isfinite(weighted).all()
    torch.testing.assert_close(weighted, plain * expected)


def test_a_guidance_conditioned_denoiser_feeds_w_as_the_pipeline_computes_it(tiny_pipe):
    """w = s - 1 taken in float64 as the pipeline does (torch.tensor(s - 1)); in float32 it is an ulp off at
    s = 1.2 and the embedding differs by ~1e-4."""
    from baselines import models
    from baselines.guidance import UNetDenoiser

    torch.manual_seed(0)
    unet = models.build_unet(models.get_preset("tiny"), latent_channels=4, cross_attention_dim=16, time_cond_proj_dim=8)
    fed = []
    unet.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["timestep_cond"]), with_kwargs=True)
    denoiser = UNetDenoiser(unet, dict(tiny_pipe.scheduler.config), tiny_pipe.scheduler.alphas_cumprod)
    z, text = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16)
    denoiser(z, torch.tensor(500), text, guidance_scale=1.2)
    pipeline_w = torch.tensor(1.2 - 1).repeat(2)
    assert torch.equal(fed[0], tiny_pipe.get_guidance_scale_embedding(pipeline_w, embedding_dim=8))
    float32_w = torch.tensor(1.2, dtype=torch.float32).expand(2) - 1
    assert not torch.equal(fed[0], get_guidance_scale_embedding(float32_w, 8))  # the test can tell them apart
