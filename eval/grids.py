"""Labelled image grids (rows = prompts, columns = seeds or settings)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from baselines.data import to_uint8


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    rows: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    zoom: int = 3,
) -> Path:
    """Write (N,3,H,W) images in [0,1], row-major, as one PNG with optional text labels."""
    n, _, h, w = images.shape
    cols = (n + rows - 1) // rows
    tiles = [Image.fromarray(a).resize((w * zoom, h * zoom), Image.NEAREST) for a in to_uint8(images * 2 - 1)]
    left = 8 + 6 * max((len(s) for s in row_labels or []), default=0)
    top = 14 if col_labels else 0
    tw, th = w * zoom + 2, h * zoom + 2
    canvas = Image.new("RGB", (left + cols * tw, top + rows * th), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas.paste(tile, (left + c * tw, top + r * th))
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + r * th + th // 2 - 5), label, fill="black")
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * tw + 2, 2), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
