"""The ``edit_eval`` stage: edit fidelity from editing stages' ``edits.jsonl``.

Each editing stage folder holds ``edits.jsonl``, one row per output image: ``method``, ``model``,
``input`` / ``output`` / ``mask`` PNG paths (mask may be null; white = the region the edit may change),
``prompt``, ``source_prompt``, ``param`` ({"strength": x} or {"eta": x}), ``steps``, ``nfe``,
``seconds``, ``target_attributes`` and ``input_attributes`` (dicts or null). Rows are grouped by
(method, model, param name, param value); each group gets PSNR (capped at 100 dB = identical) and SSIM
of output vs input (whole image, and over the unmasked region where a mask is given), LPIPS where
available, CLIP image similarity,
and zero-shot accuracy of the edited attributes (target values) and of the preserved ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from baselines import data
from baselines.errors import FewstepError
from baselines.train import stage_device
from eval import metrics as M
from eval.sweep import read_rows


@dataclass
class EditEvalStage:
    """Edit fidelity of one or more editing stages' outputs, written to ``edit_results.jsonl``."""

    kind: str = "edit_eval"
    edits: list[str] = field(default_factory=list)  # editing stage folders (each with edits.jsonl)
    clip: str = "shapes"  # CLIP for image similarity and attribute accuracy


def _png(path: str | Path, base: Path) -> torch.Tensor:
    """A PNG as (3,H,W) in [0, 1]; relative paths are taken from the edits.jsonl folder."""
    p = Path(path)
    p = p if p.is_absolute() or p.exists() else base / p
    if not p.is_file():
        raise FewstepError(f"edit image not found: {p}")
    with Image.open(p) as im:
        return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _mask(path: str | Path, base: Path) -> torch.Tensor:
    """The preserved region (1 where the edit mask is black) as (1,H,W)."""
    return (_png(path, base).mean(0, keepdim=True) < 0.5).float()


def _param(row: dict) -> tuple[str, float]:
    param = row.get("param") or {}
    if len(param) != 1:
        raise FewstepError(f"edits.jsonl row for {row.get('output')}: 'param' must hold one value, got {param}")
    ((name, value),) = param.items()
    return name, float(value)


def attribute_accuracy(clip: M.LoadedCLIP, outputs: torch.Tensor, rows: list[dict]) -> dict:
    """Zero-shot accuracy of the edited attributes (target != input value; all keys when the input's
    attributes are unknown) and of the preserved ones (target == input), over rows with target attributes."""
    idx = [i for i, r in enumerate(rows) if r.get("target_attributes")]
    if not idx:
        return {}
    targets = [rows[i]["target_attributes"] for i in idx]
    correct = M.zero_shot_correct(clip.model, clip.tokenizer, clip.pixels(outputs[idx] * 2 - 1), targets)
    edited, kept = [], []
    for j, i in enumerate(idx):
        source = rows[i].get("input_attributes") or {}
        for key in data.ATTRIBUTES:
            (kept if source.get(key) == targets[j][key] else edited).append(correct[key][j])
    out = {}
    if edited:
        out["target attribute accuracy"] = float(np.mean(edited))
    if kept:
        out["preserved attribute accuracy"] = float(np.mean(kept))
    return out


def group_metrics(clip: M.LoadedCLIP | None, rows: list[dict], base: list[Path]) -> dict:
    """Fidelity metrics of one (method, model, param) group of edits."""
    inputs = torch.stack([_png(r["input"], b) for r, b in zip(rows, base)])
    outputs = torch.stack([_png(r["output"], b) for r, b in zip(rows, base)])
    if inputs.shape != outputs.shape:
        raise FewstepError(f"edit inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} differ in size")
    out = {
        "PSNR": float(M.psnr(outputs, inputs, data_range=1.0).clamp(max=100).mean()),
        "SSIM": float(M.ssim(outputs, inputs, data_range=1.0).mean()),
    }
    keeps = {i: _mask(r["mask"], b) for i, (r, b) in enumerate(zip(rows, base)) if r.get("mask")}
    masked = [i for i, keep in keeps.items() if keep.any()]  # a mask repainting everything keeps nothing to score
    if masked:
        keep = torch.stack([keeps[i] for i in masked])
        out["PSNR unmasked"] = float(
            M.psnr(outputs[masked], inputs[masked], keep, data_range=1.0).clamp(max=100).mean()
        )
        out["SSIM unmasked"] = float(M.ssim(outputs[masked], inputs[masked], keep, data_range=1.0).mean())
    if M.lpips_unavailable() is None:
        out["LPIPS"] = float(M.lpips_distance(outputs * 2 - 1, inputs * 2 - 1).mean())
    if clip is not None:
        out["CLIP image similarity"] = float(M.clip_image_similarity(clip, outputs * 2 - 1, inputs * 2 - 1).mean())
        out.update(attribute_accuracy(clip, outputs, rows))
    return out


def run_edit_eval(cfg: EditEvalStage, out: Path, accelerator=None) -> list[dict]:
    """One row per (method, model, param name, param value) in ``<out>/edit_results.jsonl`` (rewritten)."""
    groups: dict[tuple, list[tuple[dict, Path]]] = {}
    for folder in map(Path, cfg.edits):
        path = folder / "edits.jsonl"
        if not path.is_file():
            raise FewstepError(f"{path} not found: an editing stage writes one row per output image there")
        for row in read_rows(path):
            groups.setdefault((row["method"], row["model"], *_param(row)), []).append((row, folder))
    lpips_note = M.lpips_unavailable()
    if lpips_note:
        print(lpips_note)
    clip = M.load_clip_model(cfg.clip, stage_device(accelerator)) if cfg.clip else None
    results = []
    for (method, model, pname, pvalue), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        rows, base = [m[0] for m in members], [m[1] for m in members]
        results.append(
            {
                "method": method,
                "model": model,
                "param": pname,
                "value": pvalue,
                "n": len(rows),
                **group_metrics(clip, rows, base),
                "nfe": float(np.mean([r.get("nfe", 0) for r in rows])),
                "seconds": float(np.mean([r.get("seconds", 0) for r in rows])),
                "steps": rows[0].get("steps"),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    if lpips_note:
        (out / "NOTES.txt").write_text(lpips_note + "\n")
    return results
