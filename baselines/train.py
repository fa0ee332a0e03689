"""The one training loop: every method supplies a loss callable and the modules it trains.

    train(loss=..., modules={"unet": unet}, batches=..., config=TrainConfig(...), out_dir=...)

``loss(batch, generator) -> Tensor`` computes a scalar for one micro-batch; the generator is
seeded from (seed, step, micro-step, rank), so a resumed run draws exactly the noise the
uninterrupted run would have. ``batches(i)`` returns micro-batch ``i`` for this process (a
global index, so data order is also a pure function of the step). Data parallelism across
processes and machines goes through accelerate's process group: parameters are broadcast from
rank 0 at the start and gradients are averaged with one all-reduce per optimiser step (DDP's
semantics), so replicas stay identical.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.errors import ConfigError, FewstepError


@dataclass
class TrainConfig:
    """Options of the one training loop."""

    steps: int = 1000
    batch_size: int = 64  # per process and micro-step
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at the last step)
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    ema_decay: float | None = None  # the returned and saved weights are the EMA ones when set
    mixed_precision: str = "no"  # no | bf16: autocast of the loss (bf16 is ~12x slower on this CPU)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str = "auto"  # auto: continue from the last complete checkpoint | never
    seed: int = 0

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"train.resume must be 'auto' or 'never', got {self.resume!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.steps, train.batch_size and train.grad_accum must be >= 1")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError(
                "train.checkpoint_every, train.log_every and train.keep_checkpoints must be >= 1"
                " (a checkpoint and a log row are also written at the last step)"
            )
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(
                f"train.lr, train.weight_decay and train.warmup_steps must be >= 0; got {self.lr}, "
                f"{self.weight_decay}, {self.warmup_steps}"
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"train.clip_grad must be > 0, or null for no clipping; got {self.clip_grad}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(
                f"train.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}"
                " (fp16 would need loss scaling, which the loop does not do)"
            )


PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


def process_group() -> tuple[int, int]:
    """(rank, world size). Under torchrun, initialises the process group (gloo on CPU, nccl on
    GPU) if nobody has: accelerate 1.15 was seen to report one process on CPU under torchrun. Its collective
    timeout is ``PROCESS_GROUP_TIMEOUT``, not nccl's 10-minute default: some work runs on rank 0 alone (a sweep's
    reference features and scoring, a download, a stage that is not distributed) while the other ranks wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def stage_device(accelerator: Accelerator | None) -> torch.device:
    """Where a stage loads its models: the accelerator's device, or without one the device an ``Accelerator()``
    would pick (a GPU when there is one), which is where ``train`` then trains. The training loop moves only the
    trained modules; frozen teachers, VAEs and text encoders load here."""
    if accelerator is not None:
        return accelerator.device
    from accelerate import PartialState

    return PartialState().device


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return process_group()[0] == 0


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    if dist.is_initialized():
        dist.barrier()


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step``: linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def _trainable(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters() if p.requires_grad}


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out_dir: Path, step: int, params, ema, optimizer, config: TrainConfig) -> None:
    final = out_dir / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, tmp / "params.safetensors")
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))  # written last: marks completeness
    os.replace(tmp, final)
    for old in _checkpoints(out_dir)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, params, ema, optimizer) -> int:
    saved = load_file(ckpt / "params.safetensors")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            for k, v in load_file(ckpt / "ema.safetensors").items():
                ema[k].copy_(v)
    # on the CPU first: every rank would otherwise load rank 0's state onto its GPU (cuda:0) before moving it
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())["step"]


def _generator(config: TrainConfig, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((config.seed * 1_000_003 + step) * 131 + micro) * 8191 + rank)


def train(
    *,
    loss: Callable[[dict, torch.Generator], Tensor],
    modules: dict[str, nn.Module],
    batches: Callable[[int], dict],
    config: TrainConfig,
    out_dir: str | Path,
    accelerator: Accelerator | None = None,
    desc: str = "train",
) -> dict[str, nn.Module]:
    """Train the parameters of ``modules`` that require grad to minimise ``loss``; returns the
    modules (holding the EMA weights when ``config.ema_decay`` is set)."""
    out_dir = Path(out_dir)
    accelerator = accelerator or Accelerator()  # the config's precision is applied below, per loss call
    rank, world = process_group()
    for m in modules.values():
        m.to(accelerator.device).train()
    params = _trainable(modules)
    if not params:
        raise ConfigError(f"{desc}: nothing to train (no parameter requires grad)")
    if world > 1:
        with torch.no_grad():
            for p in params.values():
                dist.broadcast(p.data, src=0)
    decay = [p for p in params.values() if p.ndim > 1]
    no_decay = [p for p in params.values() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=tuple(config.adam_betas),
    )
    ema = {k: p.detach().clone() for k, p in params.items()} if config.ema_decay else None

    start = 0
    existing = _checkpoints(out_dir)
    if config.resume == "auto" and existing:
        start = _load_checkpoint(existing[-1], params, ema, optimizer)
    elif existing and rank == 0:  # resume: never starts afresh; an earlier run's checkpoints would collide
        shutil.rmtree(out_dir / "checkpoints")
    if world > 1:  # every rank must resume from the same step, or their all-reduces pair up wrongly and hang
        seen = torch.tensor([start, -start], device=accelerator.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen[0].item() != -seen[1].item():
            raise FewstepError(
                f"{desc}: the processes see different checkpoints in {out_dir} (steps {-seen[1].item()} to "
                f"{seen[0].item()}): put the run folder on storage every machine shares"
            )
    barrier()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    if rank == 0 and start == 0:  # a fresh start (or resume: never) begins a fresh log: read_log keeps one row
        (out_dir / "log.jsonl").unlink(missing_ok=True)  # per step, and an earlier run's later steps would stay
    log = (out_dir / "log.jsonl").open("a") if rank == 0 else None
    if log:
        log.write(json.dumps({"event": "resume" if start else "start", "step": start, "world_size": world}) + "\n")

    autocast = torch.autocast(
        accelerator.device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"
    )  # from this config, not the accelerator's: under ``fewstep run`` one accelerator serves every stage
    bar = tqdm(total=config.steps, initial=start, desc=desc, disable=rank != 0, dynamic_ncols=True)
    running, t0 = [], time.time()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        total = 0.0
        for micro in range(config.grad_accum):
            index = (step * config.grad_accum + micro) * world + rank
            batch = batches(index)
            with autocast:
                value = loss(batch, _generator(config, step, micro, rank)) / config.grad_accum
            value.backward()
            total += value.item()
        bad_loss = float(not math.isfinite(total))
        if world > 1:  # average the gradients; a parameter no rank used keeps no gradient, as in one process
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            used = torch.tensor([float(p.grad is not None) for p in params.values()], device=grads[0].device)
            flags = torch.cat([used, torch.tensor([bad_loss], device=used.device)]).to(grads[0].dtype)
            flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
            dist.all_reduce(flat)  # the non-finite-loss flag too, so every rank stops together
            bad_loss = float(flat[-1].item())
            used = flat[len(flat) - len(flags) : -1] > 0
            flat = flat[: len(flat) - len(flags)] / world
            offset = 0
            for p, g, u in zip(params.values(), grads, used.tolist()):
                p.grad = flat[offset : offset + g.numel()].view_as(p).clone() if u else None
                offset += g.numel()
        present = [p.grad for p in params.values() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in present]).all()) if present else True  # one sync
        if bad_loss or not finite:
            raise FewstepError(
                f"step {step + 1}: the loss or a gradient is not finite (loss {total:.4g}); nothing was updated: "
                "check the data and parametrisation, or lower train.lr and rerun with --force STAGE"
            )
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip_grad).item()
            if config.clip_grad
            else float("nan")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for k, p in params.items():
                    ema[k].lerp_(p.detach(), 1 - config.ema_decay)
        running.append(total)
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            mean = torch.tensor(sum(running) / len(running), device=accelerator.device)
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            mean = mean.item()
            bar.set_postfix(loss=f"{mean:.4f}")
            if log:
                row = {"step": done, "loss": mean, "lr": lr_at(config, step), "grad_norm": grad_norm}
                log.write(json.dumps({**row, "seconds": round(time.time() - t0, 2)}) + "\n")
                log.flush()
            running = []
        if done % config.checkpoint_every == 0 or done == config.steps:
            if rank == 0:
                _save_checkpoint(out_dir, done, params, ema, optimizer, config)
            barrier()
    bar.close()
    if log:
        log.close()
    if ema is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ema[k])
    for m in modules.values():
        m.eval()
    return modules


def read_log(out_dir: str | Path) -> list[dict]:
    """The loss rows of a training log, one per logged step (resume markers dropped; a resumed run logs again
    the steps after its last checkpoint, and the rerun's row is the one kept)."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        return []
    latest = {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}
    return [latest[step] for step in sorted(latest)]
