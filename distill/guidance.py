"""Guidance distillation, stage one (Meng et al., CVPR 2023): one student that takes the guidance
scale as input and matches the classifier-free-guided teacher in a single U-Net pass.

The student is the teacher's U-Net with ``time_cond_proj_dim`` (zero-initialised projection, so it
starts as the teacher's conditional prediction) and is fed
``get_guidance_scale_embedding(guidance_scale - 1)`` exactly as ``StableDiffusionPipeline`` feeds
it. Each training point draws t uniformly, z_t from the teacher's own samples, and a scale s
uniformly from the range; the target is the CFG teacher's prediction at s, in the student's
native parametrisation. Stage two is a ``progressive`` stage whose teacher is this student.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baselines import diffusion, models
from baselines.errors import ConfigError
from baselines.guidance import encode_text, is_guidance_conditioned
from baselines.losses import distillation_loss, draw_timesteps
from baselines.samplers import recommended_guidance_scale
from baselines.train import TrainConfig, is_main_process, stage_device, train
from distill import student as students
from distill.data import PoolConfig, pool_batches, teacher_pool


@dataclass
class GuidanceStage:
    """Distil a CFG teacher into a guidance-conditioned student (one pass per step)."""

    kind: str = "guidance"
    teacher: str = "???"
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 8.0])
    embedding_dim: int = 256  # time_cond_proj_dim of the student U-Net
    recommended_steps: int | None = None  # default: the teacher's
    recommended_guidance_scale: float | None = None  # default: the teacher's, within guidance_range
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, lr=1e-4, checkpoint_every=100))
    seed: int = 0  # unused (kept, at 0, so existing runs keep their hashes)

    def __post_init__(self):
        if len(self.guidance_range) != 2 or not 1 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise ConfigError(f"guidance_range must be [lo, hi] with 1 <= lo <= hi, got {self.guidance_range}")
        if self.seed != 0:
            raise ConfigError(
                "guidance.seed does nothing (the student starts as the teacher, its new projection at"
                " zero): set pool.seed (the teacher's samples) or train.seed (training noise)"
            )
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ConfigError(f"embedding_dim must be even and >= 2, got {self.embedding_dim}")
        if self.recommended_steps is not None and self.recommended_steps < 1:
            raise ConfigError(f"recommended_steps must be >= 1, got {self.recommended_steps}")
        lo, hi = self.guidance_range
        if self.recommended_guidance_scale is not None and not lo <= self.recommended_guidance_scale <= hi:
            raise ConfigError(
                f"recommended_guidance_scale {self.recommended_guidance_scale} is outside guidance_range [{lo}, {hi}]:"
                " the student is not trained there"
            )


def run_guidance(cfg: GuidanceStage, out: Path, accelerator=None) -> None:
    """Train the guidance-conditioned student and save it as ``<out>/model``."""
    teacher_pipe = models.load_pipeline(cfg.teacher, device=stage_device(accelerator))
    if is_guidance_conditioned(teacher_pipe.unet):
        raise ConfigError(f"teacher {cfg.teacher} is already guidance-conditioned; give the CFG teacher")
    info = models.read_info(cfg.teacher)
    lo, hi = (float(s) for s in cfg.guidance_range)
    pool = teacher_pool(teacher_pipe, cfg.pool, guidance_range=(lo, hi), cache=out / "pool")
    uncond = encode_text(teacher_pipe.tokenizer, teacher_pipe.text_encoder, [""])
    scheduler = teacher_pipe.scheduler
    teacher = students.denoiser_of(teacher_pipe.unet, scheduler).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the global stream, as before (nothing drawn from it shapes the student)
    student = students.denoiser_of(
        students.guidance_conditioned_unet(teacher_pipe.unet, cfg.embedding_dim).requires_grad_(True), scheduler
    )
    native = student.native
    T = scheduler.config.num_train_timesteps

    def loss(batch, generator):
        x0, text = batch["x0"], batch["text"]
        b = x0.shape[0]
        t = draw_timesteps(b, T, generator)
        eps = torch.randn(x0.shape, generator=generator)
        scale = lo + (hi - lo) * torch.rand(b, generator=generator)
        device = next(student.parameters()).device
        t, x0, eps, text, scale = t.to(device), x0.to(device), eps.to(device), text.to(device), scale.to(device)
        alpha, sigma = teacher.alpha_sigma(t)
        z = diffusion.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
        with torch.no_grad():
            target = students.predict(teacher, z, t, text, guidance_scale=scale, uncond=uncond, parametrisation=native)
        pred = student(z, t, text, parametrisation=native, guidance_scale=scale)
        return distillation_loss(prediction=pred, target=target)

    train(
        loss=loss,
        modules={"unet": student.unet},
        batches=pool_batches(pool, cfg.train.batch_size),
        config=cfg.train,
        out_dir=out / "train",
        accelerator=accelerator,
        desc="guidance distillation",
    )
    if is_main_process():
        rec = info.get("recommended", {})
        # the teacher's scale (Stable Diffusion's 7.5 when it records none), clamped to the trained range
        scale = (
            cfg.recommended_guidance_scale
            if cfg.recommended_guidance_scale is not None
            else min(max(recommended_guidance_scale(info), lo), hi)
        )
        students.save_student(
            teacher_pipe,
            student.unet,
            scheduler,
            out / "model",
            {
                "method": "guidance",
                "parent": str(cfg.teacher),
                "root_teacher": str(cfg.teacher),
                "parametrisation": native,
                "guidance": {"conditioned": True, "range": [lo, hi], "embedding_dim": cfg.embedding_dim},
                "negative_prompt": students.NEGATIVE_PROMPT_NOTE,
                "training_steps": cfg.train.steps,
                "loss": students.loss_summary(out / "train"),
                "recommended": {
                    "num_inference_steps": rec.get("num_inference_steps", 50)
                    if cfg.recommended_steps is None
                    else cfg.recommended_steps,
                    "guidance_scale": scale,
                    "sampler": rec.get("sampler", "ddim"),
                },
                "config": asdict(cfg),
            },
        )
