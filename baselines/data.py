"""Datasets: the embedded procedural ``shapes`` data and image+caption folders.

``shapes`` draws one coloured shape on a coloured background with a compositional caption,
e.g. "a large red triangle on a blue background, top left". Every image is a deterministic
function of (seed, split, index); position, size and colours are jittered continuously, so the
data is a distribution rather than a fixed set, and every image's attributes are known, which
is what lets evaluation measure prompt adherence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from baselines.errors import ConfigError, FewstepError

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (145, 60, 190),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
POSITIONS = {  # named anchor -> (x, y) centre as a fraction of the side
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
SIZES = {"small": (0.14, 0.20), "large": (0.26, 0.33)}  # radius range as a fraction of the side
ATTRIBUTES = ("shape", "colour", "background", "position", "size")
SPLITS = {"train": 0, "heldout": 1}
HELDOUT_SIZE = 10_000
_SUPERSAMPLE = 4
_COLOUR_JITTER = 12
_POSITION_JITTER = 0.06


NOUN_PHRASE = ("size", "colour", "shape")  # the caption words before "on a ... background"


def caption(attributes: dict, *, replace: tuple[str, ...] | list[str] = (), phrase: str = "") -> str:
    """The caption of a shapes image from its named attributes. The words of the ``replace``
    attributes (of size, colour, shape) become ``phrase``, placed where the first of them was: a
    learned token or a DreamBooth identifier ("a small <tok> on a blue background, top left")."""
    words, placed = [], False
    for key in NOUN_PHRASE:
        if key not in replace:
            words.append(attributes[key])
        elif not placed:
            words += [phrase] if phrase else []
            placed = True
    return f"a {' '.join(words)} on a {attributes['background']} background, {attributes['position']}"


def attribute_values(key: str, attributes: dict | None = None) -> list[str]:
    """All values an attribute can take (background excludes the shape colour and vice versa)."""
    values = {
        "shape": SHAPES,
        "colour": tuple(COLOURS),
        "background": tuple(COLOURS),
        "position": tuple(POSITIONS),
        "size": tuple(SIZES),
    }[key]
    if attributes is not None and key in ("colour", "background"):
        other = attributes["background" if key == "colour" else "colour"]
        values = tuple(v for v in values if v != other)
    return list(values)


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw the named attributes of one image."""
    colour, background = rng.choice(len(COLOURS), size=2, replace=False)
    names = list(COLOURS)
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": names[colour],
        "background": names[background],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
    }


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float):
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if shape == "square":
        h = 0.85 * r
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # apex up; inside = below both slanted edges and above the base
        top, base, half = cy - r, cy + 0.7 * r, 1.05 * r
        frac = (y - top) / (base - top)
        return (y <= base) & (frac >= 0) & (np.abs(x - cx) <= frac * half)
    raise FewstepError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(attributes: dict, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Render an anti-aliased HxWx3 uint8 image; returns it and the continuous geometry used."""
    lo, hi = SIZES[attributes["size"]]
    r = rng.uniform(lo, hi) * resolution
    ax, ay = POSITIONS[attributes["position"]]
    jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2) * resolution
    margin = 0.9 * r
    cx = float(np.clip(ax * resolution + jitter[0], margin, resolution - margin))
    cy = float(np.clip(ay * resolution + jitter[1], margin, resolution - margin))
    fg = np.array(COLOURS[attributes["colour"]], np.float32)
    bg = np.array(COLOURS[attributes["background"]], np.float32)
    fg = np.clip(fg + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3), 0, 255)
    bg = np.clip(bg + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3), 0, 255)
    n = resolution * _SUPERSAMPLE
    grid = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(grid, grid)
    mask = _shape_mask(attributes["shape"], x, y, cx, cy, r).astype(np.float32)
    coverage = mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean((1, 3))
    image = coverage[..., None] * fg + (1 - coverage[..., None]) * bg
    return np.round(image).astype(np.uint8), {"cx": cx / resolution, "cy": cy / resolution, "r": r / resolution}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1] (the Stable Diffusion pixel convention)."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Bx3xHxW float in [-1, 1] -> BxHxWx3 uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def stack_items(items: list[dict]) -> dict:
    """Stack dataset items into a batch: pixel_values (B,3,H,W), captions and attributes lists."""
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "attributes": [it["attributes"] for it in items],
    }


@dataclass(frozen=True)
class ShapesDataset(torch.utils.data.Dataset):
    """The embedded ``shapes`` dataset: item i of a split is the same image for a given seed.

    ``train`` is unlimited (any non-negative index); ``heldout`` is a fixed set of
    ``HELDOUT_SIZE`` images drawn from a separate random stream.
    """

    split: str = "train"
    resolution: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise FewstepError(f"unknown split {self.split!r}; choose one of {list(SPLITS)}")
        if self.resolution < 8:
            raise FewstepError(f"resolution must be >= 8, got {self.resolution}")

    def __len__(self) -> int:
        return HELDOUT_SIZE if self.split == "heldout" else 2**31 - 1

    def sample(self, index: int) -> tuple[np.ndarray, dict]:
        """The uint8 image and attributes (named and continuous) of item ``index``."""
        rng = self._rng(index)
        attributes = sample_attributes(rng)
        image, geometry = render(attributes, self.resolution, rng)
        return image, {**attributes, **geometry}

    def attributes_of(self, index: int) -> dict:
        """The named attributes of item ``index`` without rendering its image."""
        return sample_attributes(self._rng(index))

    def _rng(self, index: int) -> np.random.Generator:
        """The random stream of item ``index``: its split's own, from (seed, split, index)."""
        if not 0 <= int(index) < len(self):
            raise IndexError(f"shapes {self.split} split has items 0..{len(self) - 1}, asked for {index}")
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

    def attributes_with(self, fixed: dict, n: int) -> list[dict]:
        """Named attributes of the first ``n`` items (from index 0) with ``fixed`` set on top, skipping any that
        would put a shape on a background of its own colour (an image the dataset never draws)."""
        out, index = [], 0
        while len(out) < n:
            attributes = {**self.attributes_of(index), **fixed}
            index += 1
            if attributes["colour"] != attributes["background"]:
                out.append(attributes)
        return out

    def caption_of(self, index: int) -> str:
        """The caption of item ``index`` without rendering its image."""
        return caption(self.attributes_of(index))

    def __getitem__(self, index: int) -> dict:
        image, attributes = self.sample(index)
        return {"pixel_values": to_tensor(image), "caption": caption(attributes), "attributes": attributes}

    def batch(self, indices) -> dict:
        """Stack items into a batch: pixel_values (B,3,H,W), captions and attributes lists."""
        return stack_items([self[int(i)] for i in indices])


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Read any PIL-readable image as RGB (turned upright by its EXIF orientation, as a viewer shows it;
    greyscale is replicated, 16-bit greyscale scaled to 8 bits, alpha dropped over black), resize its shorter
    side to ``resolution`` and centre-crop; returns 3xHxW in [-1, 1]."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # PIL's convert("RGB") clips these at 255: white
                im = Image.fromarray((np.asarray(im, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(canvas, im)
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FewstepError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FewstepError(f"cannot read {path} as an image ({e.__class__.__name__})") from None
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return to_tensor(np.array(im, dtype=np.uint8))


@dataclass(frozen=True)
class CaptionFolderDataset(torch.utils.data.Dataset):
    """Images with captions in the Hugging Face imagefolder convention: a ``metadata.jsonl``
    whose rows hold ``file_name`` and ``text``; images resized and centre-cropped."""

    root: str
    resolution: int = 32

    def __post_init__(self):
        meta = Path(self.root) / "metadata.jsonl"
        if not meta.is_file():
            raise FewstepError(f"{meta} not found: a caption folder needs metadata.jsonl with file_name and text")
        rows = []
        for i, line in enumerate(meta.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FewstepError(f"{meta} line {i + 1} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                raise FewstepError(f"{meta} line {i + 1} needs both 'file_name' and 'text'")
            rows.append(row)
        if not rows:
            raise FewstepError(f"{meta} lists no images")
        object.__setattr__(self, "rows", rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index % len(self.rows)]
        image = load_image(Path(self.root) / row["file_name"], self.resolution)
        return {"pixel_values": image, "caption": row["text"], "attributes": row.get("attributes", {})}

    def batch(self, indices) -> dict:
        """Stack items into a batch: pixel_values (B,3,H,W), captions and attributes lists."""
        return stack_items([self[int(i)] for i in indices])


def check_heldout_count(key: str, n: int, least: int, most: int) -> None:
    """A count of held-out shapes images a stage reads: a one-line error beyond the fixed held-out set."""
    if not least <= n <= most:
        raise ConfigError(f"{key} must be in [{least}, {most}] (the held-out split has {HELDOUT_SIZE}), got {n}")


def make_dataset(name: str, *, split: str = "train", resolution: int = 32, seed: int = 0):
    """A dataset by name: ``shapes`` or the path of a caption folder. A caption folder is one set whatever the
    ``split``: evaluating on the folder a model was fine-tuned on measures it against its own training images."""
    if name == "shapes":
        return ShapesDataset(split=split, resolution=resolution, seed=seed)
    if Path(name).is_dir():
        return CaptionFolderDataset(root=name, resolution=resolution)
    raise FewstepError(f"dataset {name!r} is neither 'shapes' nor a folder with metadata.jsonl")
