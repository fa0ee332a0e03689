"""Build, save and load students: every student is a stock ``StableDiffusionPipeline`` folder.

A student's ``scheduler/`` is a ``DDIMScheduler`` on the "trailing" grid with the student's
``prediction_type`` and ``set_alpha_to_one`` (the last step lands on x0), so the stock pipeline
walks exactly the grid it was distilled on (where ``stock_ddim_is_exact`` says so; recorded in
fewstep.json). A guidance-distilled student's U-Net has ``time_cond_proj_dim``: the pipeline feeds
it ``get_guidance_scale_embedding(guidance_scale - 1)`` and runs one pass per step.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor

from baselines import diffusion, models
from baselines.guidance import CFGDenoiser, UNetDenoiser, is_guidance_conditioned
from baselines.train import read_log

NEGATIVE_PROMPT_NOTE = (
    "negative_prompt has no effect: the student runs one U-Net pass per step with guidance baked in "
    "(diffusers applies classifier-free guidance only when guidance_scale > 1 and the U-Net has no "
    "time_cond_proj_dim)"
)


def student_scheduler(teacher_config: dict, *, parametrisation: str) -> DDIMScheduler:
    """The DDIM scheduler that encodes a student's grid and parametrisation (from any teacher
    scheduler config, e.g. Stable Diffusion's PNDM one: the training betas carry over)."""
    if parametrisation not in ("v", "x0"):
        raise ValueError(f"students predict v or x0, never eps; got {parametrisation!r}")
    return DDIMScheduler.from_config(
        dict(teacher_config),
        prediction_type=diffusion.diffusers_prediction_type(parametrisation),
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        thresholding=False,
    )


def guidance_conditioned_unet(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """A copy of ``unet`` with ``time_cond_proj_dim = embedding_dim`` whose new projection starts at
    zero, so before training it predicts exactly what the teacher predicts conditionally."""
    # private keys (e.g. ``_use_default_values``) would make from_config ignore the new field
    config = {**{k: v for k, v in unet.config.items() if not k.startswith("_")}, "time_cond_proj_dim": embedding_dim}
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"unexpected weight mismatch building the guidance student: {missing} {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.to(dtype=next(unet.parameters()).dtype)


def copy_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """An independent trainable copy (a round's student starts as the current teacher)."""
    return copy.deepcopy(unet).requires_grad_(True)


def denoiser_of(unet, scheduler) -> UNetDenoiser:
    """The denoiser interface over a U-Net and its scheduler's schedule."""
    return UNetDenoiser(unet, dict(scheduler.config), scheduler.alphas_cumprod)


def predict(
    denoiser: UNetDenoiser,
    z: Tensor,
    t: Tensor,
    text: Tensor,
    *,
    guidance_scale: Tensor,
    uncond: Tensor | None,
    parametrisation: str = "x0",
) -> Tensor:
    """A prediction at per-example guidance scales: fed to a guidance-conditioned U-Net; as
    classifier-free guidance around a plain one when ``uncond`` is given; else the plain
    (guidance-baked) prediction."""
    if is_guidance_conditioned(denoiser.unet):
        return denoiser(z, t, text, parametrisation=parametrisation, guidance_scale=guidance_scale)
    if uncond is None or bool((guidance_scale == 1).all()):
        return denoiser(z, t, text, parametrisation=parametrisation)
    return CFGDenoiser(denoiser, uncond, guidance_scale)(z, t, text, parametrisation=parametrisation)


def loss_summary(train_dir: str | Path) -> dict:
    """First / last / minimum logged loss of a training run (for fewstep.json)."""
    rows = read_log(train_dir)
    if not rows:
        return {}
    losses = [r["loss"] for r in rows]
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "logged_points": len(losses)}


def save_student(teacher_pipe, unet, scheduler, folder: str | Path, info: dict) -> Path:
    """Write a student as a complete pipeline folder (the teacher's VAE, text encoder and tokenizer)."""
    pipe = models.assemble_pipeline(
        vae=teacher_pipe.vae,
        text_encoder=teacher_pipe.text_encoder,
        tokenizer=teacher_pipe.tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    return models.save_pipeline(pipe, folder, info)


def link_final(out: Path, folder: Path) -> None:
    """Point ``<out>/model`` at the stage's final student (a relative symlink)."""
    link = out / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(folder.name, link)
