"""Feature extractors and metrics: Fréchet distance on named features, zero-shot attribute accuracy.

Images enter every extractor as (N,3,H,W) floats in [-1, 1] (the pipeline's pixel convention).
A Fréchet distance is called "FID" only on Inception features; here it is named after its
features, e.g. "FD-embedded".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from baselines import data, models
from baselines.errors import FewstepError
from baselines.guidance import tokenize


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (float64), as the Fréchet distance needs them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: Tensor | np.ndarray) -> FeatureStats:
        """Stats of an (N, D) feature matrix."""
        f = np.asarray(features, dtype=np.float64)
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=f.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017); the trace of the
    matrix square root is the sum of sqrt of the eigenvalues of S_a S_b (real, >= 0 in exact maths)."""
    diff = a.mu - b.mu
    eig = np.linalg.eigvals(a.sigma @ b.sigma)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- extractors


def clip_image_embeds(clip, images: Tensor) -> Tensor:
    """Unit-norm projected CLIP image embeddings (independent of the transformers version's
    ``get_image_features`` return type)."""
    return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=images).pooler_output), dim=-1)


def clip_text_embeds(clip, input_ids: Tensor) -> Tensor:
    """Unit-norm projected CLIP text embeddings."""
    return F.normalize(clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output), dim=-1)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (per channel)."""
    k = _gaussian_kernel(sigma).to(images)
    c, r = images.shape[1], k.numel() // 2
    x = F.pad(images, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


_EDGE_BINS = torch.linspace(-3.0, 0.5, 15)


def _log_histogram(values: Tensor) -> Tensor:
    """Soft (linear-interpolated) histogram of log10 magnitudes per image, as fractions."""
    logv = torch.log10(values.flatten(1) + 1e-3).clamp(_EDGE_BINS[0], _EDGE_BINS[-1])
    pos = (logv - _EDGE_BINS[0]) / (_EDGE_BINS[1] - _EDGE_BINS[0])
    lo = pos.floor().long().clamp(max=len(_EDGE_BINS) - 2)
    frac = pos - lo
    hist = torch.zeros(values.shape[0], len(_EDGE_BINS), dtype=values.dtype)
    hist.scatter_add_(1, lo, 1 - frac)
    hist.scatter_add_(1, lo + 1, frac)
    return hist / logv.shape[1]


def low_level_features(images: Tensor) -> Tensor:
    """Statistics that see noise and blur: at two scales, histograms of log Laplacian and log
    gradient magnitudes (flat regions, edge sharpness, grain) and per-channel colour moments."""
    feats = []
    x = images.float().cpu()
    for scale in (1, 2):
        xs = F.avg_pool2d(x, scale) if scale > 1 else x
        grey = xs.mean(1, keepdim=True)
        lap = F.conv2d(
            F.pad(grey, (1, 1, 1, 1), mode="reflect"), torch.tensor([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]]).float()
        )
        gx = grey[..., :, 1:] - grey[..., :, :-1]
        gy = grey[..., 1:, :] - grey[..., :-1, :]
        grad = torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2)
        feats += [_log_histogram(lap.abs()), _log_histogram(grad)]
    feats += [x.mean((2, 3)), x.std((2, 3))]
    return torch.cat(feats, 1)


class EmbeddedEvaluator:
    """fewstep's embedded feature extractor: the trained embedded CLIP's image features (content:
    shape, colour, position) concatenated with low-level statistics (noise, blur), each feature
    standardised by its spread over a fixed held-out reference set so no block dominates."""

    name = "embedded"

    def __init__(self, clip_name: str = "shapes", reference_images: int = 2000, seed: int = 0):
        self.clip, _ = models.load_clip(clip_name)
        self.resolution = self.clip.config.vision_config.image_size
        ref = data.ShapesDataset(split="heldout", resolution=self.resolution, seed=seed)
        # indices from the end of the held-out split, disjoint from the sets evaluations use
        start = len(ref) - reference_images
        raw = self._raw(ref.batch(range(start, len(ref)))["pixel_values"])
        self.shift = raw.mean(0)
        self.scale = raw.std(0).clamp(min=1e-2)

    @torch.no_grad()
    def _raw(self, images: Tensor, batch_size: int = 500) -> Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if x.shape[-1] != self.resolution:
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
            emb = clip_image_embeds(self.clip, x)
            out.append(torch.cat([emb, low_level_features(x)], 1))
        return torch.cat(out)

    def __call__(self, images: Tensor) -> Tensor:
        """Features (N, D) of images in [-1, 1]."""
        return (self._raw(images) - self.shift) / self.scale


@lru_cache(maxsize=4)
def get_extractor(name: str):
    """A feature extractor by name: ``embedded`` (fewstep's own, on the shipped CLIP),
    ``embedded:<clip folder>`` (the same on another embedded CLIP) or ``clip:<folder or hub id>``."""
    if name == "embedded" or name.startswith("embedded:"):
        return EmbeddedEvaluator(clip_name=name.partition(":")[2] or "shapes")
    if name.startswith("clip:"):
        clip, _ = models.load_clip(name[5:])

        @torch.no_grad()
        def clip_features(images: Tensor) -> Tensor:
            return clip_image_embeds(clip, images)

        return clip_features
    if name == "inception":
        raise FewstepError(
            "the 'inception' extractor is not available yet in this version; use 'embedded' or 'clip:<folder>'"
        )
    raise FewstepError(
        f"unknown feature extractor {name!r}; choose 'embedded', 'clip:<folder or hub id>' or 'inception'"
    )


def metric_name(extractor: str) -> str:
    """'FID' on Inception features, otherwise 'FD-<features>'."""
    return "FID" if extractor == "inception" else f"FD-{extractor.split(':')[0]}"


# ----------------------------------------------------------------------------- attribute accuracy


@torch.no_grad()
def zero_shot_attributes(
    clip, tokenizer, images: Tensor, attributes: list[dict], keys=data.ATTRIBUTES, batch_size: int = 256
) -> dict[str, float]:
    """Zero-shot accuracy per attribute: for each image and attribute, CLIP picks among the
    captions that differ from the image's caption only in that attribute."""
    correct = {k: 0 for k in keys}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        emb = clip_image_embeds(clip, x)
        for i, attrs in enumerate(attributes[start : start + batch_size]):
            for key in keys:
                values = data.attribute_values(key, attrs)
                captions = [data.caption({**attrs, key: v}) for v in values]
                text = clip_text_embeds(clip, tokenize(tokenizer, captions))
                correct[key] += int(values[int((text @ emb[i]).argmax())] == attrs[key])
    return {k: correct[k] / len(images) for k in keys}
