"""Distillation data: the teacher's own prompt distribution and its own samples; no images.

The pool holds, for each prompt, the teacher's sample latent x0 (drawn with a per-item seed at a
guidance scale from the stage's range) and the prompt's text states. Training points are then
z_t = alpha_t x0 + sigma_t eps at fresh noise, as in Salimans & Ho (2022), with the teacher's
samples standing in for data so that distilling a Stable Diffusion folder needs only prompts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from baselines import data
from baselines.errors import ConfigError, FewstepError
from baselines.guidance import encode_text
from baselines.samplers import generate_split, image_seeds
from baselines.train import barrier, is_main_process


@dataclass
class PoolConfig:
    """Where prompts come from and how the teacher samples the pool."""

    prompts: str = "shapes"  # "shapes" (training captions) or a text file, one prompt per line
    size: int = 1024
    steps: int = 16  # teacher steps per pool sample
    sampler: str = "ddim"
    scales: int = 4  # distinct guidance scales spread over the range (1 for a fixed scale)
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.size < 1 or self.steps < 1 or self.scales < 1:
            raise ConfigError("pool.size, pool.steps and pool.scales must be >= 1")


def read_prompts(source: str, n: int, *, seed: int = 0) -> list[str]:
    """``n`` prompts: captions of the shapes training split, or lines of a text file (cycled)."""
    if source == "shapes":
        ds = data.ShapesDataset(split="train", seed=seed)
        return [ds.caption_of(i) for i in range(n)]
    path = Path(source)
    if not path.is_file():
        raise FewstepError(f"prompts file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise FewstepError(f"prompts file {path} has no prompts")
    return [lines[i % len(lines)] for i in range(n)]


def pool_scales(guidance_range: tuple[float, float], count: int) -> list[float]:
    """``count`` guidance scales evenly spread over [lo, hi] (the single scale when lo == hi)."""
    lo, hi = guidance_range
    return [float(s) for s in np.linspace(lo, hi, count)] if hi > lo else [float(lo)]


@torch.no_grad()
def teacher_pool(pipe, cfg: PoolConfig, *, guidance_range: tuple[float, float], cache: Path) -> dict:
    """x0 latents, text states and guidance scales of the teacher's own samples, cached on disk: every process of
    a torchrun launch draws its share (one seed per sample, so the pool is the one process's), rank 0 writes it,
    every process reads the cache."""
    tensors, meta = cache / "pool.safetensors", cache / "pool.json"
    made_with = {**asdict(cfg), "guidance_range": [float(g) for g in guidance_range]}
    made_with.pop("batch_size")  # how it is generated, not what
    found = tensors.is_file() and meta.is_file()
    stale = found and json.loads(meta.read_text()).get("made_with", made_with) != made_with
    barrier()  # every process has looked before rank 0 may remove it
    if stale:
        if is_main_process():
            print(f"{cache}: the pool was made with another pool config or guidance range; making it again")
            shutil.rmtree(cache)
        barrier()
    if not (tensors.is_file() and meta.is_file()):
        prompts = read_prompts(cfg.prompts, cfg.size, seed=cfg.seed)
        scales = pool_scales(guidance_range, cfg.scales)
        if len(scales) > cfg.size:
            raise ConfigError(f"pool.scales ({len(scales)}) must be <= pool.size ({cfg.size}): one sample per scale")
        item_scale = [scales[i % len(scales)] for i in range(cfg.size)]
        chunks = {}
        for s in scales:
            idx = [i for i in range(cfg.size) if item_scale[i] == s]
            chunks[s] = (
                idx,
                generate_split(
                    pipe,
                    [prompts[i] for i in idx],
                    image_seeds(cfg.seed, idx),
                    sampler=cfg.sampler,
                    num_inference_steps=cfg.steps,
                    guidance_scale=s,
                    batch_size=cfg.batch_size,
                    progress=True,
                    latents=True,
                ),
            )
        if is_main_process():  # the other ranks' shares were gathered here
            first = next(iter(chunks.values()))[1]
            x0 = torch.empty((cfg.size, *first.shape[1:]))
            for idx, latents in chunks.values():
                x0[idx] = latents.float()
            text = torch.cat(
                [
                    encode_text(pipe.tokenizer, pipe.text_encoder, prompts[i : i + cfg.batch_size]).float().cpu()
                    for i in range(0, cfg.size, cfg.batch_size)  # off the GPU chunk by chunk: a large pool's states
                ]
            )
            partial = cache.with_name(cache.name + ".partial")  # written whole, then renamed: never half a pool
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            save_file({"x0": x0.contiguous(), "text": text.contiguous()}, partial / tensors.name)  # both float32
            info = {"prompts": prompts, "guidance_scale": item_scale, "made_with": made_with}
            (partial / meta.name).write_text(json.dumps(info))
            shutil.rmtree(cache, ignore_errors=True)
            partial.rename(cache)
    barrier()
    info = json.loads(meta.read_text())
    return {**load_file(tensors), "prompts": info["prompts"], "guidance_scale": info["guidance_scale"]}


def pool_batches(pool: dict, batch_size: int):
    """``batches(i)`` for the training loop: micro-batch i cycles through the pool."""
    n = pool["x0"].shape[0]

    def batches(i: int) -> dict:
        idx = torch.arange(i * batch_size, (i + 1) * batch_size) % n
        return {"x0": pool["x0"][idx], "text": pool["text"][idx]}

    return batches
