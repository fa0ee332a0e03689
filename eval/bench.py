"""``fewstep bench``: seconds per image of the sampling pipeline next to the raw cost of its U-Net
evaluations plus one VAE decode, measured in the same run on the same batch; overhead = pipeline / raw.

The raw cost is the pipeline's number of bare ``unet(latents, t, encoder_hidden_states)`` forwards on the
batch it feeds the U-Net (doubled under classifier-free guidance; with the guidance embedding for a
w-conditioned student), run back to back, plus ``vae.decode`` of the batch. Everything else the
pipeline does (text encoding, scheduler maths, latent preparation, post-processing) is overhead. The
prompt encoding (``prompt_states`` of the batch as ``generate`` does it, with the empty negative prompt
under CFG) is timed too, so the table also shows what remains of the overhead beyond it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from baselines import data, models
from baselines.errors import FewstepError
from baselines.guidance import get_guidance_scale_embedding, is_guidance_conditioned
from baselines.samplers import generate, prompt_states, resolve_defaults, unet_evaluations
from baselines.timing import Timer
from eval.sweep import model_specs

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def bench_device(name: str | torch.device | None = None) -> torch.device:
    """Where ``fewstep bench`` times: ``name`` (cpu, cuda, cuda:1, ...), by default a GPU when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FewstepError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise FewstepError(f"--device {name!r}: bench times the CPU or CUDA GPUs")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise FewstepError(f"--device {name!r}: no such CUDA device on this machine")
    return device


def _seconds(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()``, waiting for the device's queued kernels before and after (CUDA is asynchronous)."""
    with Timer(device) as timer:
        fn()
    return timer.seconds


@torch.no_grad()
def bare_work(pipe, prompts: list[str], guidance_scale: float, calls: int) -> tuple[Callable, Callable, Callable]:
    """Callables for the work a sampling call cannot avoid, on the batch the pipeline feeds its models:
    ``unet()`` runs ``calls`` bare U-Net forwards, ``vae()`` one decode, ``text()`` the prompt encoding
    as ``generate`` does it (with the empty negative prompt under CFG)."""
    conditioned = is_guidance_conditioned(pipe.unet)
    cfg = guidance_scale > 1 and not conditioned
    negatives = [""] * len(prompts)

    @torch.no_grad()
    def text() -> list[torch.Tensor]:
        return [prompt_states(pipe, p) for p in ([negatives, prompts] if cfg else [prompts])]

    states = torch.cat(text())
    device = pipe.unet.device
    size = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((len(states), pipe.unet.config.in_channels, size, size), generator=g).to(device)
    t = torch.tensor(pipe.scheduler.config.num_train_timesteps // 2, device=device)
    extra = {}
    if conditioned:
        w = torch.full((len(states),), guidance_scale - 1, device=device)
        extra["timestep_cond"] = get_guidance_scale_embedding(w, pipe.unet.config.time_cond_proj_dim)  # on w's device
    z = latents[: len(prompts)] / pipe.vae.config.scaling_factor

    @torch.no_grad()  # as the pipeline runs them (the closures run outside this function's no_grad)
    def unet() -> None:
        for _ in range(calls):
            pipe.unet(latents, t, encoder_hidden_states=states, **extra)

    @torch.no_grad()
    def vae() -> None:
        pipe.vae.decode(z)

    return unet, vae, text


def _repeat(run: Callable, work: tuple[Callable, ...], device: torch.device, *, pipeline_first: bool) -> tuple:
    """(pipeline, U-Net, VAE, text) seconds of one repeat."""
    if pipeline_first:
        pipeline = _seconds(run, device)
        return (pipeline, *(_seconds(fn, device) for fn in work))
    bare = tuple(_seconds(fn, device) for fn in work)
    return (_seconds(run, device), *bare)


def _ratio(timing: tuple[float, ...]) -> float:
    pipeline, unet_s, vae_s, _ = timing
    return pipeline / (unet_s + vae_s)


def bench_model(
    model: str,
    steps: list[int],
    *,
    name: str | None = None,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    repeats: int = 11,
    device: str | torch.device | None = None,
) -> list[dict]:
    """One row per step count: pipeline seconds per image, raw U-Net + VAE seconds per image, overhead.

    Each repeat times the pipeline and its bare work (U-Net calls, VAE decode, prompt encoding) back to
    back, alternating which goes first, so a change of machine speed between repeats cancels in that
    repeat's ratio; the row is the repeat with the median overhead ratio, and ``overhead_q1`` /
    ``overhead_q3`` are the quartiles of the repeats' ratios (their spread: how far one row's ratio is
    from noise). ``device``: default a GPU if any.
    """
    device = bench_device(device)
    pipe = models.load_pipeline(model, device=device)
    info = models.read_info(model)
    _, scale, sampler = resolve_defaults(pipe, info, steps=1, guidance_scale=guidance_scale, sampler=sampler)
    conditioned = is_guidance_conditioned(pipe.unet)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = data.ShapesDataset(split="heldout", resolution=res).batch(range(batch_size))["captions"]
    seeds = list(range(batch_size))
    rows = []
    for n in steps:

        def run(n: int = n) -> None:
            generate(
                pipe,
                prompts,
                seeds=seeds,
                sampler=sampler,
                num_inference_steps=n,
                guidance_scale=scale,
                batch_size=batch_size,
            )

        nfe = unet_evaluations(sampler=sampler, steps=n, guidance_scale=scale, guidance_conditioned=conditioned)
        calls = nfe // (2 if scale > 1 and not conditioned else 1)  # the CFG pair is one batched call
        work = bare_work(pipe, prompts, scale, calls)
        for fn in (run, *work):  # warm-up (scheduler set-up, allocator)
            fn()
        repeat = range(max(1, repeats))
        timed = sorted((_repeat(run, work, device, pipeline_first=i % 2 == 0) for i in repeat), key=_ratio)
        pipeline, unet_s, vae_s, text_s = timed[len(timed) // 2]
        raw = unet_s + vae_s
        q1, q3 = np.percentile([_ratio(t) for t in timed], [25, 75]).tolist()
        rows.append(
            {
                "model": name or str(model),
                "method": info.get("method", "pretrained"),
                "sampler": sampler,
                "steps": n,
                "guidance_scale": scale,
                "nfe": nfe,
                "batch_size": batch_size,
                "device": str(device),
                "seconds_per_image": pipeline / batch_size,
                "raw_seconds_per_image": raw / batch_size,
                "unet_ms_per_call": 1000 * unet_s / calls,
                "vae_decode_ms": 1000 * vae_s,
                "text_encoding_ms": 1000 * text_s,
                "overhead": pipeline / raw,
                "overhead_q1": q1,
                "overhead_q3": q3,
                "overhead_beyond_text": pipeline / (raw + text_s),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The bench rows as a markdown table."""
    head = (
        "| model | method | sampler | steps | s | nfe | s/image | raw U-Net+VAE s/image | U-Net ms/call "
        "| VAE ms | text enc. ms | overhead [quartiles] | beyond text enc. |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['sampler']} | {r['steps']} | {r['guidance_scale']:g} | {r['nfe']} "
            f"| {r['seconds_per_image']:.4f} | {r['raw_seconds_per_image']:.4f} | {r['unet_ms_per_call']:.1f} "
            f"| {r['vae_decode_ms']:.1f} | {r['text_encoding_ms']:.1f} "
            f"| {r['overhead']:.2f} [{r['overhead_q1']:.2f}, {r['overhead_q3']:.2f}] "
            f"| {r['overhead_beyond_text']:.2f} |"
        )
    return "\n".join(lines)


def write_section(path: str | Path, body: str) -> Path:
    """Replace the text between the bench markers in ``path`` (append a section with them if absent)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    block = f"{START}\n{body.rstrip()}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + f"## Sampling overhead (`fewstep bench`)\n\n{block}\n"
    path.write_text(text)
    return path


def run_bench(
    specs: list[str],
    steps: list[int],
    *,
    out: str | Path,
    sampler=None,
    guidance_scale=None,
    batch_size=8,
    repeats=11,
    device: str | None = None,
) -> list[dict]:
    """The ``fewstep bench`` verb: models given as ``path`` or ``name=path``; writes the table into ``out``."""
    if not specs:
        specs = ["shapes"]
    device = bench_device(device)  # a bad --device fails before any timing
    if not steps or min(steps) < 1:
        raise FewstepError("--steps needs step counts >= 1")
    rows = []
    for name, path in model_specs(specs).items():
        rows += bench_model(
            path,
            steps,
            name=name,
            sampler=sampler,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            repeats=repeats,
            device=device,
        )
    where = torch.device(rows[0]["device"] if rows else "cpu")
    on = torch.cuda.get_device_name(where) if where.type == "cuda" else f"{torch.get_num_threads()} torch thread(s)"
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {where} ({on}), batch {batch_size}, "
        f"{repeats} repeats, each timing the pipeline and its bare work back to back (alternating which goes "
        "first); each row is the repeat with the median ratio, [quartiles] of the repeats' ratios beside it. "
        "raw = the U-Net calls (bare forwards on the same batch, CFG pair batched) + one VAE decode; "
        "overhead = pipeline time / raw; beyond text enc. = pipeline time / (raw + the batch's "
        "prompt encoding).\n\n" + markdown_table(rows)
    )
    write_section(out, body)
    return rows
