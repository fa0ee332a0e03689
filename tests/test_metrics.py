import numpy as np
import pytest
import scipy.linalg
import torch

from baselines import data
from eval.metrics import FeatureStats, frechet_distance, gaussian_blur, low_level_features, metric_name


def _reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_the_scipy_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12))
    y = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    ours = frechet_distance(FeatureStats.of(x), FeatureStats.of(y))
    assert ours == pytest.approx(_reference_fd(x, y), rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(1).normal(size=(200, 8))
    assert abs(frechet_distance(FeatureStats.of(x), FeatureStats.of(x))) < 1e-8


def test_metric_is_named_after_its_features():
    assert metric_name("inception") == "FID"
    assert metric_name("embedded") == "FD-embedded"
    assert metric_name("clip:/some/folder") == "FD-clip"


def test_low_level_features_see_noise_and_blur():
    images = data.ShapesDataset(split="heldout").batch(range(200))["pixel_values"]
    other = data.ShapesDataset(split="heldout").batch(range(200, 400))["pixel_values"]
    spread = data.ShapesDataset(split="heldout").batch(range(400, 800))["pixel_values"]
    raw = low_level_features(spread)
    shift, scale = raw.mean(0), raw.std(0).clamp(min=1e-2)  # as EmbeddedEvaluator standardises
    g = torch.Generator().manual_seed(0)
    f = lambda x: ((low_level_features(x) - shift) / scale).numpy()  # noqa: E731
    ref = FeatureStats.of(f(images))
    base = frechet_distance(ref, FeatureStats.of(f(other)))
    noisy = (other + 0.1 * torch.randn(other.shape, generator=g)).clamp(-1, 1)
    assert frechet_distance(ref, FeatureStats.of(f(noisy))) > 10 * base
    assert frechet_distance(ref, FeatureStats.of(f(gaussian_blur(other, 1.0)))) > 10 * base


def test_gaussian_blur_preserves_constants():
    x = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)
