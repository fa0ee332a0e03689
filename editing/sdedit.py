"""SDEdit image-to-image (Meng et al., ICLR 2022): noise the input latent to the grid point that
the strength selects, as diffusers' img2img does, then sample the rest of the grid.

``img2img`` is the one partial-trajectory entry point: inpainting is the same call with a
per-step callback, and Imagic's stage C is the same call at strength 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from baselines import models
from baselines.errors import ConfigError
from baselines.guidance import CFGDenoiser, UNetDenoiser, encode_text, is_guidance_conditioned
from baselines.samplers import resolve_defaults, unet_evaluations
from baselines.timing import Timer
from baselines.train import stage_device
from editing.common import (
    EditSource,
    StepCallback,
    check_seeds,
    check_strengths,
    ddim_partial,
    decode_latents,
    draw_noise,
    edit_row,
    encode_image,
    final_alpha_cumprod_of,
    model_resolution,
    preflight,
    resolve_inputs,
    save_image,
    start_index,
    timestep_grid,
    write_rows,
)


def make_denoiser(pipe, guidance_scale: float, negative_prompt: str = "") -> tuple[torch.nn.Module, dict]:
    """The pipeline's denoiser and its call kwargs: CFG-wrapped for a teacher (s > 1), fed the
    scale directly for a guidance-conditioned student."""
    base = UNetDenoiser.from_pipeline(pipe)
    if is_guidance_conditioned(pipe.unet):
        return base, {"guidance_scale": guidance_scale}
    if guidance_scale > 1:
        uncond = encode_text(pipe.tokenizer, pipe.text_encoder, [negative_prompt])
        return CFGDenoiser(base, uncond, guidance_scale), {}
    return base, {}


def edit_nfe(pipe, *, steps: int, strength: float, guidance_scale: float) -> int:
    """U-Net evaluations per image of an edit that runs ``int(steps * strength)`` grid steps."""
    run = len(range(start_index(steps, strength), steps))
    if run == 0:
        return 0
    return unet_evaluations(
        sampler="ddim",
        steps=run,
        guidance_scale=guidance_scale,
        guidance_conditioned=is_guidance_conditioned(pipe.unet),
    )


@torch.no_grad()
def img2img(
    pipe,
    latents: Tensor,
    text: Tensor,
    *,
    strength: float,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    callback: StepCallback | None = None,
    noise: Tensor | None = None,
    pure_noise: bool = False,
) -> Tensor:
    """Edited latents: ``latents`` noised to grid point ``start_index(steps, strength)`` with one
    generator per image (``seeds[i]``), then DDIM over the rest of the pipeline's grid. ``pure_noise``:
    at strength 1 begin from the noise alone (``ddim_partial``)."""
    check_strengths([strength], steps)
    check_seeds(seeds, latents.shape[0])
    grid = timestep_grid(pipe.scheduler.config, steps)
    start = start_index(steps, strength)
    if noise is None:
        noise = draw_noise(tuple(latents.shape[1:]), seeds)
    denoiser, kwargs = make_denoiser(pipe, guidance_scale)
    return ddim_partial(
        denoiser,
        alphas_cumprod=pipe.scheduler.alphas_cumprod,
        final_alpha_cumprod=final_alpha_cumprod_of(pipe),
        x0=latents,
        noise=noise,
        timesteps=grid,
        start=start,
        text=text.to(latents),
        callback=callback,
        pure_noise=pure_noise,
        **kwargs,
    )


def sdedit(
    pipe, pixels: Tensor, prompts: list[str], *, strength: float, steps: int, guidance_scale: float, seeds: list[int]
) -> Tensor:
    """SDEdit images (B,3,H,W) in [-1, 1] of input images in [-1, 1] towards ``prompts``."""
    latents = encode_image(pipe.vae, pixels)
    text = encode_text(pipe.tokenizer, pipe.text_encoder, prompts)
    out = img2img(pipe, latents, text, strength=strength, steps=steps, guidance_scale=guidance_scale, seeds=seeds)
    return decode_latents(pipe.vae, out)


@dataclass
class SDEditStage:
    """Image-to-image with a strength sweep on a user image or held-out shapes images."""

    kind: str = "sdedit"
    model: str = "shapes"
    source: EditSource = field(default_factory=EditSource)
    strengths: list[float] = field(default_factory=lambda: [0.5, 0.7])
    steps: int | None = None  # default: the model's recommended steps
    guidance_scale: float | None = None  # default: the model's recommended scale
    seed: int = 0


def run_sdedit(cfg: SDEditStage, out: Path, accelerator=None) -> list[dict]:
    """Edit every input at every strength; write PNGs and ``edits.jsonl``."""
    if not cfg.strengths:
        raise ConfigError("strengths is empty: give at least one strength in [0, 1]")
    for s in cfg.strengths:
        start_index(1, s)  # validates the range before anything is written
    preflight(cfg.source)
    pipe = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    steps, scale, _ = resolve_defaults(
        pipe, models.read_info(cfg.model), steps=cfg.steps, guidance_scale=cfg.guidance_scale, sampler="ddim"
    )
    check_strengths(cfg.strengths, steps)
    inputs = resolve_inputs(cfg.source, model_resolution(pipe))
    rows = []
    for k, item in enumerate(inputs):
        input_path = save_image(item.pixels, out / "inputs" / f"{item.name}.png")
        for strength in cfg.strengths:
            with Timer(pipe.device) as timer:
                image = sdedit(
                    pipe,
                    item.pixels[None],
                    [item.prompt],
                    strength=strength,
                    steps=steps,
                    guidance_scale=scale,
                    seeds=[cfg.seed + k],
                )[0]
            path = save_image(image, out / "edits" / f"{item.name}_strength{strength:g}.png")
            nfe = edit_nfe(pipe, steps=steps, strength=strength, guidance_scale=scale)
            rows.append(
                edit_row(
                    method="sdedit",
                    model=cfg.model,
                    item=item,
                    input_path=input_path,
                    output_path=path,
                    mask_path=None,
                    param={"strength": strength},
                    steps=steps,
                    guidance_scale=scale,
                    nfe=nfe,
                    seconds=timer.seconds,
                )
            )
    write_rows(out, rows)
    return rows
