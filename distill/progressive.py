"""Progressive distillation (Salimans & Ho, ICLR 2022): halve the sampling steps, round after round.

In a round with an N-step student, a training point is z_t at a point t of the student's N-step
trailing grid; the teacher takes two DDIM steps t -> t' -> t'' on the nested 2N-step grid, and the
student is trained so that ONE DDIM step lands on the same z'': its x0 prediction is regressed
onto x~ (``diffusion.progressive_target``) with weight max(SNR, 1). Then the student becomes the
teacher, the optimiser is reset, and N halves. Round one's teacher is the CFG-wrapped teacher at a
fixed scale, or a guidance-conditioned student with a per-example scale held the same for teacher
and student (Meng et al. 2023, stage two).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from baselines import diffusion, models
from baselines.errors import ConfigError
from baselines.guidance import encode_text, is_guidance_conditioned
from baselines.losses import distillation_loss
from baselines.samplers import ddim_step_with, recommended_guidance_scale
from baselines.train import TrainConfig, barrier, is_main_process, stage_device, train
from distill import student as students
from distill.data import PoolConfig, pool_batches, teacher_pool


@dataclass
class ProgressiveStage:
    """Progressive distillation rounds from ``start_steps`` (the teacher's) down to ``end_steps``."""

    kind: str = "progressive"
    teacher: str = "???"
    start_steps: int = 64
    end_steps: int = 1
    guidance_scale: float | None = None  # CFG scale of a plain teacher (default: its recommended one)
    guidance_range: list[float] | None = None  # per-example scales, guidance-conditioned teacher (default: its range)
    parametrisation: str = "v"  # what the students predict: v or x0 (never eps)
    pool: PoolConfig = field(default_factory=PoolConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500, lr=1e-4, checkpoint_every=100))
    seed: int = 0  # unused (the students start from the teacher); kept, at 0, so existing runs keep their hashes

    def __post_init__(self):
        if self.seed != 0:
            raise ConfigError(
                "progressive.seed does nothing: set pool.seed (the teacher's samples) or train.seed (training noise)"
            )
        if self.parametrisation not in ("v", "x0"):
            raise ConfigError(f"parametrisation must be 'v' or 'x0' (never eps), got {self.parametrisation!r}")
        ratio = self.start_steps // max(self.end_steps, 1)
        exact = self.end_steps >= 1 and self.start_steps % self.end_steps == 0
        if not exact or ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(
                f"start_steps / end_steps must be a power of two >= 2, got {self.start_steps} / {self.end_steps}"
            )
        if self.guidance_range is not None and (
            len(self.guidance_range) != 2 or not 1 <= self.guidance_range[0] <= self.guidance_range[1]
        ):
            raise ConfigError(f"guidance_range must be [lo, hi] with 1 <= lo <= hi, got {self.guidance_range}")


def round_steps(start_steps: int, end_steps: int) -> list[int]:
    """The students' step counts, one per round: start/2, start/4, ..., end."""
    steps, n = [], start_steps // 2
    while n >= end_steps:
        steps.append(n)
        n //= 2
    return steps


def round_grid(*, num_train_timesteps: int, steps: int) -> Tensor:
    """(N, 3) rows (t, t', t''): the student's step t -> t'' and the teacher's midpoint t' on the
    nested 2N-step trailing grid (t'' = -1 after the last step)."""
    fine = diffusion.trailing_timesteps(num_train_timesteps=num_train_timesteps, steps=2 * steps) + [-1]
    return torch.tensor([[fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]] for i in range(steps)])


@torch.no_grad()
def two_step_target(predict_x0, z: Tensor, ts: Tensor, alpha_sigma) -> Tensor:
    """x~ for z_t given rows (t, t', t''): two teacher DDIM steps, then the one-step inversion."""
    t, t_mid, t_next = ts.unbind(1)
    z_mid = ddim_step_with(predict_x0, z, t, t_mid, alpha_sigma)
    z_next = ddim_step_with(predict_x0, z_mid, t_mid, t_next, alpha_sigma)
    alpha, sigma = alpha_sigma(t)
    alpha_next, sigma_next = alpha_sigma(t_next)
    return diffusion.progressive_target(
        z_t=z, z_target=z_next, alpha_t=alpha, sigma_t=sigma, alpha_target=alpha_next, sigma_target=sigma_next
    )


def _guidance_setup(cfg: ProgressiveStage, teacher_unet, info: dict) -> tuple[tuple[float, float], dict]:
    if is_guidance_conditioned(teacher_unet):
        if cfg.guidance_scale is not None:
            raise ConfigError(
                f"guidance_scale is for a CFG teacher; {cfg.teacher} is guidance-conditioned: give guidance_range"
            )
        trained = info.get("guidance", {}).get("range")
        asked = cfg.guidance_range
        if asked and trained and not trained[0] <= asked[0] <= asked[1] <= trained[1]:
            raise ConfigError(
                f"guidance_range {list(cfg.guidance_range)} reaches outside {trained}, the range {cfg.teacher} was "
                "distilled on: it was never trained there"
            )
        known = cfg.guidance_range or trained
        if not known:
            raise ConfigError(f"teacher {cfg.teacher} is guidance-conditioned: give guidance_range [lo, hi]")
        lo, hi = known
        rec = info.get("recommended", {}).get("guidance_scale", (lo + hi) / 2)
        return (float(lo), float(hi)), {"conditioned": True, "range": [lo, hi], "recommended": rec}
    if cfg.guidance_range is not None:
        raise ConfigError(
            f"guidance_range is for a guidance-conditioned teacher; {cfg.teacher} is a CFG teacher: give guidance_scale"
        )
    s = cfg.guidance_scale if cfg.guidance_scale is not None else recommended_guidance_scale(info)
    return (float(s), float(s)), {"conditioned": False, "distilled_scale": float(s), "recommended": 1.0}


def run_progressive(cfg: ProgressiveStage, out: Path, accelerator=None) -> None:
    """Run every round; each round's student is saved as ``<out>/progressive-<N>step/`` and
    ``<out>/model`` links the last. Finished rounds are loaded instead of retrained."""
    teacher_pipe = models.load_pipeline(cfg.teacher, device=stage_device(accelerator))
    info = models.read_info(cfg.teacher)
    scheduler = students.student_scheduler(dict(teacher_pipe.scheduler.config), parametrisation=cfg.parametrisation)
    T = scheduler.config.num_train_timesteps
    guidance_range, guidance = _guidance_setup(cfg, teacher_pipe.unet, info)
    method = "guidance+progressive" if guidance["conditioned"] else "progressive"
    pool = teacher_pool(teacher_pipe, cfg.pool, guidance_range=guidance_range, cache=out / "pool")
    uncond = encode_text(teacher_pipe.tokenizer, teacher_pipe.text_encoder, [""])

    teacher = students.denoiser_of(teacher_pipe.unet, teacher_pipe.scheduler).eval().requires_grad_(False)
    if teacher.native != cfg.parametrisation:
        warnings.warn(
            f"the teacher's U-Net predicts {teacher.native} and the students {cfg.parametrisation}: the first "
            "round starts from the teacher's weights read in another parametrisation and must relearn its "
            "output before it matches the teacher; give that round more training steps",
            stacklevel=2,
        )
    teacher_uncond, parent = uncond, str(cfg.teacher)
    for n in round_steps(cfg.start_steps, cfg.end_steps):
        folder = out / f"progressive-{n}step"
        if (folder / models.INFO_FILE).is_file():  # finished round: it is the next teacher
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).to(teacher_pipe.device)
        else:
            unet = _train_round(cfg, teacher, teacher_uncond, pool, scheduler, guidance_range, n, out, accelerator)
            if is_main_process():
                students.save_student(
                    teacher_pipe,
                    unet,
                    scheduler,
                    folder,
                    {
                        "method": method,
                        "parent": parent,
                        "root_teacher": str(cfg.teacher),
                        "steps": n,
                        "parametrisation": cfg.parametrisation,
                        "guidance": {k: v for k, v in guidance.items() if k != "recommended"},
                        "negative_prompt": students.NEGATIVE_PROMPT_NOTE,
                        "training_steps": cfg.train.steps,
                        "loss": students.loss_summary(out / "train" / f"round-{n}"),
                        "stock_pipeline_exact": diffusion.stock_ddim_is_exact(num_train_timesteps=T, steps=n),
                        "recommended": {
                            "num_inference_steps": n,
                            "guidance_scale": guidance["recommended"],
                            "sampler": "ddim",
                        },
                        "config": asdict(cfg),
                    },
                )
            barrier()
        teacher = students.denoiser_of(unet.eval().requires_grad_(False), scheduler)
        teacher_uncond, parent = None, str(folder)  # guidance is baked into every later teacher
    if is_main_process():
        students.link_final(out, folder)


def _train_round(cfg, teacher, teacher_uncond, pool, scheduler, guidance_range, n, out, accelerator):
    """Train the n-step student of one round (starting as a copy of the teacher)."""
    student = students.denoiser_of(students.copy_unet(teacher.unet), scheduler)
    grid = round_grid(num_train_timesteps=scheduler.config.num_train_timesteps, steps=n)
    lo, hi = guidance_range

    def loss(batch, generator):
        x0, text = batch["x0"], batch["text"]
        b = x0.shape[0]
        ts = grid[torch.randint(0, n, (b,), generator=generator)]
        eps = torch.randn(x0.shape, generator=generator)
        scale = lo + (hi - lo) * torch.rand(b, generator=generator)
        device = next(student.parameters()).device
        ts, x0, eps, text, scale = ts.to(device), x0.to(device), eps.to(device), text.to(device), scale.to(device)
        alpha, sigma = teacher.alpha_sigma(ts[:, 0])
        z = diffusion.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)

        def teacher_x0(z_, t_):
            return students.predict(teacher, z_, t_, text, guidance_scale=scale, uncond=teacher_uncond)

        target = two_step_target(teacher_x0, z, ts, teacher.alpha_sigma)
        pred = students.predict(student, z, ts[:, 0], text, guidance_scale=scale, uncond=None)
        weight = diffusion.truncated_snr_weight(alpha=alpha, sigma=sigma)
        return distillation_loss(prediction=pred, target=target, weight=weight)

    train(
        loss=loss,
        modules={"unet": student.unet},
        batches=pool_batches(pool, cfg.train.batch_size),
        config=cfg.train,
        out_dir=out / "train" / f"round-{n}",
        accelerator=accelerator,
        desc=f"progressive {2 * n}->{n} steps",
    )
    return student.unet
