"""Training-free samplers by name, and the one sampling entry point.

Every image fewstep generates goes through ``generate``: the stock ``StableDiffusionPipeline``
with the chosen diffusers scheduler and one ``torch.Generator`` per image (seed ``seeds[i]``),
so image i is the same whatever the batch size (EDM's per-sample seeding).
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from baselines import diffusion, models
from baselines.data import to_uint8
from baselines.errors import FewstepError
from baselines.guidance import encode_tokens, is_guidance_conditioned, text_batch
from baselines.train import process_group

SAMPLERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
# the parametrisations a sampler's diffusers scheduler can step (the others also take "sample", an x0 model)
PREDICTION_TYPES = {"euler-a": ("epsilon", "v_prediction"), "pndm": ("epsilon", "v_prediction")}


def image_seeds(seed: int, indices) -> list[int]:
    """The per-image seeds of item ``indices`` in a run with ``seed``: seed * 1_000_003 + i (0, 1, 2, ... at seed
    0), so a run with another seed draws other noise for every item."""
    return [seed * 1_000_003 + int(i) for i in indices]


@torch.no_grad()
def ddim_step_with(predict_x0, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, alpha_sigma) -> torch.Tensor:
    """One deterministic DDIM step z_t -> z_{t_prev} (Song et al. 2021, eq. 12) with a model's x0
    prediction ``predict_x0(z, t)``; ``alpha_sigma(t)`` gives (alpha_t, sigma_t), t_prev = -1 being
    "after the last step". Progressive distillation's teacher steps and the editing sampler both use it."""
    alpha, sigma = alpha_sigma(t)
    alpha_prev, sigma_prev = alpha_sigma(t_prev)
    x0 = predict_x0(z, t)
    eps = diffusion.eps_from_x0(z=z, x0=x0, alpha=alpha, sigma=sigma)
    return diffusion.ddim_step(x0=x0, eps=eps, alpha_prev=alpha_prev, sigma_prev=sigma_prev)


SPACINGS = ("leading", "linspace", "trailing")


def make_scheduler(name: str, base_config: dict, *, timestep_spacing: str | None = None):
    """A diffusers scheduler by sampler name, configured from a pipeline's scheduler config as diffusers'
    ``X.from_config(pipe.scheduler.config)`` does: the values written in the config (training schedule,
    prediction type, spacing when written) carry over; those the base scheduler took from its own class defaults
    do not (``_use_default_values``), so an SD-1.x folder (a PNDM config without ``timestep_spacing``) samples
    DDIM on its "leading" grid but DPM-Solver++, UniPC and Euler on "linspace", as published SD-1.x numbers
    were made. ``timestep_spacing`` puts any sampler on one grid (e.g. "trailing": "leading" starts 1-step
    DDIM at t = 1). Heun, PNDM and LMS have no ``rescale_betas_zero_snr`` option and would silently run a
    zero-terminal-SNR model on the unrescaled schedule; they get the trained schedule as ``trained_betas``."""
    if name not in SAMPLERS:
        raise FewstepError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    prediction = base_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES.get(name, (prediction,)):
        raise FewstepError(
            f"the {name} sampler cannot step a {prediction!r}-prediction model; use ddim, dpmpp-2m or unipc"
        )
    if timestep_spacing is not None:
        if timestep_spacing not in SPACINGS:
            raise FewstepError(f"timestep spacing {timestep_spacing!r}: choose one of {list(SPACINGS)}")
        extra = {**extra, "timestep_spacing": timestep_spacing}  # a keyword: also past _use_default_values
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        extra = {**extra, "trained_betas": zero_terminal_snr_betas(base_config)}  # from_config drops it from a config
    return cls.from_config(dict(base_config), **extra)


def zero_terminal_snr_betas(scheduler_config: dict) -> list[float]:
    """The betas of a zero-terminal-SNR training schedule with alpha_bar_T = 2**-24 instead of 0, as
    diffusers' Euler and DPM-Solver schedulers hold it (a zero makes sigma_T infinite)."""
    alphas_cumprod = DDIMScheduler.from_config(dict(scheduler_config)).alphas_cumprod.double()
    alphas_cumprod[-1] = 2.0**-24
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()


def unet_evaluations(*, sampler: str, steps: int, guidance_scale: float, guidance_conditioned: bool = False) -> int:
    """U-Net evaluations per image, one per entry of the scheduler's timesteps: Heun's 2nd-order steps
    cost two (not the last one); PNDM (PLMS) repeats a timestep once when steps > 1; CFG doubles."""
    if sampler == "heun":
        per_step = 2 * steps - 1
    elif sampler == "pndm":
        per_step = steps + 1 if steps > 1 else steps
    else:
        per_step = steps
    cfg = guidance_scale > 1 and not guidance_conditioned
    return per_step * (2 if cfg else 1)


def recommended_guidance_scale(info: dict) -> float:
    """The guidance scale a model's ``fewstep.json`` recommends; StableDiffusionPipeline's default (7.5) when it
    recommends none."""
    return info.get("recommended", {}).get("guidance_scale", 7.5)


def resolve_defaults(pipe, info: dict, *, steps: int | None, guidance_scale: float | None, sampler: str | None):
    """Fill unset steps / guidance / sampler from the model's ``fewstep.json`` recommendations."""
    rec = info.get("recommended", {})
    steps = steps if steps is not None else rec.get("num_inference_steps", 50)
    guidance_scale = guidance_scale if guidance_scale is not None else recommended_guidance_scale(info)
    sampler = sampler if sampler is not None else rec.get("sampler", "ddim")
    most = pipe.scheduler.config.num_train_timesteps
    if not 1 <= steps <= most:
        raise FewstepError(f"steps must be in [1, {most}] (the model's training timesteps), got {steps}")
    return steps, guidance_scale, sampler


def has_multi_vector_tokens(tokenizer) -> bool:
    """Whether a textual-inversion embedding of several vectors is loaded (tokens ``<t>``, ``<t>_1``, ...):
    only then does diffusers' ``maybe_convert_prompt`` change a prompt."""
    added = tokenizer.added_tokens_encoder
    return any(f"{token}_1" in added for token in added)


@torch.no_grad()
def prompt_states(pipe, prompts: list[str]) -> torch.Tensor:
    """The pipeline's text states for ``prompts``, each distinct prompt of the call encoded once.

    The same states ``pipe.encode_prompt`` computes (multi-vector textual-inversion tokens expanded
    first), without re-encoding repeats: the empty negative prompt of a CFG batch, or one prompt sampled
    under many seeds. Warns, as the pipeline does, when a prompt is longer than the text encoder reads.
    """
    distinct = list(dict.fromkeys(prompts))
    texts = distinct
    if hasattr(pipe, "maybe_convert_prompt") and has_multi_vector_tokens(pipe.tokenizer):
        texts = pipe.maybe_convert_prompt(distinct, pipe.tokenizer)
    batch = text_batch(pipe.tokenizer, texts)
    limit = pipe.tokenizer.model_max_length
    full = [text for text, used in zip(texts, batch.attention_mask.sum(1).tolist()) if used == limit]
    for text, ids in zip(full, pipe.tokenizer(full).input_ids if full else []):  # only full rows can be cut
        if len(ids) > limit:
            warnings.warn(f"{text!r} is {len(ids)} tokens; the text encoder reads the first {limit}", stacklevel=3)
    states = encode_tokens(pipe.text_encoder, batch)
    position = {p: i for i, p in enumerate(distinct)}
    return states[torch.tensor([position[p] for p in prompts])]


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    *,
    seeds: list[int],
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    latents: bool = False,
    timestep_spacing: str | None = None,
) -> torch.Tensor:
    """Images (N,3,H,W) in [0,1] for ``prompts[i]`` with seed ``seeds[i]``; batching does not
    change image i. With ``latents``, the final (scaled) latents instead, without VAE decoding;
    ``timestep_spacing`` replaces the model's grid (see ``make_scheduler``)."""
    if len(prompts) != len(seeds):
        raise FewstepError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    if batch_size < 1:
        raise FewstepError(f"batch size must be >= 1, got {batch_size}")
    if not prompts:
        raise FewstepError("no prompts to sample")
    if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
        raise FewstepError(f"{len(prompts)} prompts but {len(negative_prompt)} negative prompts: give one per prompt")
    pipe.set_progress_bar_config(disable=True)
    negatives = (
        [negative_prompt] * len(prompts)
        if isinstance(negative_prompt, str) or negative_prompt is None
        else negative_prompt
    )
    cfg = guidance_scale > 1 and not is_guidance_conditioned(pipe.unet)
    own_scheduler = pipe.scheduler  # the pipeline keeps its own: a distilled student saves it
    pipe.scheduler = make_scheduler(sampler, own_scheduler.config, timestep_spacing=timestep_spacing)
    images = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="sample", disable=not progress):
            stop = min(len(prompts), start + batch_size)
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:stop]]
            neg = [n or "" for n in negatives[start:stop]]
            out = pipe(
                prompt_embeds=prompt_states(pipe, prompts[start:stop]),
                negative_prompt_embeds=prompt_states(pipe, neg) if cfg else None,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent" if latents else "pt",
            )
            images.append(out.images.cpu())
    finally:
        pipe.scheduler = own_scheduler
    return torch.cat(images)


def generate_split(pipe, prompts: list[str], seeds: list[int], **kwargs) -> torch.Tensor | None:
    """``generate`` split over the processes of a torchrun launch (image i on rank i % world, its own seed as
    always, so the result is the one process's) and gathered to rank 0, in order; the other ranks get None
    (a gather to every rank would hold every image on every GPU). One process: ``generate``."""
    rank, world = process_group()
    if world == 1:
        return generate(pipe, prompts, seeds=seeds, **kwargs)
    mine = list(range(rank, len(prompts), world))
    images = generate(pipe, [prompts[i] for i in mine], seeds=[seeds[i] for i in mine], **kwargs) if mine else None
    gathered: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object((mine, images), gathered, dst=0)
    if rank != 0:
        return None
    parts = [(idx, part) for idx, part in gathered if part is not None]
    out = torch.empty((len(prompts), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
    for idx, part in parts:
        out[idx] = part
    return out


def save_png(images: torch.Tensor, paths: list[Path]) -> None:
    """Write (N,3,H,W) images in [0,1] as PNGs."""
    for array, path in zip(to_uint8(images * 2 - 1), paths):
        Image.fromarray(array).save(path)


def sample_to_folder(
    model: str,
    *,
    prompt: str,
    out: str | Path,
    negative_prompt: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
    num_images: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """The ``fewstep sample`` verb: PNGs ``<seed>.png`` plus ``samples.json`` describing them; the model runs on
    ``device`` (the noise is drawn on the CPU, one generator per image, so a seed gives the same start anywhere)."""
    if num_images < 1:
        raise FewstepError(f"--num-images must be >= 1, got {num_images}")
    pipe = models.load_pipeline(model, device=device)
    steps, scale, sampler = resolve_defaults(
        pipe, models.read_info(model), steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler
    )
    seeds = [seed + i for i in range(num_images)]
    images = generate(
        pipe,
        [prompt] * num_images,
        seeds=seeds,
        sampler=sampler,
        num_inference_steps=steps,
        guidance_scale=scale,
        negative_prompt=negative_prompt,
        batch_size=batch_size,
        progress=num_images > batch_size,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{s:06d}.png" for s in seeds]
    save_png(images, paths)
    meta = {
        "model": str(model),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "sampler": sampler,
        "num_inference_steps": steps,
        "guidance_scale": scale,
        "seeds": seeds,
        "unet_evaluations_per_image": unet_evaluations(
            sampler=sampler,
            steps=steps,
            guidance_scale=scale,
            guidance_conditioned=is_guidance_conditioned(pipe.unet),
        ),
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    return paths
