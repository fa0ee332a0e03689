"""Inpainting with a plain text-to-image U-Net: after every sampler step the known region of the
latent is replaced by the original latent noised to the new time (the replacement method of
Song et al. 2021 / Lugmayr et al. 2022, with the same noise draw throughout), so the model only
invents the masked part. It is ``img2img`` with a per-step callback: no second sampling loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from baselines import diffusion, models
from baselines.errors import ConfigError
from baselines.guidance import encode_text
from baselines.samplers import resolve_defaults
from baselines.timing import Timer
from baselines.train import stage_device
from editing.common import (
    EditSource,
    check_seeds,
    check_strengths,
    decode_latents,
    draw_noise,
    edit_row,
    encode_image,
    latent_mask,
    load_mask,
    model_resolution,
    preflight,
    resolve_inputs,
    save_image,
    start_index,
    write_rows,
)
from editing.sdedit import edit_nfe, img2img


@torch.no_grad()
def inpaint_latents(
    pipe,
    latents: Tensor,
    keep: Tensor,
    text: Tensor,
    *,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    strength: float = 1.0,
) -> Tensor:
    """Inpainted latents: where ``keep`` (B,1,h,w) is 1 the latent is the original noised to the
    current time after every step, and after the last step it is exactly the original latent (also
    where the schedule's final alpha-bar is not 1, as with ``set_alpha_to_one=False``)."""
    check_seeds(seeds, latents.shape[0])
    noise = draw_noise(tuple(latents.shape[1:]), seeds).to(latents)
    acp = pipe.scheduler.alphas_cumprod

    def replace_known(z: Tensor, t_prev: Tensor) -> Tensor:
        # after the last step (t_prev = -1) the known region is the clean latent: alpha-bar 1, whatever the
        # schedule's own final alpha-bar
        alpha, sigma = diffusion.alpha_sigma(alphas_cumprod=acp, t=t_prev, final_alpha_cumprod=1.0)
        known = diffusion.diffuse(x0=latents, eps=noise, alpha=alpha, sigma=sigma)
        return keep * known + (1 - keep) * z

    return img2img(
        pipe,
        latents,
        text,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        seeds=seeds,
        callback=replace_known,
        noise=noise,
        pure_noise=True,  # at full strength the hole starts from noise alone, as diffusers' inpainting does
    )


@torch.no_grad()
def inpaint(
    pipe,
    pixels: Tensor,
    masks: Tensor,
    prompts: list[str],
    *,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    strength: float = 1.0,
    composite: bool = True,
) -> Tensor:
    """Inpainted images in [-1, 1]: ``masks`` (B,1,H,W), 1 = repaint. With ``composite`` the
    unmasked pixels of the input are pasted back, so the VAE round trip does not alter them."""
    if masks.shape[0] != pixels.shape[0] or masks.shape[-2:] != pixels.shape[-2:]:
        raise ConfigError(f"mask shape {tuple(masks.shape)} does not match the images {tuple(pixels.shape)}")
    latents = encode_image(pipe.vae, pixels)
    keep = 1 - latent_mask(masks.to(latents), latents.shape[-1])
    text = encode_text(pipe.tokenizer, pipe.text_encoder, prompts)
    out = inpaint_latents(
        pipe, latents, keep, text, steps=steps, guidance_scale=guidance_scale, seeds=seeds, strength=strength
    )
    images = decode_latents(pipe.vae, out)
    if composite:
        m = masks.to(images)
        images = m * images + (1 - m) * pixels.to(images)
    return images


def shape_mask(geometry: dict, resolution: int, margin: float) -> Tensor:
    """A (1,H,W) disc covering a shapes image's shape (radius ``margin`` x r; 1.4 covers the
    corners of squares and triangles)."""
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    x, y = np.meshgrid(grid, grid)
    inside = (x - geometry["cx"]) ** 2 + (y - geometry["cy"]) ** 2 <= (margin * geometry["r"]) ** 2
    return torch.from_numpy(inside).float()[None]


@dataclass
class InpaintStage:
    """Inpaint a user image under a mask, or re-paint the shape of held-out shapes images."""

    kind: str = "inpaint"
    model: str = "shapes"
    source: EditSource = field(default_factory=EditSource)
    mask: str | None = None  # required with source.image; white = repaint
    mask_margin: float = 1.4  # shapes inputs: mask radius as a multiple of the shape's radius
    strength: float = 1.0
    steps: int | None = None
    guidance_scale: float | None = None
    composite: bool = True
    seed: int = 0


def run_inpaint(cfg: InpaintStage, out: Path, accelerator=None) -> list[dict]:
    """Inpaint every input; write input, mask and output PNGs and ``edits.jsonl``."""
    start_index(1, cfg.strength)
    if cfg.source.image is not None and cfg.mask is None:
        raise ConfigError("inpainting a user image needs a mask (white = region to repaint)")
    preflight(cfg.source, cfg.mask)
    pipe = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    steps, scale, _ = resolve_defaults(
        pipe, models.read_info(cfg.model), steps=cfg.steps, guidance_scale=cfg.guidance_scale, sampler="ddim"
    )
    check_strengths([cfg.strength], steps)
    res = model_resolution(pipe)
    inputs = resolve_inputs(cfg.source, res)
    user_mask = load_mask(cfg.mask, cfg.source.image, res) if cfg.mask is not None else None
    rows = []
    for k, item in enumerate(inputs):
        mask = user_mask if user_mask is not None else shape_mask(item.geometry, res, cfg.mask_margin)
        input_path = save_image(item.pixels, out / "inputs" / f"{item.name}.png")
        mask_path = save_image(mask.expand(3, -1, -1) * 2 - 1, out / "masks" / f"{item.name}.png")
        with Timer(pipe.device) as timer:
            image = inpaint(
                pipe,
                item.pixels[None],
                mask[None],
                [item.prompt],
                steps=steps,
                guidance_scale=scale,
                seeds=[cfg.seed + k],
                strength=cfg.strength,
                composite=cfg.composite,
            )[0]
        path = save_image(image, out / "edits" / f"{item.name}.png")
        rows.append(
            edit_row(
                method="inpaint",
                model=cfg.model,
                item=item,
                input_path=input_path,
                output_path=path,
                mask_path=mask_path,
                param={"strength": cfg.strength},
                steps=steps,
                guidance_scale=scale,
                nfe=edit_nfe(pipe, steps=steps, strength=cfg.strength, guidance_scale=scale),
                seconds=timer.seconds,
            )
        )
    write_rows(out, rows)
    return rows
