"""The ``report`` stage and ``fewstep report RUN``: ``report.md`` with tables, plots and image grids from
sweep folders (``results.jsonl``) and edit-evaluation folders (``edit_results.jsonl``)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from baselines.errors import FewstepError
from eval.sweep import SAMPLER_NAMES, read_rows

PER_CELL = ("CMMD", "CLIP score", "attribute accuracy", "seconds_per_image")
EDIT_METRICS = ("PSNR", "PSNR unmasked", "SSIM", "SSIM unmasked", "LPIPS", "CLIP image similarity")
EDIT_ACCURACY = ("target attribute accuracy", "preserved attribute accuracy")


@dataclass
class ReportStage:
    """Render ``report.md`` from sweep and edit-evaluation stage folders."""

    kind: str = "report"
    sweeps: list[str] = field(default_factory=list)
    edits: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # attribute_eval stage folders
    title: str = "fewstep report"


def fd_keys(rows: list[dict]) -> list[str]:
    """The Fréchet-distance columns of the rows ('FID', 'FD-<features>'), in the sweep's extractor order (the
    order a row holds them in); the first is the one the trade-off plot uses."""
    keys = (k for r in rows for k in r if (k == "FID" or k.startswith("FD-")) and not k.endswith("_ci95"))
    return list(dict.fromkeys(keys))


def distinct_lines(rows: list[dict]) -> list[dict]:
    """Rows of one label that come from more than one source (a sampler and the folder their model is in), or
    that would share a (label, guidance scale, steps) cell, get the sampler, then the folder, then the model
    name added to the label, each only where it tells them apart: two distillation chains of one method, or
    a student under two samplers, are separate lines even at disjoint step counts, and a chain of students
    (one folder per step count under one stage folder) stays one line."""
    rows = [dict(r) for r in rows]

    def folder(r: dict) -> str:
        return str(Path(r["path"]).parent) if r.get("path") else r["model"]

    for part in (
        lambda r: SAMPLER_NAMES.get(r["sampler"], r["sampler"]),
        lambda r: Path(r.get("path", "")).parent.name or r["model"],
        lambda r: r["model"],
    ):
        groups = defaultdict(list)
        for r in rows:
            groups[r["label"]].append(r)
        for label, group in groups.items():
            cells = Counter((r["guidance_scale"], r["steps"]) for r in group)
            sources = {(r["sampler"], folder(r)) for r in group}
            if (len(sources) > 1 or max(cells.values()) > 1) and len({part(r) for r in group}) > 1:
                for r in group:
                    r["label"] = f"{label} [{part(r)}]"
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def metric_tables(rows: list[dict]) -> str:
    """One markdown table per metric: rows = (line, guidance scale), columns = step counts."""
    kids = sorted({k for r in rows for k in r if k.startswith("KID") and not k.endswith("_std")})
    names = fd_keys(rows) + kids
    names += [m for m in PER_CELL if any(m in r for r in rows)]
    steps = sorted({r["steps"] for r in rows})
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["label"], r["guidance_scale"])][r["steps"]] = r
    text = []
    for name in names:
        text += [f"### {name}", "", "| line | guidance scale s | " + " | ".join(f"{s} steps" for s in steps) + " |"]
        text.append("|---|---|" + "---|" * len(steps))
        for (label, scale), by_steps in sorted(groups.items()):
            cells = []
            for s in steps:
                r = by_steps.get(s)
                if r is None or name not in r:
                    cells.append("")
                    continue
                ci = r.get(f"{name}_ci95")
                extra = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
                cells.append(f"{_fmt(r[name])}{extra} (nfe {r['nfe']})")
            text.append(f"| {label} | {scale:g} | " + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wide_range(values: list[float], ratio: float = 10.0) -> bool:
    """Whether positive ``values`` span more than ``ratio`` x, so a plot of them reads better on a log axis."""
    return bool(values) and min(values) > 0 and max(values) > ratio * min(values)


def plot_vs_nfe(rows: list[dict], metric: str, path: Path) -> Path:
    """Metric vs U-Net evaluations per image (log x), one line per (method line, guidance scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = defaultdict(list)
    for r in rows:
        if metric in r:
            groups[(r["label"], r["guidance_scale"])].append(r)
    multi = {label for (label, _), rs in groups.items() if len(rs) > 1}
    line_scales = {scale for (_, scale), rs in groups.items() if len(rs) > 1}
    for (label, scale), rs in sorted(groups.items()):
        if len(rs) == 1 and label in multi and scale not in line_scales:
            continue  # a lone trade-off cell of a line drawn at another scale, with no line at its own to compare
        rs.sort(key=lambda r: r["nfe"])
        x, y = [r["nfe"] for r in rs], [r[metric] for r in rs]
        ci = [r.get(f"{metric}_ci95") for r in rs]
        if len(rs) == 1 and label in multi:  # a comparison cell at another line's scale: a point with its interval
            err = [[y[0] - ci[0][0]], [ci[0][1] - y[0]]] if ci[0] else None
            ax.errorbar(x, y, yerr=err, fmt="s", capsize=3, label=f"{label}, s={scale:g}")
            continue
        (line,) = ax.plot(x, y, marker="o", label=f"{label}, s={scale:g}")
        if all(ci):  # the bootstrap band
            ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({r["nfe"] for rs in groups.values() for r in rs})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("U-Net evaluations per image (log)")
    values = [r[metric] for rs in groups.values() for r in rs]
    log_y = wide_range(values)
    if log_y:  # a 1-step sampler's FD in the 1000s would flatten every other line to the axis
        ax.set_yscale("log")
    ax.set_ylabel(f"{metric} (log)" if log_y else metric)
    ax.set_title(f"{metric} vs sampling cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list[dict], fd: str, path: Path) -> Path | None:
    """FD vs CLIP score over guidance scales at fixed steps (Meng et al. 2023, Fig. 4 style)."""
    groups = defaultdict(list)
    for r in rows:
        if fd in r and "CLIP score" in r:
            groups[(r["label"], r["steps"])].append(r)
    groups = {k: v for k, v in groups.items() if len({r["guidance_scale"] for r in v}) > 1}
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, steps), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["guidance_scale"])
        ax.plot([r["CLIP score"] for r in rs], [r[fd] for r in rs], marker="o", label=f"{label}, {steps} steps")
        for r in rs:
            ax.annotate(
                f"s={r['guidance_scale']:g}",
                (r["CLIP score"], r[fd]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("CLIP score")
    ax.set_ylabel(fd)
    ax.set_title(f"{fd} vs CLIP score over guidance scale")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_name(path) -> str:
    """A short model name: a pipeline folder's own name, or its stage's for ``<stage>/model``."""
    p = Path(str(path))
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def plot_edits(rows: list[dict], path: Path) -> Path:
    """Edit fidelity vs edit parameter (strength / eta): one panel per metric, one line per method."""
    metrics = [m for m in EDIT_METRICS + EDIT_ACCURACY if any(m in r for r in rows)]
    plt = _plt()
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["model"], r["param"])].append(r)
    colours = {key: f"C{i}" for i, key in enumerate(sorted(groups))}  # one colour per method in every panel
    for ax, m in zip(axes.flat, metrics):
        for (method, model, param), rs in sorted(groups.items()):
            rs = sorted((r for r in rs if m in r), key=lambda r: r["value"])
            if rs:
                label = f"{method} ({param}), {model_name(model)}"
                x, y = [r["value"] for r in rs], [r[m] for r in rs]
                ax.plot(x, y, marker="o", color=colours[(method, model, param)], label=label)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("strength / eta")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def combined_grid(rows: list[dict], sweep_dir: Path, path: Path) -> Path | None:
    """Stack the cells' grid strips (same prompts and seeds) into one labelled image."""
    strips = [(r, sweep_dir / r["grid"]) for r in rows if r.get("grid") and (sweep_dir / r["grid"]).is_file()]
    if not strips:
        return None
    images = [(f"{r['label']}, {r['steps']} steps, s={r['guidance_scale']:g}", Image.open(p)) for r, p in strips]
    left = 8 + 6 * max(len(t) for t, _ in images)
    width = left + max(im.width for _, im in images)
    canvas = Image.new("RGB", (width, sum(im.height for _, im in images)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for text, im in images:
        canvas.paste(im.convert("RGB"), (left, y))
        draw.text((4, y + im.height // 2 - 5), text, fill="black")
        y += im.height
    canvas.save(path)
    return path


def attribute_section(folder: Path, out: Path) -> list[str]:
    """Markdown for an ``attribute_eval`` folder: accuracy per attribute [95% interval], and the grids."""
    rows = read_rows(folder / "attribute_results.jsonl")
    if not rows:
        return []
    keys = list(rows[0]["accuracy"])
    lines = [f"## Attributes of generated images `{folder.name}`", ""]
    lines += [
        "Zero-shot attribute accuracy of images generated from held-out captions with the listed "
        "attributes set (and caption words replaced by a learned token or identifier); brackets: 95% "
        "Wilson interval.",
        "",
        "| entry | example prompt | n | steps | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['accuracy'][k]:.2f} [{r['interval'][k][0]:.2f}, {r['interval'][k][1]:.2f}]" for k in keys
        )
        lines.append(f"| {r['name']} | `{r['prompt_example']}` | {r['n_images']} | {r['steps']} | {cells} |")
    lines.append("")
    for r in rows:
        grid = folder / r["grid"]
        if grid.is_file():
            target = out / f"{folder.name}_{r['grid']}"
            target.write_bytes(grid.read_bytes())
            lines += [f"![{r['name']}]({target.name})", ""]
    return lines


def render_report(
    sweeps: list[Path], edits: list[Path], out: Path, title: str = "fewstep report", attributes: list[Path] = ()
) -> Path:
    """Write ``<out>/report.md`` and its PNGs; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    for sweep in map(Path, sweeps):
        rows = distinct_lines(read_rows(sweep / "results.jsonl"))
        if not rows:
            raise FewstepError(f"{sweep / 'results.jsonl'} has no rows: run the sweep first")
        tag = sweep.name
        fds = fd_keys(rows)
        fd = fds[0] if fds else None
        n = ", ".join(str(k) for k in sorted({r["n_images"] for r in rows}))
        lines += [f"## Sweep `{tag}` ({len(rows)} cells, {n} images per cell)", ""]
        lines += [
            "Same prompts and per-image seeds in every cell; s = guidance scale (diffusers; Meng et al. w = s - 1). "
            "nfe = U-Net evaluations per image (CFG counts double; "
            "a guidance-conditioned student one per step). FD cells show in brackets (and plots as a band) the "
            "95% bootstrap interval (generated set resampled, bias-corrected): gaps smaller than it are noise.",
            "",
        ]
        for metric in fds + ["CLIP score", "CMMD", "attribute accuracy"]:
            if any(metric in r for r in rows):
                slug = metric.replace(" ", "_").replace("/", "_")
                p = plot_vs_nfe(rows, metric, out / f"{tag}_{slug}_vs_nfe.png")
                lines += [f"![{metric} vs U-Net evaluations]({p.name})", ""]
        if fd:
            p = plot_tradeoff(rows, fd, out / f"{tag}_tradeoff.png")
            if p:
                lines += [f"![{fd} vs CLIP score over guidance]({p.name})", ""]
        lines += [metric_tables(rows), "### Images (first images of every cell; same prompts and seeds)", ""]
        by_group = defaultdict(list)
        for r in rows:
            by_group[r["model"]].append(r)
        for model, rs in sorted(by_group.items()):
            rs.sort(key=lambda r: (r["sampler"], r["guidance_scale"], r["steps"]))
            p = combined_grid(rs, sweep, out / f"{tag}_grid_{model}.png")
            if p:
                lines += [f"![{model}]({p.name})", ""]
    for folder in map(Path, edits):
        rows = read_rows(folder / "edit_results.jsonl")
        if not rows:
            continue
        lines += [f"## Edit fidelity `{folder.name}`", ""]
        note = folder / "NOTES.txt"
        if note.is_file():
            lines += [note.read_text().strip(), ""]
        p = plot_edits(rows, out / f"{folder.name}_edits.png")
        lines += [f"![edit fidelity]({p.name})", ""]
        cols = [m for m in EDIT_METRICS + EDIT_ACCURACY + ("nfe", "seconds") if any(m in r for r in rows)]
        lines += ["| method | model | param | n | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
        for r in rows:
            vals = " | ".join(_fmt(r.get(c)) for c in cols)
            lines.append(
                f"| {r['method']} | {model_name(r['model'])} | {r['param']}={r['value']:g} | {r['n']} | {vals} |"
            )
        lines.append("")
    for folder in map(Path, attributes):
        lines += attribute_section(folder, out)
    lines += stage_times_section(out.parent)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def stage_times_section(run_dir: Path) -> list[str]:
    """A table of the run folder's finished stages (from each ``stage.json``, in the order they finished) with
    their wall seconds and the total; [] when there are none."""
    done = []
    for path in Path(run_dir).glob("*/stage.json"):
        state = json.loads(path.read_text())
        if state.get("status") == "done" and "seconds" in state:
            done.append((path.stat().st_mtime, state))
    if not done:
        return []
    done.sort(key=lambda pair: pair[0])
    lines = ["## Stages and wall time", "", "| stage | kind | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['seconds']:.0f} |" for _, s in done]
    total = sum(s["seconds"] for _, s in done)
    lines += [
        f"| **total** | | **{total:.0f}** ({total / 60:.1f} min) |",
        "",
        "Seconds each finished stage ran, from its stage.json: a stage resumed or updated in place adds its runs'"
        " seconds (a killed run's own are lost); the whole command also spends a few seconds importing and planning.",
        "",
    ]
    return lines


def run_report(cfg: ReportStage, out: Path) -> Path:
    """The ``report`` stage."""
    return render_report(
        [Path(s) for s in cfg.sweeps], [Path(e) for e in cfg.edits], out, cfg.title, [Path(a) for a in cfg.attributes]
    )


def report_run_dir(run_dir: str | Path) -> Path:
    """``fewstep report RUN``: every stage folder of RUN with results.jsonl / edit_results.jsonl ->
    ``RUN/report/report.md``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FewstepError(f"run folder not found: {run_dir}")
    sweeps = sorted(p.parent for p in run_dir.glob("*/results.jsonl"))
    edits = sorted(p.parent for p in run_dir.glob("*/edit_results.jsonl"))
    attributes = sorted(p.parent for p in run_dir.glob("*/attribute_results.jsonl"))
    if not sweeps and not edits and not attributes:
        raise FewstepError(
            f"{run_dir} has no stage folder with results.jsonl, edit_results.jsonl or attribute_results.jsonl"
        )
    return render_report(sweeps, edits, run_dir / "report", f"fewstep report: {run_dir.name}", attributes)
