"""The ``attribute_eval`` stage: zero-shot attribute accuracy of the images a model generates from
held-out shapes captions with some attributes set and some caption words replaced by a phrase. It
measures what personalisation must show: a DreamBooth identifier or a textual-inversion token
reproducing its concept ("a small sks triangle ..." -> purple triangles), and the prior class
("a small red triangle ...") keeping the original model's accuracy.

One row per entry in ``attribute_results.jsonl`` (accuracy per attribute with a 95% Wilson
interval), a grid of the first images per entry; finished entries are skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baselines import data, models
from baselines.errors import ConfigError
from baselines.guidance import is_guidance_conditioned
from baselines.samplers import generate, resolve_defaults, unet_evaluations
from baselines.train import is_main_process, stage_device
from eval import metrics as M
from eval.grids import save_grid
from eval.sweep import append_row, read_rows


@dataclass
class AttributeEntry:
    """One model and one prompt set: held-out captions with ``set`` attributes overridden (the
    target attributes) and the words of ``replace`` attributes written as ``phrase``."""

    name: str
    model: str
    set: dict[str, str] = field(default_factory=dict)  # e.g. {colour: purple, shape: triangle}
    replace: list[str] = field(default_factory=list)  # caption words (size, colour, shape) -> phrase
    phrase: str = ""  # e.g. the DreamBooth identifier "sks" or a learned token "<purple-triangle>"
    embeddings: str | None = None  # a learned_embeds.safetensors loaded with load_textual_inversion
    steps: int | None = None  # default: the model's recommended
    guidance_scale: float | None = None

    def __post_init__(self):
        bad = sorted(set(self.set) - set(data.ATTRIBUTES))
        if bad:
            raise ConfigError(f"attribute_eval entry {self.name!r}: unknown attribute {bad[0]!r} in set")
        for key, value in self.set.items():
            if value not in data.attribute_values(key):
                raise ConfigError(f"attribute_eval entry {self.name!r}: {key}={value!r} is not a shapes value")
        if not set(self.replace) <= set(data.NOUN_PHRASE):
            raise ConfigError(f"attribute_eval entry {self.name!r}: replace must name some of {data.NOUN_PHRASE}")
        unset = sorted(set(self.replace) - set(self.set))
        if unset:  # the caption no longer says it, so the held-out image's random value is no target
            raise ConfigError(
                f"attribute_eval entry {self.name!r}: replace names {unset[0]!r} but set gives it no value to score"
            )
        if "colour" in self.set and self.set["colour"] == self.set.get("background"):
            raise ConfigError(f"attribute_eval entry {self.name!r}: set gives colour and background the same value")


@dataclass
class AttributeEvalStage:
    """Attribute accuracy of generated images for each entry (same captions and seeds for all)."""

    kind: str = "attribute_eval"
    entries: list[dict] = field(default_factory=list)
    n_images: int = 100
    clip: str = "shapes"
    seed: int = 0
    batch_size: int = 50
    grid_images: int = 16

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("attribute_eval batch_size must be >= 1")
        data.check_heldout_count("n_images", self.n_images, 1, data.HELDOUT_SIZE // 2)  # captions skipped for clashes


def entry_prompts(entry: AttributeEntry, n: int) -> tuple[list[str], list[dict]]:
    """``n`` prompts from held-out captions (skipping those where the set colour would equal the
    background) and the attributes their images should show."""
    targets = data.ShapesDataset(split="heldout").attributes_with(entry.set, n)
    return [data.caption(t, replace=entry.replace, phrase=entry.phrase) for t in targets], targets


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1, unlike mean +- 2 se)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _entry_hash(cfg: AttributeEvalStage, entry: AttributeEntry) -> str:
    """Identity of an entry's row: its settings plus the model's ``fewstep.json`` and the embeddings
    file's bytes, so a retrained model at the same path is evaluated again."""
    model = models.read_info(entry.model)
    embeds = hashlib.sha256(Path(entry.embeddings).read_bytes()).hexdigest() if entry.embeddings else ""
    key = {
        "entry": asdict(entry),
        "n": cfg.n_images,
        "clip": cfg.clip,
        "seed": cfg.seed,
        "model": model,
        "embeds": embeds,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_entry_pipeline(entry: AttributeEntry, device: torch.device | str = "cpu"):
    """The entry's pipeline on ``device``, with its textual-inversion embeddings loaded when given."""
    pipe = models.load_pipeline(entry.model, device=device)
    if entry.embeddings:
        pipe.load_textual_inversion(entry.embeddings, use_safetensors=True)
    return pipe


@torch.no_grad()
def run_attribute_eval(cfg: AttributeEvalStage, out: Path, accelerator=None) -> list[dict]:
    """Generate ``n_images`` per entry, score them with the CLIP, append one row per entry."""
    entries = [AttributeEntry(**e) for e in cfg.entries]
    if not entries:
        raise ConfigError("attribute_eval needs at least one entry")
    if not is_main_process():
        return []
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attribute_results.jsonl"
    done = {r["hash"] for r in read_rows(path)}
    clip = M.load_clip_model(cfg.clip, stage_device(accelerator))
    for entry in entries:
        if entry.embeddings and not Path(entry.embeddings).is_file():
            raise ConfigError(f"attribute_eval entry {entry.name!r}: embeddings file not found: {entry.embeddings}")
        key = _entry_hash(cfg, entry)
        if key in done:
            continue
        pipe = load_entry_pipeline(entry, stage_device(accelerator))
        info = models.read_info(entry.model)
        steps, scale, sampler = resolve_defaults(
            pipe, info, steps=entry.steps, guidance_scale=entry.guidance_scale, sampler=None
        )
        prompts, targets = entry_prompts(entry, cfg.n_images)
        seeds = [cfg.seed + i for i in range(cfg.n_images)]
        start = time.perf_counter()
        images = generate(
            pipe,
            prompts,
            seeds=seeds,
            sampler=sampler,
            num_inference_steps=steps,
            guidance_scale=scale,
            batch_size=cfg.batch_size,
            progress=True,
        )
        seconds = time.perf_counter() - start
        correct = M.zero_shot_correct(clip.model, clip.tokenizer, clip.pixels(images * 2 - 1), targets)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in entry.name)
        grid = images[: cfg.grid_images]
        save_grid(grid, out / f"{safe}.png", rows=max(1, math.isqrt(len(grid))))
        row = {
            **asdict(entry),
            "n_images": cfg.n_images,
            "steps": steps,
            "guidance_scale": scale,
            "nfe": unet_evaluations(
                sampler=sampler,
                steps=steps,
                guidance_scale=scale,
                guidance_conditioned=is_guidance_conditioned(pipe.unet),
            ),
            "prompt_example": prompts[0],
            "accuracy": {k: sum(v) / len(v) for k, v in correct.items()},
            "interval": {k: wilson_interval(sum(v), len(v)) for k, v in correct.items()},
            "seconds_per_image": seconds / cfg.n_images,
            "grid": f"{safe}.png",
            "hash": key,
        }
        append_row(path, row)
    return read_rows(path)
