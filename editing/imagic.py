"""Imagic (Kawar et al., CVPR 2023): edit one real image with a target text in three stages.

A. with every weight frozen, optimise the text embedding e_opt (from e_tgt) to reconstruct the
   image under the denoising loss;
B. with e_opt fixed, fine-tune the U-Net to reconstruct the image better;
C. sample from e = eta e_tgt + (1 - eta) e_opt with the fine-tuned model (paper eq. 1), for a
   sweep of eta, through the one editing sampler (``img2img`` at strength 1).
A and B are loss callables on the one training loop; any pipeline (teacher or guidance-
conditioned student) works.

Few-step Imagic: A and B on the teacher, then stage C also on a student distilled from it, with
B's weight change added to the student (``student``, ``student_delta_scale``). Fine-tuning the
student itself with the plain denoising loss (``model: <student>``) undoes its few-step skill:
measured on the embedded default, its edits barely change the input (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from baselines import models
from baselines.errors import ConfigError
from baselines.guidance import UNetDenoiser, encode_text, is_guidance_conditioned
from baselines.losses import denoising_loss
from baselines.samplers import resolve_defaults
from baselines.timing import Timer
from baselines.train import TrainConfig, is_main_process, stage_device, train
from editing.common import (
    EditSource,
    decode_latents,
    edit_row,
    encode_image,
    finetune_guidance_scale,
    model_resolution,
    preflight,
    resolve_inputs,
    save_image,
    save_strip,
    write_rows,
)
from editing.lora import add_lora, add_weight_change, merge_lora
from editing.sdedit import edit_nfe, img2img


class TextEmbedding(nn.Module):
    """A trainable text embedding (1, L, D): Imagic's e_opt."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())

    def forward(self, n: int) -> Tensor:
        return self.embedding.expand(n, *self.embedding.shape[1:])


def freeze(pipe) -> None:
    """Stop gradients into every weight of the pipeline."""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)


def _reconstruction_loss(pipe, latents: Tensor, text_fn, batch_size: int, guidance_scale: float):
    denoiser = UNetDenoiser.from_pipeline(pipe)
    kwargs = {"guidance_scale": guidance_scale} if is_guidance_conditioned(pipe.unet) else {}
    x0 = latents.expand(batch_size, *latents.shape[1:])

    def loss(batch: dict, generator: torch.Generator) -> Tensor:
        return denoising_loss(denoiser=denoiser, x0=x0, text=text_fn(batch_size), generator=generator, **kwargs)

    return loss


def optimise_embedding(
    pipe, latents: Tensor, e_tgt: Tensor, config: TrainConfig, out_dir: Path, *, guidance_scale: float, accelerator=None
) -> Tensor:
    """Stage A: e_opt minimising the denoising loss of ``latents`` (1,C,h,w), all weights frozen."""
    freeze(pipe)
    e_opt = TextEmbedding(e_tgt)
    loss = _reconstruction_loss(pipe, latents, e_opt, config.batch_size, guidance_scale)
    train(
        loss=loss,
        modules={"e_opt": e_opt},
        batches=lambda i: {},
        config=config,
        out_dir=out_dir,
        accelerator=accelerator,
        desc="imagic A",
    )
    return e_opt.embedding.detach().clone()


def finetune_unet(
    pipe,
    latents: Tensor,
    e_opt: Tensor,
    config: TrainConfig,
    out_dir: Path,
    *,
    guidance_scale: float,
    lora_rank: int = 0,
    accelerator=None,
) -> None:
    """Stage B: fine-tune the U-Net (in place) to reconstruct ``latents`` from fixed e_opt: all of
    it, or with ``lora_rank`` > 0 low-rank adapters on its attention projections, merged after."""
    freeze(pipe)
    if lora_rank > 0:
        trained = add_lora(pipe.unet, lora_rank, seed=config.seed)
    else:
        trained = pipe.unet.requires_grad_(True)
    e = e_opt.detach()
    loss = _reconstruction_loss(pipe, latents, lambda n: e.expand(n, *e.shape[1:]), config.batch_size, guidance_scale)
    train(
        loss=loss,
        modules={"lora" if lora_rank > 0 else "unet": trained},
        batches=lambda i: {},
        config=config,
        out_dir=out_dir,
        accelerator=accelerator,
        desc="imagic B",
    )
    if lora_rank > 0:
        merge_lora(pipe.unet)
    pipe.unet.requires_grad_(False).eval()


def interpolate(e_tgt: Tensor, e_opt: Tensor, eta: float) -> Tensor:
    """e = eta e_tgt + (1 - eta) e_opt (Kawar et al. eq. 1)."""
    return eta * e_tgt + (1 - eta) * e_opt


def sample_etas(pipe, e_tgt: Tensor, e_opt: Tensor, etas: list[float], *, steps: int, guidance_scale: float, seed: int):
    """Stage C: one image per eta, all from the same seed, via the editing sampler at strength 1."""
    h = pipe.unet.config.sample_size
    zeros = torch.zeros(1, pipe.unet.config.in_channels, h, h, device=pipe.unet.device)
    images = []
    for eta in etas:
        latents = img2img(
            pipe,
            zeros,
            interpolate(e_tgt, e_opt, eta),
            strength=1.0,
            steps=steps,
            guidance_scale=guidance_scale,
            seeds=[seed],
            pure_noise=True,
        )
        images.append(decode_latents(pipe.vae, latents)[0])
    return torch.stack(images)


@dataclass
class ImagicStage:
    """Imagic on a user image or held-out shapes images (one fine-tuned model per input)."""

    kind: str = "imagic"
    model: str = "shapes"
    source: EditSource = field(default_factory=EditSource)
    etas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    steps: int | None = None  # stage C; default: the model's recommended steps
    guidance_scale: float | None = None  # stage C (A and B fit a guidance-conditioned model at finetune_guidance_scale)
    lora_rank: int = 0  # stage B: 0 = fine-tune the whole U-Net; r > 0 = rank-r LoRA, merged after
    save_models: bool = True
    seed: int = 0
    # few-step stage C: a student distilled from `model` gets `student_delta_scale` x stage B's weight change
    student: str | None = None
    student_steps: int | None = None  # default: the student's recommended steps
    student_delta_scale: float = 0.5
    embedding: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=100, batch_size=4, lr=1e-2, checkpoint_every=10_000, log_every=10)
    )
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=100, batch_size=4, lr=1e-4, checkpoint_every=10_000, log_every=10)
    )


@dataclass
class StageC:
    """A model stage C samples with: the fine-tuned one, or a student given its weight change."""

    pipe: Any
    model: str
    steps: int
    guidance_scale: float
    info: dict  # fewstep.json of the saved model
    suffix: str = ""  # names its grid, edits and model folder apart
    extra: dict = field(default_factory=dict)  # added to its edits.jsonl rows


def run_imagic(cfg: ImagicStage, out: Path, accelerator=None) -> list[dict]:
    """Stages A, B, C for every input (C also on ``cfg.student``); writes e_tgt/e_opt safetensors,
    the fine-tuned pipeline folders, the edited images, grids over eta and ``edits.jsonl``."""
    if not cfg.etas:
        raise ConfigError("etas is empty: give at least one eta (Imagic sweeps 0..1)")
    preflight(cfg.source)
    parent = models.load_pipeline(cfg.model, device=stage_device(accelerator))
    info = models.read_info(cfg.model)
    steps, scale, _ = resolve_defaults(parent, info, steps=cfg.steps, guidance_scale=cfg.guidance_scale, sampler="ddim")
    # A and B fit the conditional prediction (the denoising loss's target), as Imagic does before sampling with
    # guidance; a guidance-conditioned model fitted at stage C's scale would learn to stop guiding there
    fit_scale = finetune_guidance_scale(info)
    student = _load_student(cfg, stage_device(accelerator)) if cfg.student else None
    # every input starts from the same weights: the model's, as loaded
    base = {n: v.clone() for n, v in parent.unet.state_dict().items()} if student else None
    inputs = resolve_inputs(cfg.source, model_resolution(parent))
    rows = []
    for k, item in enumerate(inputs):
        pipe = parent if k == 0 else models.load_pipeline(cfg.model, device=stage_device(accelerator))
        folder = out / item.name
        latents = encode_image(pipe.vae, item.pixels[None])
        e_tgt = encode_text(pipe.tokenizer, pipe.text_encoder, [item.prompt])
        with Timer(pipe.device) as fit:
            e_opt = optimise_embedding(
                pipe,
                latents,
                e_tgt,
                cfg.embedding,
                folder / "train_embedding",
                guidance_scale=fit_scale,
                accelerator=accelerator,
            )
            finetune_unet(
                pipe,
                latents,
                e_opt,
                cfg.finetune,
                folder / "train_unet",
                guidance_scale=fit_scale,
                lora_rank=cfg.lora_rank,
                accelerator=accelerator,
            )
        if not is_main_process():
            continue
        save_file({"embedding": e_tgt.contiguous()}, folder / "e_tgt.safetensors")
        save_file({"embedding": e_opt.contiguous()}, folder / "e_opt.safetensors")
        input_path = save_image(item.pixels, out / "inputs" / f"{item.name}.png")
        model_info = {
            "method": "imagic",
            "parent": str(cfg.model),
            "prompt": item.prompt,
            "training_steps": {"embedding": cfg.embedding.steps, "finetune": cfg.finetune.steps},
            "recommended": info.get("recommended", {}),
            "config": asdict(cfg),
        }
        runs = [StageC(pipe, str(cfg.model), steps, scale, model_info)]
        if student is not None:
            s_pipe, s_info, s_steps, s_scale, s_base = student
            s_pipe.unet.load_state_dict(s_base)
            add_weight_change(s_pipe.unet, tuned=pipe.unet.state_dict(), base=base, scale=cfg.student_delta_scale)
            transfer = {"weight_change_from": str(cfg.model), "delta_scale": cfg.student_delta_scale}
            recommended = s_info.get("recommended", {})
            s_model_info = {**model_info, **transfer, "parent": str(cfg.student), "recommended": recommended}
            runs.append(StageC(s_pipe, str(cfg.student), s_steps, s_scale, s_model_info, "_student", transfer))
        for run in runs:
            if cfg.save_models:
                models.save_pipeline(run.pipe, folder / f"model{run.suffix}", run.info)
            with Timer(run.pipe.device) as sample:
                images = sample_etas(
                    run.pipe,
                    e_tgt,
                    e_opt,
                    cfg.etas,
                    steps=run.steps,
                    guidance_scale=run.guidance_scale,
                    seed=cfg.seed + k,
                )
            save_strip(torch.cat([item.pixels[None], images.cpu()]), folder / f"grid_eta{run.suffix}.png")
            nfe = edit_nfe(run.pipe, steps=run.steps, strength=1.0, guidance_scale=run.guidance_scale)
            for eta, image in zip(cfg.etas, images):
                path = save_image(image, out / "edits" / f"{item.name}{run.suffix}_eta{eta:g}.png")
                row = edit_row(
                    method="imagic",
                    model=run.model,
                    item=item,
                    input_path=input_path,
                    output_path=path,
                    mask_path=None,
                    param={"eta": eta},
                    steps=run.steps,
                    guidance_scale=run.guidance_scale,
                    nfe=nfe,
                    seconds=sample.seconds / len(cfg.etas),
                )
                rows.append({**row, "fit_seconds": round(fit.seconds, 2), **run.extra})
    if is_main_process():
        write_rows(out, rows)
    return rows


def _load_student(cfg: ImagicStage, device: torch.device):
    """The stage-C student, its info, steps, guidance scale and original U-Net weights. A guidance-conditioned
    student takes the stage's ``guidance_scale`` as its input; any other student (a progressive student of a CFG
    teacher has the teacher's guidance built in) samples at its own recommended scale, never CFG on top."""
    pipe = models.load_pipeline(cfg.student, device=device)
    info = models.read_info(cfg.student)
    scale = cfg.guidance_scale if is_guidance_conditioned(pipe.unet) else None
    steps, scale, _ = resolve_defaults(pipe, info, steps=cfg.student_steps, guidance_scale=scale, sampler="ddim")
    return pipe, info, steps, scale, {n: v.clone() for n, v in pipe.unet.state_dict().items()}
