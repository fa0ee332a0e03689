"""The ``sweep`` stage: a grid of models x samplers x step counts x guidance scales over pipeline folders.

Every cell samples the same prompts with the same per-image seeds (image i uses ``seed + i``), measures
its metrics against cached reference features of real images, and appends one JSON row to
``results.jsonl``; a cell whose row is already there (same cell hash) is skipped, so a killed sweep
resumes. Students (fewstep.json ``method`` progressive / guidance / guidance+progressive) run on their
own scheduler config ("ddim" = DDIM over it) at the steps they were distilled for unless a model entry
says otherwise; a guidance-conditioned U-Net (``time_cond_proj_dim``) costs one pass per step.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from baselines import data, models
from baselines.errors import ConfigError, FewstepError
from baselines.guidance import is_guidance_conditioned
from baselines.samplers import (
    SAMPLERS,
    SPACINGS,
    generate,
    generate_split,
    recommended_guidance_scale,
    unet_evaluations,
)
from baselines.train import process_group, stage_device
from eval import metrics as M
from eval.grids import save_grid

STUDENT_METHODS = ("progressive", "guidance", "guidance+progressive")
METRICS = ("fd", "kid", "cmmd", "clip_score", "attributes")
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp-2m": "DPM-Solver++(2M)", "unipc": "UniPC", "euler": "Euler", "heun": "Heun"}
_MODEL_KEYS = {"name", "path", "samplers", "steps", "guidance_scales"}
_SHAPES_REF_START = data.HELDOUT_SIZE // 2  # reference images: held-out indices from here, disjoint from prompts
_SHAPES_REF_STOP = data.HELDOUT_SIZE - 2000  # the embedded evaluator standardises on the last 2000


def normalise_models(models_cfg: Any) -> list[dict]:
    """``{name: path}`` or ``[{name, path, samplers?, steps?, guidance_scales?}]`` -> a list of entries; an
    entry's own samplers / steps / guidance scales replace the sweep's (a model may appear in several entries)."""
    if isinstance(models_cfg, dict):
        models_cfg = [{"name": k, "path": v} for k, v in models_cfg.items()]
    if not isinstance(models_cfg, list) or not models_cfg:
        raise ConfigError("sweep.models must be a non-empty list of {name, path} or a mapping name -> path")
    out = []
    for i, entry in enumerate(models_cfg):
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise ConfigError(f"sweep.models[{i}] needs 'name' and 'path'")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ConfigError(f"sweep.models[{i}].{sorted(unknown)[0]}: unknown key (allowed: {sorted(_MODEL_KEYS)})")
        out.append({k: entry.get(k) for k in sorted(_MODEL_KEYS)})
    paths: dict = {}
    for e in out:  # a name may repeat (other samplers / steps for the same model) but means one folder
        if paths.setdefault(e["name"], e["path"]) != e["path"]:
            raise ConfigError(f"sweep.models: name {e['name']!r} is given two different paths")
    return out


def model_specs(specs: list[str]) -> dict[str, str]:
    """Models named on a command line, each ``path`` or ``name=path``, as ``{name: path}``: a bare path (one with
    a '/' before any '=') is named after its folder, or a stage's local ``<stage>/model`` folder after the stage
    ('shapes' stays 'shapes'); one name given to two different folders is an error."""
    out: dict[str, str] = {}
    for spec in specs:
        folder = Path(spec.rstrip("/"))
        stage_model = folder.name == "model" and folder.parent.name and folder.is_dir()
        named = folder.parent.name if stage_model else folder.name
        head, sep, tail = spec.partition("=")
        name, path = (head, tail) if sep and "/" not in head else (named or spec, spec)
        if not name or not path:
            raise ConfigError(f"model {spec!r}: give a folder, 'shapes', a hub id, or name=folder")
        if out.setdefault(name, path) != path:
            raise ConfigError(f"two models are named {name!r} ({out[name]} and {path}): name them, as name=folder")
    return out


@dataclass
class SweepStage:
    """A quality / cost grid over pipeline folders (see the module docstring)."""

    kind: str = "sweep"
    models: Any = MISSING  # {name: path} or [{name, path, samplers?, steps?, guidance_scales?}]
    dataset: str = "shapes"  # prompts and reference images: 'shapes' (held-out split) or a caption folder
    prompts: str | None = None  # a text file, one prompt per line (overrides the dataset's captions)
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    steps: list[int] = field(default_factory=lambda: [4])
    student_steps: list[int] | None = None  # default: each student's own (distilled / recommended) steps
    timestep_spacing: str | None = None  # leading | linspace | trailing for every non-student (None: each one's own)
    guidance_scales: list[float] | None = None  # default: each model's recommended scale (fewstep.json)
    n_images: int = 200
    reference_images: int = 2000
    extractors: list[str] = field(default_factory=lambda: ["embedded"])  # FD / KID on each: FID, FD-clip, ...
    clip: str = "shapes"  # CLIP for CLIP score, CMMD and attribute accuracy
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    bootstrap: int = 50  # FD bootstrap rounds for the 95% interval (0: none)
    grid_images: int = 8
    seed: int = 0
    batch_size: int = 50
    cache_dir: str = "runs/.cache"

    def __post_init__(self):
        self.models = normalise_models(self.models)
        for s in self.samplers + [s for m in self.models for s in m["samplers"] or []]:
            if s not in SAMPLERS:
                raise ConfigError(f"sweep.samplers: unknown sampler {s!r}; choose from {sorted(SAMPLERS)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ConfigError(
                f"sweep.timestep_spacing must be one of {list(SPACINGS)} or null, got {self.timestep_spacing!r}"
            )
        bad = set(self.metrics) - set(METRICS)
        if bad:
            raise ConfigError(f"sweep.metrics: unknown metric {sorted(bad)[0]!r}; choose from {list(METRICS)}")
        if not self.extractors and {"fd", "kid"} & set(self.metrics):
            raise ConfigError("sweep.extractors: FD and KID need at least one feature extractor")
        if self.n_images < 2 or min(self.steps) < 1 or min(self.student_steps or [1]) < 1:
            raise ConfigError("sweep.n_images must be >= 2 and every step count >= 1")
        most = _SHAPES_REF_STOP - _SHAPES_REF_START
        if self.dataset == "shapes" and not 2 <= self.reference_images <= most:
            raise ConfigError(
                f"sweep.reference_images must be in [2, {most}] for shapes (held-out images disjoint from the prompts"
                f" and from the evaluator's standardisation set), got {self.reference_images}"
            )


# ----------------------------------------------------------------------------- prompts and references


def _dataset(cfg: SweepStage, resolution: int):
    return data.make_dataset(cfg.dataset, split="heldout", resolution=resolution, seed=cfg.seed)


def sweep_prompts(cfg: SweepStage, resolution: int) -> tuple[list[str], list[dict] | None]:
    """The cell prompts (same for every cell) and, for datasets with known attributes, their attributes."""
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise FewstepError(f"prompts file not found: {path}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) < cfg.n_images:
            raise FewstepError(f"{path} has {len(lines)} prompts; the sweep needs n_images={cfg.n_images}")
        return lines[: cfg.n_images], None
    ds = _dataset(cfg, resolution)
    if cfg.dataset == "shapes" and cfg.n_images > _SHAPES_REF_START:
        raise FewstepError(f"n_images must be <= {_SHAPES_REF_START} for the shapes held-out split")
    items = [ds[i] for i in range(cfg.n_images)]
    attrs = [it["attributes"] for it in items]
    known = all(set(data.ATTRIBUTES) <= set(a) for a in attrs)
    return [it["caption"] for it in items], attrs if known else None


def _reference_images(cfg: SweepStage, resolution: int) -> torch.Tensor:
    ds = _dataset(cfg, resolution)
    if cfg.dataset == "shapes":
        return ds.batch(range(_SHAPES_REF_START, _SHAPES_REF_START + cfg.reference_images))["pixel_values"]
    return ds.batch(range(min(cfg.reference_images, len(ds))))["pixel_values"]


def _fingerprint(extract, images: torch.Tensor) -> str:
    """A hash of the features of four reference images, so a changed extractor (new weights or code) never
    reuses a stale cache entry."""
    probe = np.asarray(extract(images[:4]), dtype=np.float64)
    return hashlib.sha256(np.round(probe, 4).tobytes()).hexdigest()[:16]


def reference_features(cfg: SweepStage, features_name: str, extract, resolution: int) -> np.ndarray:
    """Features of the real reference images, computed once per (dataset, features, resolution, count,
    extractor fingerprint, the images' own digest) and cached as ``<cache_dir>/ref-<hash>.npy``."""
    dataset = cfg.dataset if cfg.dataset == "shapes" else str(Path(cfg.dataset).resolve())
    images = _reference_images(cfg, resolution)
    pixels = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]  # the images themselves: a caption folder
    # edited, or grown past the count asked for, is a new set
    key = json.dumps(
        [dataset, features_name, resolution, cfg.reference_images, cfg.seed, _fingerprint(extract, images), pixels]
    )
    path = Path(cfg.cache_dir) / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    feats = np.asarray(extract(images), dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(feats)}.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(key)
    return feats


# ----------------------------------------------------------------------------- cells


def model_cells(cfg: SweepStage, entry: dict, info: dict, guidance_conditioned: bool) -> list[tuple]:
    """(sampler, steps, guidance_scale) of one model's cells; students default to their own schedule."""
    method = info.get("method", "pretrained")
    rec = info.get("recommended", {})
    student = method in STUDENT_METHODS
    samplers = entry["samplers"] or (["ddim"] if student else cfg.samplers)
    own = cfg.student_steps or [rec.get("num_inference_steps", info.get("steps"))]
    steps = entry["steps"] or (own if student else cfg.steps)
    if entry["guidance_scales"]:
        scales = entry["guidance_scales"]
    elif student and not guidance_conditioned:
        scales = [rec.get("guidance_scale", 1.0)]
    elif cfg.guidance_scales:
        scales = cfg.guidance_scales
    else:
        scales = [recommended_guidance_scale(info)]
    if None in steps:
        raise FewstepError(f"model {entry['name']!r}: fewstep.json has no recommended steps; give 'steps'")
    return [(s, int(n), float(w)) for s in samplers for n in steps for w in scales]


def cell_spacing(cfg: SweepStage, info: dict) -> str | None:
    """The timestep spacing a model's cells are sampled on: the sweep's for a teacher, None (its own) for a
    student, which keeps the grid it was distilled on."""
    return None if info.get("method") in STUDENT_METHODS else cfg.timestep_spacing


def cell_hash(
    cfg: SweepStage,
    entry: dict,
    sampler: str,
    steps: int,
    scale: float,
    model_id: str = "",
    timestep_spacing: str | None = None,
) -> str:
    """Identity of a cell: everything that changes its row (not batch size or grid size); ``model_id``
    identifies the weights (a hash of the folder's fewstep.json), so a retrained folder is re-evaluated;
    ``timestep_spacing`` is the cell's own (``cell_spacing``)."""
    key = {
        "model_id": model_id,
        "model": entry["name"],
        "path": str(entry["path"]),
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": scale,
        **{k: getattr(cfg, k) for k in ("dataset", "prompts", "n_images", "reference_images", "extractors", "clip")},
        **{k: getattr(cfg, k) for k in ("metrics", "bootstrap", "seed")},
        **({"timestep_spacing": timestep_spacing} if timestep_spacing else {}),  # unset: the hashes as before
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file ([] if absent); a torn last line (killed writer) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line, first ending a torn last line (a writer killed mid-line) so it stays alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")


def line_label(model: str, method: str, sampler: str, info: dict | None = None) -> str:
    """The plot-legend name of a (model, sampler): 'teacher + DDIM'; students of one method form one
    line across their step counts: 'progressive student (CFG s=4 distilled)', 'guidance student'."""
    if method in STUDENT_METHODS:
        baked = (info or {}).get("guidance", {}).get("distilled_scale")
        return f"{method} student" + (f" (CFG s={baked:g} distilled)" if baked else "")
    return f"{model} + {SAMPLER_NAMES.get(sampler, sampler)}"


def cell_metrics(cfg: SweepStage, images: torch.Tensor, prompts: list[str], attrs, refs: dict, tools: dict) -> dict:
    """Every configured metric of one cell's images (in [0, 1]) against the reference features."""
    x = images * 2 - 1
    out: dict = {}
    if {"fd", "kid"} & set(cfg.metrics):
        for extractor, extract in tools["extract"].items():
            feats = np.asarray(extract(x), dtype=np.float64)
            name, ref = M.metric_name(extractor, cfg.extractors), refs[extractor]
            if "fd" in cfg.metrics:
                out[name] = M.frechet_distance(ref["stats"], M.FeatureStats.of(feats))
                if cfg.bootstrap:
                    out[f"{name}_ci95"] = list(M.frechet_bootstrap(ref["stats"], feats, rounds=cfg.bootstrap))
            if "kid" in cfg.metrics:
                kid_name = "KID" if name == "FID" else f"KID-{name.removeprefix('FD-')}"
                out[kid_name], out[f"{kid_name}_std"] = M.kid(
                    ref["features"], feats, subset_size=min(1000, len(feats)), seed=cfg.seed
                )
    clip = tools.get("clip")
    if "cmmd" in cfg.metrics:
        out["CMMD"] = M.cmmd(refs["clip"], clip.image_embeds(x).double().numpy())
    if "clip_score" in cfg.metrics:
        out["CLIP score"] = float(M.clip_score(clip, x, prompts).mean())
    if "attributes" in cfg.metrics and attrs is not None:
        acc = M.zero_shot_attributes(clip.model, clip.tokenizer, clip.pixels(x), attrs)
        out["attribute accuracy"] = float(np.mean(list(acc.values())))
        out["attributes"] = acc
    return out


def run_sweep(cfg: SweepStage, out: Path, accelerator=None) -> list[dict]:
    """Run every unfinished cell; returns all rows of ``results.jsonl``."""
    rank, world = process_group()
    device = stage_device(accelerator)  # the pipelines and, on rank 0, the scoring networks
    results = Path(out) / "results.jsonl"
    done = {r.get("config_hash") for r in read_rows(results)}
    current: set[str] = set()  # this config's cells: rows of others (a config changed in place) are set aside
    tools: dict = {}
    refs_by_res: dict = {}
    for entry in cfg.models:
        info = models.read_info(entry["path"])
        model_id = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16] if info else ""
        pipe = models.load_pipeline(entry["path"], device=device)
        conditioned = is_guidance_conditioned(pipe.unet)
        spacing = cell_spacing(cfg, info)
        hashes = {c: cell_hash(cfg, entry, *c, model_id, spacing) for c in model_cells(cfg, entry, info, conditioned)}
        current.update(hashes.values())
        cells = [c for c, h in hashes.items() if h not in done]
        if not cells:
            continue
        res = pipe.unet.config.sample_size * pipe.vae_scale_factor
        prompts, attrs = sweep_prompts(cfg, res)
        seeds = [cfg.seed + i for i in range(cfg.n_images)]
        if rank == 0 and res not in refs_by_res:
            if "extract" not in tools and {"fd", "kid"} & set(cfg.metrics):
                tools["extract"] = {e: M.get_extractor(e, device) for e in cfg.extractors}
            if "clip" not in tools and {"cmmd", "clip_score", "attributes"} & set(cfg.metrics):
                tools["clip"] = M.load_clip_model(cfg.clip, device)
            refs = {}
            for extractor, extract in tools.get("extract", {}).items():
                feats = reference_features(cfg, extractor, extract, res)
                refs[extractor] = {"features": feats, "stats": M.FeatureStats.of(feats)}
            if "cmmd" in cfg.metrics:
                refs["clip"] = reference_features(cfg, f"clip-embeds:{cfg.clip}", tools["clip"].image_embeds, res)
            refs_by_res[res] = refs
        method = info.get("method", "pretrained")
        for sampler, scale in dict.fromkeys((c[0], c[2]) for c in cells):  # warm-up calls (allocator, first-call
            # set-up of each sampler, the CFG batch), so no cell is timed cold
            generate(
                pipe,
                prompts[:1],
                seeds=seeds[:1],
                sampler=sampler,
                num_inference_steps=1,
                guidance_scale=scale,
                timestep_spacing=spacing,
            )
        for sampler, steps, scale in cells:
            start = time.perf_counter()
            images = generate_split(
                pipe,
                prompts,
                seeds,
                sampler=sampler,
                num_inference_steps=steps,
                guidance_scale=scale,
                batch_size=cfg.batch_size,
                progress=True,
                timestep_spacing=spacing,
            )
            seconds = time.perf_counter() - start
            if rank != 0:
                continue
            row = {
                "model": entry["name"],
                "path": str(entry["path"]),
                "method": method,
                "label": line_label(entry["name"], method, sampler, info),
                "sampler": sampler,
                "steps": steps,
                "guidance_scale": scale,
                "timestep_spacing": spacing or pipe.scheduler.config.get("timestep_spacing"),
                "nfe": unet_evaluations(
                    sampler=sampler, steps=steps, guidance_scale=scale, guidance_conditioned=conditioned
                ),
                "n_images": cfg.n_images,
                "extractors": cfg.extractors,
                **cell_metrics(cfg, images, prompts, attrs, refs_by_res[res], tools),
                "seconds_per_image": seconds / cfg.n_images,
                "images_per_second": cfg.n_images / seconds,
                "processes": world,
                "threads": torch.get_num_threads(),
                "device": str(device),
                "config_hash": hashes[(sampler, steps, scale)],
            }
            if cfg.grid_images:
                grid = Path(out) / "grids" / f"{row['config_hash']}.png"
                save_grid(images[: cfg.grid_images], grid, rows=1)
                row["grid"] = str(grid.relative_to(out))
            append_row(results, row)
            done.add(row["config_hash"])
            print(json.dumps({k: row[k] for k in ("label", "steps", "guidance_scale", "nfe")}), flush=True)
    if rank == 0:
        set_aside_other_cells(results, current)
    return read_rows(results)


def set_aside_other_cells(results: Path, current: set[str]) -> None:
    """Keep in ``results.jsonl`` only the rows of ``current`` cells; rows of cells the config no longer has
    (after it changed in place) move to ``results.dropped.jsonl`` (kept for reading, not reused)."""
    rows = read_rows(results)
    dropped = [r for r in rows if r.get("config_hash") not in current]
    if not dropped:
        return
    aside = results.with_name("results.dropped.jsonl")
    already = {r.get("config_hash") for r in read_rows(aside)}  # set aside before a crash in the middle
    for row in dropped:
        if row.get("config_hash") not in already:
            append_row(aside, row)
    tmp = results.with_name(".results.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("config_hash") in current))
    tmp.replace(results)
