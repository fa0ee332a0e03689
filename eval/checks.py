"""Stages that check and ship the embedded models: check_clip, check_evaluator, check_teacher, ship.

Each writes ``metrics.json`` (and images) into its stage folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baselines import data, models
from baselines.errors import ConfigError, FewstepError
from baselines.guidance import is_guidance_conditioned
from baselines.samplers import generate, recommended_guidance_scale, unet_evaluations
from baselines.train import stage_device
from eval.grids import save_grid
from eval.metrics import (
    FeatureStats,
    frechet_distance,
    gaussian_blur,
    get_extractor,
    load_clip_model,
    metric_name,
    zero_shot_attributes,
)


def _write(out: Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


@dataclass
class CheckCLIPStage:
    """Zero-shot attribute accuracy of a CLIP on held-out real images."""

    kind: str = "check_clip"
    clip: str = "shapes"
    num_images: int = 1000
    seed: int = 0

    def __post_init__(self):
        data.check_heldout_count("num_images", self.num_images, 1, data.HELDOUT_SIZE)


def run_check_clip(cfg: CheckCLIPStage, out: Path) -> dict:
    """Accuracy per attribute of the CLIP's zero-shot classification of real held-out images."""
    clip = load_clip_model(cfg.clip)  # with its own pixel convention (an outside CLIP: normalised, resized)
    ds = data.ShapesDataset(split="heldout", resolution=clip.size, seed=cfg.seed)
    batch = ds.batch(range(cfg.num_images))
    acc = zero_shot_attributes(clip.model, clip.tokenizer, clip.pixels(batch["pixel_values"]), batch["attributes"])
    metrics = {"clip": cfg.clip, "num_images": cfg.num_images, "zero_shot_accuracy": acc}
    _write(out, metrics)
    return metrics


@dataclass
class CheckEvaluatorStage:
    """Does the embedded evaluator see quality? FD of degraded real images against real ones,
    as a ratio to the FD between two disjoint real sets."""

    kind: str = "check_evaluator"
    extractor: str = "embedded"
    num_images: int = 1000
    noise_std: float = 0.05  # on the [0, 1] scale
    blur_sigma: float = 1.0  # pixels
    seed: int = 0

    def __post_init__(self):
        data.check_heldout_count("num_images", self.num_images, 2, data.HELDOUT_SIZE // 2)  # two disjoint real sets


def run_check_evaluator(cfg: CheckEvaluatorStage, out: Path) -> dict:
    """FD(real, real'), and FD(real, degraded) / FD(real, real') for noise, blur, colour permutation."""
    extract = get_extractor(cfg.extractor)
    ds = data.ShapesDataset(split="heldout", seed=cfg.seed)
    n = cfg.num_images
    a = ds.batch(range(n))["pixel_values"]
    b = ds.batch(range(n, 2 * n))["pixel_values"]
    ref = FeatureStats.of(extract(a))
    base = frechet_distance(ref, FeatureStats.of(extract(b)))
    g = torch.Generator().manual_seed(cfg.seed)
    degraded = {
        "noise": (b + 2 * cfg.noise_std * torch.randn(b.shape, generator=g)).clamp(-1, 1),
        "blur": gaussian_blur(b, cfg.blur_sigma),
        "colour_permutation": b[:, [2, 0, 1]],
    }
    fd = {k: frechet_distance(ref, FeatureStats.of(extract(x))) for k, x in degraded.items()}
    metrics = {
        "extractor": cfg.extractor,
        "num_images": n,
        "fd_real_vs_real": base,
        "fd": fd,
        "ratio_to_real_vs_real": {k: v / base for k, v in fd.items()},
    }
    _write(out, metrics)
    return metrics


@dataclass
class CheckTeacherStage:
    """Prompt adherence (zero-shot attributes) vs guidance, and FD-embedded vs DDIM steps."""

    kind: str = "check_teacher"
    model: str = "shapes"
    clip: str = "shapes"
    extractor: str = "embedded"
    sampler: str = "ddim"
    accuracy_images: int = 200
    accuracy_steps: int = 50
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    fd_images: int = 1000
    fd_steps: list[int] = field(default_factory=lambda: [2, 8, 64])
    fd_guidance_scale: float | None = None  # default: the model's recommended scale
    grid_prompts: int = 8
    grid_seeds: int = 6
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self):
        data.check_heldout_count("accuracy_images", self.accuracy_images, 1, data.HELDOUT_SIZE)
        data.check_heldout_count("fd_images", self.fd_images, 2, data.HELDOUT_SIZE // 2)  # prompts, then real images
        data.check_heldout_count("grid_prompts", self.grid_prompts, 1, self.accuracy_images)


def run_check_teacher(cfg: CheckTeacherStage, out: Path, accelerator=None) -> dict:
    """Sample held-out captions with one seed per image and measure accuracy and FD, all on the run's device (a GPU
    when there is one); save grids."""
    device = stage_device(accelerator)
    pipe = models.load_pipeline(cfg.model, device=device)
    info = models.read_info(cfg.model)
    clip = load_clip_model(cfg.clip, device)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ds = data.ShapesDataset(split="heldout", resolution=res, seed=cfg.seed)
    metrics: dict = {"model": str(cfg.model), "sampler": cfg.sampler, "accuracy": {}, "fd": {}}

    acc_batch = ds.batch(range(cfg.accuracy_images))
    for s in cfg.guidance_scales:
        images = generate(
            pipe,
            acc_batch["captions"],
            seeds=list(range(cfg.accuracy_images)),
            sampler=cfg.sampler,
            num_inference_steps=cfg.accuracy_steps,
            guidance_scale=s,
            batch_size=cfg.batch_size,
            progress=True,
        )
        acc = zero_shot_attributes(clip.model, clip.tokenizer, clip.pixels(images * 2 - 1), acc_batch["attributes"])
        metrics["accuracy"][str(s)] = acc
        k = cfg.grid_prompts
        grid = generate(
            pipe,
            [c for c in acc_batch["captions"][:k] for _ in range(cfg.grid_seeds)],
            seeds=list(range(k * cfg.grid_seeds)),
            sampler=cfg.sampler,
            num_inference_steps=cfg.accuracy_steps,
            guidance_scale=s,
            batch_size=cfg.batch_size,
        )
        save_grid(grid, out / f"grid_guidance{s:g}.png", rows=k, row_labels=acc_batch["captions"][:k])

    scale = cfg.fd_guidance_scale if cfg.fd_guidance_scale is not None else recommended_guidance_scale(info)
    extract = get_extractor(cfg.extractor, device)
    real = ds.batch(range(cfg.fd_images, 2 * cfg.fd_images))
    ref = FeatureStats.of(extract(real["pixel_values"]))
    prompts = ds.batch(range(cfg.fd_images))["captions"]
    for steps in cfg.fd_steps:
        images = generate(
            pipe,
            prompts,
            seeds=list(range(cfg.fd_images)),
            sampler=cfg.sampler,
            num_inference_steps=steps,
            guidance_scale=scale,
            batch_size=cfg.batch_size,
            progress=True,
        )
        fd = frechet_distance(ref, FeatureStats.of(extract(images * 2 - 1)))
        metrics["fd"][str(steps)] = {
            metric_name(cfg.extractor): fd,
            "guidance_scale": scale,
            "unet_evaluations": unet_evaluations(
                sampler=cfg.sampler,
                steps=steps,
                guidance_scale=scale,
                guidance_conditioned=is_guidance_conditioned(pipe.unet),
            ),
        }
    _write(out, metrics)
    return metrics


@dataclass
class ShipStage:
    """Copy trained models into the package (fp16 safetensors) with the config hashes that made them."""

    kind: str = "ship"
    teacher: str = "???"
    clip: str = "???"
    from_stages: list[str] = field(default_factory=list)  # stage folders whose config hashes to record
    target: str = "baselines/pretrained"
    config: str = "configs/teacher-shapes.yaml"
    max_mib: float = 16.0
    # the guidance `fewstep sample shapes` and every stage use by default (None: the teacher's own); chosen
    # from check_teacher and the sweep's trade-off, after training, so it does not touch a training stage's hash
    recommended_guidance_scale: float | None = None

    def __post_init__(self):
        if self.recommended_guidance_scale is not None and self.recommended_guidance_scale < 1:
            raise ConfigError(f"ship.recommended_guidance_scale must be >= 1, got {self.recommended_guidance_scale}")


def run_ship(cfg: ShipStage, out: Path) -> dict:
    """Write ``<target>/shapes`` (pipeline) and ``<target>/clip`` in fp16, plus MANIFEST.json."""
    target = Path(cfg.target)
    hashes = {}
    for folder in map(Path, cfg.from_stages):
        state = json.loads((folder / "stage.json").read_text())
        if state.get("status") != "done":
            raise FewstepError(f"stage {folder} is not finished; nothing to ship")
        hashes[state["name"]] = state["hash"]
    pipe = models.load_pipeline(cfg.teacher)
    clip, tokenizer = models.load_clip(cfg.clip)
    info = models.read_info(cfg.teacher)
    info["shipped_from"] = {"config": cfg.config, "stage_hashes": hashes}
    if cfg.recommended_guidance_scale is not None:
        info["recommended"] = {**info.get("recommended", {}), "guidance_scale": cfg.recommended_guidance_scale}
    models.save_pipeline(pipe, target / "shapes", info, half=True)
    models.save_clip(clip, tokenizer, target / "clip", half=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    if size > cfg.max_mib:
        raise FewstepError(f"shipped models take {size:.1f} MiB > {cfg.max_mib} MiB; shrink the preset")
    # the recommended settings change what every stage naming `shapes` does by default, so they are part of
    # the manifest (whose digest is the shipped models' identity, models.shipped_identity)
    manifest = {
        "config": cfg.config,
        "stage_hashes": hashes,
        "recommended": info.get("recommended", {}),
        "size_mib": round(size, 2),
    }
    (target / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    (out / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(target / "MANIFEST.json", out / "MANIFEST.json")
    return manifest
