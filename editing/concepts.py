"""A few images of one concept for textual inversion and DreamBooth: a folder of user images, or
shapes training images with given attributes; and the training prompts that name the concept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from baselines import data
from baselines.errors import ConfigError, FewstepError


@dataclass
class ConceptSource:
    """A few images of one concept: a folder of user images (prompts from ``template``), or the
    first ``num_images`` shapes training images whose attributes match ``concept``."""

    images: str | None = None
    template: str = "a photo of {}"
    concept: dict[str, str] = field(default_factory=dict)  # e.g. {colour: purple, shape: triangle}
    num_images: int = 4
    seed: int = 0


@dataclass
class ConceptImages:
    """Instance images (N,3,H,W) in [-1, 1] and, for shapes, their attributes."""

    pixels: Tensor
    attributes: list[dict] | None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def concept_images(source: ConceptSource, resolution: int, limit: int = 1_000_000) -> ConceptImages:
    """Load the concept's images; one-line ``FewstepError`` on a bad folder or concept."""
    if source.num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {source.num_images}")
    if source.images is not None:
        folder = Path(source.images)
        if not folder.is_dir():
            raise FewstepError(f"{folder} is not a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: source.num_images]
        if not files:
            raise FewstepError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if "{}" not in source.template:
            raise ConfigError(f"template {source.template!r} needs a {{}} where the token goes")
        return ConceptImages(torch.stack([data.load_image(p, resolution) for p in files]), None)
    bad = sorted(set(source.concept) - set(data.NOUN_PHRASE))
    if bad or not source.concept:
        raise ConfigError(f"concept must set some of {list(data.NOUN_PHRASE)}, got {dict(source.concept)}")
    for key, value in source.concept.items():
        if value not in data.attribute_values(key):
            raise ConfigError(f"concept.{key}: {value!r} is not one of {data.attribute_values(key)}")
    ds = data.ShapesDataset(split="train", resolution=resolution, seed=source.seed)
    pixels, attributes = [], []
    for index in range(limit):
        image, attrs = ds.sample(index)
        if all(attrs[k] == v for k, v in source.concept.items()):
            pixels.append(data.to_tensor(image))
            attributes.append({k: attrs[k] for k in data.ATTRIBUTES})
            if len(pixels) == source.num_images:
                return ConceptImages(torch.stack(pixels), attributes)
    raise ConfigError(f"found only {len(pixels)} shapes images with {dict(source.concept)}")


def concept_prompts(source: ConceptSource, images: ConceptImages, replace: list[str], phrase: str) -> list[str]:
    """One training prompt per concept image, with the concept words replaced by ``phrase``."""
    if images.attributes is None:
        return [source.template.format(phrase)] * len(images.pixels)
    return [data.caption(a, replace=replace, phrase=phrase) for a in images.attributes]
