"""Feature extractors and metrics: Fréchet distance on named features, zero-shot attribute accuracy.

Images enter every extractor as (N,3,H,W) floats in [-1, 1] (the pipeline's pixel convention).
A Fréchet distance is called "FID" only on Inception features; here it is named after its
features, e.g. "FD-embedded".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
    ``get_image_features`` return type), computed on the CLIP's device and returned on the CPU."""
    return models.clip_embeds(clip, pixel_values=images.to(clip.device)).float().cpu()


def clip_text_embeds(clip, input_ids: Tensor) -> Tensor:
    """Unit-norm projected CLIP text embeddings, computed on the CLIP's device and returned on the CPU."""
    return models.clip_embeds(clip, input_ids=input_ids.to(clip.device)).float().cpu()


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


# log10 magnitude bins; everything below 10^-1.4 (~5/255 of the [-1, 1] range, below what the eye sees)
# counts as flat, so a VAE decoder's imperceptible texture does not swamp the distance (with a floor
# of 10^-3 the VAE reconstruction of real images scored FD ~6800 and step counts ranked backwards).
_EDGE_BINS = torch.linspace(-1.4, 0.5, 15)


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
    """Statistics that see noise, blur and colour: at two scales, histograms of log Laplacian and
    log gradient magnitudes (flat regions, edge sharpness, grain); per-channel colour moments and a
    joint RGB histogram."""
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
    feats += [x.mean((2, 3)), x.std((2, 3)), colour_histogram(x)]
    return torch.cat(feats, 1)


def colour_histogram(images: Tensor, bins: int = 4) -> Tensor:
    """Fraction of each image's pixels in each of ``bins``^3 joint RGB cells: sees colours the data
    never has (a channel permutation, a colour cast), which per-channel moments and CLIP's colour
    names average away."""
    q = ((images.float().clamp(-1, 1) + 1) / 2 * bins).long().clamp(max=bins - 1)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = torch.stack([torch.bincount(c.flatten(), minlength=bins**3) for c in cell])
    return counts.float() / cell[0].numel()


class EmbeddedEvaluator:
    """fewstep's embedded feature extractor: the trained embedded CLIP's image features (content:
    shape, colour, position) concatenated with low-level statistics (noise, blur), each feature
    standardised by its spread over a fixed held-out reference set so no block dominates."""

    name = "embedded"

    def __init__(self, clip_name: str = "shapes", reference_images: int = 2000, seed: int = 0, device=None):
        self.clip, _ = models.load_clip(clip_name)
        self.clip.to(device or "cpu")  # its features come back to the CPU, beside the low-level statistics
        self.resolution = self.clip.config.vision_config.image_size
        ref = data.ShapesDataset(split="heldout", resolution=self.resolution, seed=seed)
        # indices from the end of the held-out split, disjoint from the sets evaluations use
        start = len(ref) - reference_images
        raw = self._raw(ref.batch(range(start, len(ref)))["pixel_values"])
        self.shift = raw.mean(0)
        self.scale = raw.std(0).clamp(min=1e-2)

    @torch.no_grad()
    def _raw(self, images: Tensor, batch_size: int = 500) -> Tensor:
        def features(x: Tensor) -> Tensor:
            if x.shape[-1] != self.resolution:
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
            return torch.cat([clip_image_embeds(self.clip, x), low_level_features(x)], 1)

        return _in_batches(features, images, batch_size)

    def __call__(self, images: Tensor) -> Tensor:
        """Features (N, D) of images in [-1, 1]."""
        return (self._raw(images) - self.shift) / self.scale


def get_extractor(name: str, device: str | torch.device | None = None):
    """A feature extractor by name: ``embedded`` (fewstep's own, on the shipped CLIP),
    ``embedded:<clip folder>`` (the same on another embedded CLIP), ``clip:<folder or hub id>``, or
    ``inception`` / ``inception:<weights file>`` (torch-fidelity's InceptionV3, the network FID is defined on).
    Its network runs on ``device`` (default the CPU); the features it returns are on the CPU. Built once per
    (name, device) in a process."""
    return _extractor(name, str(torch.device(device or "cpu")))


@lru_cache(maxsize=4)
def _extractor(name: str, device: str):
    if name == "embedded" or name.startswith("embedded:"):
        return EmbeddedEvaluator(clip_name=name.partition(":")[2] or "shapes", device=device)
    if name.startswith("clip:"):
        clip = load_clip_model(name[5:], device=device)

        @torch.no_grad()
        def clip_features(images: Tensor) -> Tensor:
            return clip.image_embeds(images)

        return clip_features
    if name == "inception" or name.startswith("inception:"):
        return InceptionExtractor(name.partition(":")[2] or None, device=device)
    raise FewstepError(
        f"unknown feature extractor {name!r}; choose 'embedded', 'clip:<folder or hub id>' or 'inception'"
    )


def metric_name(extractor: str, extractors: Sequence[str] = ()) -> str:
    """'FID' on Inception features, otherwise 'FD-<features>'; when ``extractors`` (all of a sweep's) holds
    another extractor of the same kind, an extractor with an argument is told apart by its folder name,
    'FD-clip(<folder>)' (by the whole argument if two folders share a name)."""
    kind, _, arg = extractor.partition(":")
    if kind == "inception":
        return "FID"
    others = [e.partition(":")[2] for e in dict.fromkeys(extractors) if e != extractor and e.partition(":")[0] == kind]
    if not arg or not others:
        return f"FD-{kind}"
    label = Path(arg.rstrip("/")).name or arg
    if any(Path(o.rstrip("/")).name == label for o in others):
        label = arg
    return f"FD-{kind}({label})"


# ----------------------------------------------------------------------------- attribute accuracy


def _in_batches(fn, items, batch_size: int) -> Tensor:
    return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


@torch.no_grad()
def zero_shot_correct(
    clip, tokenizer, images: Tensor, attributes: list[dict], keys=data.ATTRIBUTES, batch_size: int = 256
) -> dict[str, list[bool]]:
    """Per image and attribute, whether CLIP picks ``attributes[i][key]`` among the captions that
    differ from the image's caption only in that attribute. Each distinct candidate caption is
    encoded once (images share most of their alternatives)."""
    alternatives = [{key: data.attribute_values(key, attrs) for key in keys} for attrs in attributes]
    candidates = [
        {key: [data.caption({**attrs, key: v}) for v in values] for key, values in alts.items()}
        for attrs, alts in zip(attributes, alternatives)
    ]
    captions = list(dict.fromkeys(c for row in candidates for texts in row.values() for c in texts))
    row_of = {c: i for i, c in enumerate(captions)}
    text = _in_batches(lambda c: clip_text_embeds(clip, tokenize(tokenizer, c)), captions, batch_size)
    emb = _in_batches(lambda x: clip_image_embeds(clip, x), images, batch_size)
    correct: dict[str, list[bool]] = {k: [] for k in keys}
    for i, (attrs, alts, row) in enumerate(zip(attributes, alternatives, candidates)):
        for key, values in alts.items():
            scores = text[torch.tensor([row_of[c] for c in row[key]])] @ emb[i]
            correct[key].append(values[int(scores.argmax())] == attrs[key])
    return correct


def zero_shot_attributes(
    clip, tokenizer, images: Tensor, attributes: list[dict], keys=data.ATTRIBUTES, batch_size: int = 256
) -> dict[str, float]:
    """Zero-shot accuracy per attribute: for each image and attribute, CLIP picks among the
    captions that differ from the image's caption only in that attribute."""
    correct = zero_shot_correct(clip, tokenizer, images, attributes, keys, batch_size)
    return {k: sum(v) / len(images) for k, v in correct.items()}


# ----------------------------------------------------------------------------- CLIP with its pixel convention


@dataclass
class LoadedCLIP:
    """A CLIP with the pixel convention it was trained on: a folder with ``preprocessor_config.json``
    (OpenAI/open CLIPs) takes [0, 1] pixels normalised by its mean/std; fewstep's embedded CLIPs take
    [-1, 1] pixels. Images are resized (bicubic, antialiased) to its ``image_size``."""

    model: object
    tokenizer: object
    mean: Tensor | None = None
    std: Tensor | None = None

    @property
    def size(self) -> int:
        """The vision tower's input side."""
        return self.model.config.vision_config.image_size

    def pixels(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the model's pixel_values."""
        x = images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size,) * 2, mode="bicubic", antialias=True, align_corners=False)
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean.to(x).view(1, -1, 1, 1)) / self.std.to(x).view(1, -1, 1, 1)
        return x

    @torch.no_grad()
    def image_embeds(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Unit-norm image embeddings of images in [-1, 1]."""
        return _in_batches(lambda x: clip_image_embeds(self.model, self.pixels(x)), images, batch_size)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        """Unit-norm text embeddings (tokenised as the Stable Diffusion pipeline does)."""
        return clip_text_embeds(self.model, tokenize(self.tokenizer, prompts))


def load_clip_model(name: str, device=None) -> LoadedCLIP:
    """``baselines.models.load_clip`` (on ``device``, default the CPU) plus the pixel convention: a folder's
    ``preprocessor_config.json`` mean/std; a hub id's from the hub cache, else OpenAI's (with a warning);
    fewstep's own CLIPs (``shapes``, or a folder ``save_clip`` marked) take [-1, 1]. A folder with neither file
    is read as fewstep's, with a warning: a CLIP trained elsewhere needs its ``preprocessor_config.json``."""
    import json
    import warnings

    clip, tokenizer = models.load_clip(name)
    clip.to(device or "cpu")
    folder = Path(name)
    if name == "shapes" or (folder / models.CLIP_PIXELS_FILE).is_file():
        return LoadedCLIP(clip, tokenizer)
    pre = folder / "preprocessor_config.json"
    if not folder.exists():
        try:  # a hub id: the processor config sits in the hub cache beside the weights
            from huggingface_hub import hf_hub_download

            pre = Path(hf_hub_download(name, "preprocessor_config.json"))
        except Exception as e:
            warnings.warn(
                f"{name}: no preprocessor_config.json in the hub cache ({e.__class__.__name__}); "
                "normalising pixels with OpenAI CLIP's mean/std",
                stacklevel=2,
            )
            return LoadedCLIP(clip, tokenizer, torch.tensor(_OPENAI_MEAN), torch.tensor(_OPENAI_STD))
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        return LoadedCLIP(clip, tokenizer, torch.tensor(cfg["image_mean"]), torch.tensor(cfg["image_std"]))
    warnings.warn(
        f"{name} has neither preprocessor_config.json nor {models.CLIP_PIXELS_FILE}: reading it as a fewstep "
        "CLIP (pixels in [-1, 1]); a CLIP trained elsewhere needs its preprocessor_config.json (image_mean/std)",
        stacklevel=2,
    )
    return LoadedCLIP(clip, tokenizer)


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score(clip: LoadedCLIP, images: Tensor, prompts: list[str], batch_size: int = 256) -> Tensor:
    """Per-image CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021's clamp per
    image; torchmetrics clamps the batch mean instead, the same whenever every cosine is positive)."""
    scores = []
    for i in range(0, len(images), batch_size):
        img = clip.image_embeds(images[i : i + batch_size])
        txt = clip.text_embeds(prompts[i : i + batch_size])
        scores.append(100 * (img * txt).sum(-1).clamp(min=0))
    return torch.cat(scores)


def clip_image_similarity(clip: LoadedCLIP, a: Tensor, b: Tensor) -> Tensor:
    """Per-pair cosine similarity of CLIP image embeddings (edit fidelity: input vs output)."""
    return (clip.image_embeds(a) * clip.image_embeds(b)).sum(-1)


# ----------------------------------------------------------------------------- Inception (FID)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class InceptionExtractor:
    """torch-fidelity's InceptionV3 (2048-d pool features, the network FID is defined on), through
    torchmetrics' ``NoTrainInceptionV3``; weights from a given file, ``$FEWSTEP_INCEPTION_WEIGHTS`` or
    the torch hub cache. Images are resized with the TF1-style bilinear resize of the reference code."""

    name = "inception"

    def __init__(self, weights: str | None = None, device=None):
        from pathlib import Path

        path = Path(weights or os.environ.get("FEWSTEP_INCEPTION_WEIGHTS") or inception_weights_default())
        if not path.is_file():
            raise FewstepError(
                f"the 'inception' extractor needs torch-fidelity's weights file {INCEPTION_WEIGHTS}: not found at "
                f"{path}; download it once (github.com/toshas/torch-fidelity releases v0.2.0) and put it there, "
                "set FEWSTEP_INCEPTION_WEIGHTS, or use extractor 'inception:<file>'"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(path),
                antialias=False,
            ).to(device or "cpu")
        except ModuleNotFoundError as e:
            raise FewstepError(
                f"the 'inception' extractor needs torch-fidelity: pip install torch-fidelity ({e})"
            ) from None

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """2048-d features of images in [-1, 1] (quantised to uint8 first, as FID implementations do)."""

        def features(x: Tensor) -> Tensor:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return self.net(x.to(next(self.net.parameters()).device)).reshape(len(x), -1).double().cpu()

        return _in_batches(features, images, batch_size)


def inception_weights_default() -> str:
    """Where the Inception weights are looked for: the torch hub checkpoints folder."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)


# ----------------------------------------------------------------------------- KID, CMMD, bootstrap


def kid(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel
    k(a, b) = (a.b / d + coef0)^degree, averaged over random subsets; returns (mean, std over subsets). A set
    no larger than ``subset_size`` is used whole in every subset, so the std then reflects only the other set's
    draws: it is not a confidence interval (the sweep's bootstrap interval on FD is)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    values = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((u @ v.T / d + coef0) ** degree for u, v in ((a, a), (b, b), (a, b)))
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def cmmd(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE
) -> float:
    """CMMD (Jayasumana et al. 2024): scale * MMD^2 with the Gaussian kernel exp(-|a-b|^2 / (2 sigma^2)) on
    CLIP embeddings, the (biased) all-pairs estimator of their reference code (sigma 10, scale 1000)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    gamma = 1 / (2 * sigma**2)

    def k(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-gamma * sq).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


def frechet_bootstrap(
    ref: FeatureStats, features: Tensor | np.ndarray, *, rounds: int = 50, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval of the Fréchet distance: the generated features are
    resampled with replacement (the reference statistics, from a larger fixed set, are held fixed) and the
    interval is shifted by the bootstrap bias estimate mean(FD*) - FD (Efron & Tibshirani 1993, ch. 10):
    resampling duplicates points, which inflates FD by about as much as the interval is wide at small FD."""
    f = np.asarray(features, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = [frechet_distance(ref, FeatureStats.of(f[rng.integers(0, len(f), len(f))])) for _ in range(rounds)]
    bias = float(np.mean(values)) - frechet_distance(ref, FeatureStats.of(f))
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo - bias), float(hi - bias)


# ----------------------------------------------------------------------------- pixel fidelity (edits)


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB of images with values spanning ``data_range``; with a (N,1,H,W) mask in {0,1},
    over the pixels where mask == 1 only (NaN for an image whose mask has none)."""
    if mask is None:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        return peak_signal_noise_ratio(a, b, data_range=data_range, reduction="none", dim=(1, 2, 3))
    w = mask.expand_as(a).float()
    mse = ((a - b) ** 2 * w).sum((1, 2, 3)) / w.sum((1, 2, 3))  # 0 / 0 = NaN: no pixel to compare
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, *, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004; torchmetrics, Gaussian window 11, sigma 1.5); with a mask, the SSIM
    map averaged over the pixels where mask == 1 (NaN for an image whose mask has none)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if mask is None:
        return structural_similarity_index_measure(a, b, data_range=data_range, reduction="none")
    _, full = structural_similarity_index_measure(a, b, data_range=data_range, reduction="none", return_full_image=True)
    w = mask.expand_as(full).float()
    return (full * w).sum((1, 2, 3)) / w.sum((1, 2, 3))


LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here (None when it can): it needs the ``lpips`` package and its AlexNet
    backbone weights in the torch hub cache; fewstep never runs it with random weights."""
    try:
        import lpips  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to import beside this torch
        return f"LPIPS left out: the lpips package does not import ({e.__class__.__name__}: {str(e)[:80]})"
    path = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONE)
    if not os.path.isfile(path):
        return f"LPIPS left out: its AlexNet backbone weights are not at {path}"
    return None


@lru_cache(maxsize=1)
def _lpips_net():
    import lpips

    return lpips.LPIPS(net="alex", pretrained=True, verbose=False).eval()


@torch.no_grad()
def lpips_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-image LPIPS (Zhang et al. 2018, AlexNet) of images in [-1, 1]; raises when unavailable."""
    reason = lpips_unavailable()
    if reason:
        raise FewstepError(reason)
    return _lpips_net()(a.float(), b.float()).flatten()
