"""The ``finetune_teacher`` stage: continue training a text-to-image pipeline's U-Net on a dataset, with
its own frozen text encoder and its own frozen VAE (or ``vae``'s, swapped in: the U-Net then learns that
VAE's latents), on the teacher's loss (classifier-free caption dropout included).

Any pipeline folder works: the shipped ``shapes`` teacher, one trained by ``train_teacher``, or a Stable
Diffusion folder with a caption folder as data. ``max_timestep`` restricts training to low noise
(t <= max_timestep): the embedded teacher was found to deform shapes while denoising from t = 100-250
(squares kept from real latents noised to t = 100 and denoised: 71%, against 79% for the bare VAE round
trip; BENCHMARKS.md), and 1000 steps at t <= 300 raised its shape accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from baselines import data, models
from baselines.errors import ConfigError
from baselines.guidance import UNetDenoiser
from baselines.teacher import _final_loss, cache_latents, cfg_training_loss, check_denoising_options
from baselines.train import TrainConfig, is_main_process, stage_device, train


@dataclass
class FinetuneTeacherStage:
    """Continue training ``model``'s U-Net on ``dataset`` (a fresh stream: ``seed``)."""

    kind: str = "finetune_teacher"
    hashed_when_set: ClassVar[tuple[str, ...]] = ("vae",)
    model: str = "shapes"
    vae: str | None = None  # a VAE folder to swap in (its latents are re-cached; the U-Net adapts to them)
    dataset: str = "shapes"
    seed: int = 1
    cond_dropout: float = 0.1
    cache_images: int = 50_000
    max_timestep: int | None = None  # train only at t <= max_timestep (None: all timesteps)
    snr_gamma: float | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, batch_size=64, lr=2e-4, warmup_steps=50, ema_decay=0.999)
    )

    def __post_init__(self):
        check_denoising_options(self)
        if self.max_timestep is not None and self.max_timestep < 0:
            raise ConfigError(f"max_timestep must be >= 0 (or null: every timestep), got {self.max_timestep}")


def run_finetune_teacher(cfg: FinetuneTeacherStage, out: Path, accelerator=None) -> None:
    """Fine-tune the U-Net and save the whole pipeline to ``<out>/model`` (the other components unchanged but
    for the VAE when ``vae`` swaps one in)."""
    pipe = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    if cfg.vae is not None:
        vae = models.load_vae(cfg.vae)
        levels, parent_levels = len(vae.config.block_out_channels), len(pipe.vae.config.block_out_channels)
        if vae.config.latent_channels != pipe.unet.config.in_channels or levels != parent_levels:
            raise ConfigError(
                f"vae {cfg.vae!r}: {vae.config.latent_channels} latent channels and {levels} levels; the U-Net "
                f"takes {pipe.unet.config.in_channels} channels on the latent grid of a {parent_levels}-level VAE"
            )
        pipe.vae = vae.to(pipe.device)
    T = pipe.scheduler.config.num_train_timesteps
    if cfg.max_timestep is not None and not 0 <= cfg.max_timestep < T:
        raise ConfigError(f"max_timestep must be in [0, {T}), got {cfg.max_timestep}")
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.eval().requires_grad_(False)
    unet = pipe.unet.requires_grad_(True)
    resolution = unet.config.sample_size * pipe.vae_scale_factor
    dataset = data.make_dataset(cfg.dataset, resolution=resolution, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    cache = cache_latents(pipe.vae, dataset, cfg.cache_images, out / "cache")
    batches, loss = cfg_training_loss(
        denoiser=UNetDenoiser.from_pipeline(pipe),
        cache=cache,
        scaling_factor=pipe.vae.config.scaling_factor,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        batch_size=cfg.train.batch_size,
        cond_dropout=cfg.cond_dropout,
        snr_gamma=cfg.snr_gamma,
        max_timestep=cfg.max_timestep,
    )
    train(
        loss=loss,
        modules={"unet": unet},
        batches=batches,
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc="finetune_teacher",
    )
    if is_main_process():
        parent = models.read_info(cfg.model)
        parent_method = parent.get("method", "pretrained")
        recommended = dict(parent.get("recommended", {}))
        if parent_method not in ("teacher", "pretrained"):  # a distilled student's few steps: the plain denoising
            recommended.pop("num_inference_steps", None)  # loss trains them away, so it samples as a teacher again
        info = {
            "method": "teacher",
            "parent": str(cfg.model),
            "parent_method": parent_method,
            "training_steps": parent.get("training_steps", 0) + cfg.train.steps,
            "final_loss": _final_loss(out / "train"),
            "recommended": recommended,
            "config": asdict(cfg),
        }
        models.save_pipeline(pipe, out / "model", info)
