import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from baselines import data
from baselines.errors import FewstepError
from eval.metrics import (
    INCEPTION_WEIGHTS,
    FeatureStats,
    InceptionExtractor,
    LoadedCLIP,
    clip_image_similarity,
    clip_score,
    cmmd,
    frechet_bootstrap,
    frechet_distance,
    gaussian_blur,
    get_extractor,
    kid,
    low_level_features,
    lpips_distance,
    lpips_unavailable,
    metric_name,
    psnr,
    ssim,
)


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
    assert metric_name("inception") == "FID" and metric_name("inception:/weights/pt_inception.pth") == "FID"
    assert metric_name("embedded") == "FD-embedded"
    assert metric_name("clip:/some/folder") == "FD-clip"


def test_low_level_features_see_noise_blur_and_colour_permutation():
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
    assert frechet_distance(ref, FeatureStats.of(f(other[:, [2, 0, 1]]))) > 10 * base


def test_colour_histogram_counts_joint_rgb_cells():
    from eval.metrics import colour_histogram

    x = torch.full((2, 3, 4, 4), -1.0)  # black: cell (0, 0, 0)
    x[0, 0, :2] = 1.0  # top half red (3, 0, 0) -> cell 48
    x[1, :, :, :1] = 0.1  # first column grey (2, 2, 2) -> cell 42
    h = colour_histogram(x, bins=4)
    assert h.shape == (2, 64) and torch.allclose(h.sum(1), torch.ones(2))
    assert h[0, 0] == 0.5 and h[0, 48] == 0.5 and h[1, 0] == 0.75 and h[1, 42] == 0.25


def test_gaussian_blur_preserves_constants():
    x = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)


# ----------------------------------------------------------------------------- KID, CMMD, CLIP score, edits


def _kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.5
    mean, std = kid(x, y, subsets=1, subset_size=30)
    assert mean == pytest.approx(_kid_by_loops(x, y), rel=1e-9)
    assert std == 0
    assert kid(x, x + 1.0, subsets=3, subset_size=20)[0] > 10 * abs(kid(x[:15], x[15:], subsets=3, subset_size=15)[0])


def test_cmmd_matches_the_gaussian_kernel_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(9, 4)) * 2
    g = lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * 10.0**2))  # noqa: E731
    mean_k = lambda a, b: np.mean([g(u, v) for u in a for v in b])  # noqa: E731
    expected = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    assert cmmd(x, y) == pytest.approx(expected, rel=1e-9)
    assert cmmd(x, x) == pytest.approx(0, abs=1e-9)


@pytest.fixture(scope="module")
def tiny_clip():
    from baselines.models import build_clip, build_tokenizer, get_preset

    torch.manual_seed(0)
    tok = build_tokenizer()
    return LoadedCLIP(build_clip(get_preset("tiny"), tok).eval(), tok)


def test_clip_pixel_convention_comes_from_the_folder_never_a_silent_guess(tiny_clip, tmp_path):
    import json
    import shutil
    import warnings

    from baselines.models import CLIP_PIXELS_FILE, save_clip
    from eval.metrics import load_clip_model

    ours = save_clip(tiny_clip.model, tiny_clip.tokenizer, tmp_path / "ours")
    assert (ours / CLIP_PIXELS_FILE).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_clip_model(str(ours)).mean is None  # fewstep's: [-1, 1] as is
    other = shutil.copytree(ours, tmp_path / "other")
    (other / CLIP_PIXELS_FILE).unlink()
    with pytest.warns(UserWarning, match="neither preprocessor_config.json"):
        assert load_clip_model(str(other)).mean is None
    (other / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2] * 3}))
    loaded = load_clip_model(str(other))
    assert loaded.mean.tolist() == pytest.approx([0.4, 0.5, 0.6]) and loaded.std.tolist() == pytest.approx([0.2] * 3)


def test_clip_score_is_100_times_the_clamped_cosine(tiny_clip):
    images = data.ShapesDataset(split="heldout", resolution=16).batch(range(6))
    prompts = images["captions"][::-1]
    ours = clip_score(tiny_clip, images["pixel_values"], prompts)
    m = tiny_clip.model
    with torch.no_grad():
        ids = tiny_clip.tokenizer(
            prompts,
            padding="max_length",
            max_length=tiny_clip.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = m.text_projection(m.text_model(input_ids=ids).pooler_output)
        image = m.visual_projection(m.vision_model(pixel_values=images["pixel_values"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(ours, 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (ours >= 0).all() and ours.std() > 0


def test_clip_image_similarity_is_the_cosine_of_the_projected_embeddings(tiny_clip):
    """Against an independent cosine of the vision tower's projected pooled output, on pixels normalised by
    hand with a folder's mean/std (an OpenAI-convention CLIP); 1 for an image with itself."""
    shapes = data.ShapesDataset(split="heldout", resolution=16)
    a, b = shapes.batch(range(3))["pixel_values"], shapes.batch(range(3, 6))["pixel_values"]
    clip = LoadedCLIP(tiny_clip.model, tiny_clip.tokenizer, torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2] * 3))
    m = clip.model
    with torch.no_grad():

        def embed(x):
            size = m.config.vision_config.image_size
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
            pixels = ((x + 1) / 2 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.2
            return m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)

        expected = torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=-1)
    ours = clip_image_similarity(clip, a, b)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours < 0.9999).all()  # different images: not the trivial 1
    torch.testing.assert_close(clip_image_similarity(clip, a, a), torch.ones(3), rtol=0, atol=1e-5)


def test_psnr_and_ssim_with_explicit_data_range_and_mask():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g)
    b = a.clone()
    b[:, :, :, 8:] = (b[:, :, :, 8:] + 0.1).clamp(0, 1)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :8] = 1  # the unedited half
    mse = ((a - b) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(psnr(a, b, data_range=1.0), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(psnr(2 * a, 2 * b, data_range=2.0), psnr(a, b, data_range=1.0))
    assert torch.isinf(psnr(a, b, mask)).all()  # identical where mask == 1
    assert (ssim(a, b) < 1).all() and (ssim(a, b, mask) > ssim(a, b)).all()
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    mask[1] = 0  # image 1 keeps no pixel: nothing to score (it scored PSNR inf and SSIM 0)
    assert torch.isinf(psnr(a, b, mask)[0]) and torch.isnan(psnr(a, b, mask)[1])
    assert ssim(a, b, mask)[0] > 0.99 and torch.isnan(ssim(a, b, mask)[1])


def test_lpips_says_why_it_is_left_out(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reason = lpips_unavailable()
    assert reason is not None and reason.startswith("LPIPS left out:") and "\n" not in reason
    with pytest.raises(FewstepError, match="LPIPS left out"):
        lpips_distance(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_inception_without_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FewstepError, match=INCEPTION_WEIGHTS):
        InceptionExtractor()
    with pytest.raises(FewstepError, match="not found at /nonexistent/w.pth"):
        get_extractor("inception:/nonexistent/w.pth")


def test_fd_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    ref = FeatureStats.of(rng.normal(size=(4000, 4)))
    small, large = rng.normal(size=(100, 4)) + 0.3, rng.normal(size=(1600, 4)) + 0.3
    lo_s, hi_s = frechet_bootstrap(ref, small, rounds=100)
    lo_l, hi_l = frechet_bootstrap(ref, large, rounds=100)
    assert lo_l <= frechet_distance(ref, FeatureStats.of(large)) <= hi_l
    assert lo_s <= frechet_distance(ref, FeatureStats.of(small)) <= hi_s  # bias-corrected: holds at small n too
    assert hi_l - lo_l < (hi_s - lo_s) / 2


def test_zero_shot_attributes_real_images_vs_noise():
    """The shipped CLIP (the teacher's text encoder and the evaluator), trained by configs/teacher-shapes.yaml
    with shape and position hard negatives (97.1% shape, 99.6% colour, 100% background and position, 98.2%
    size over 1000 held-out images, BENCHMARKS.md), meets the foundation issue's goal (>= 95% shape and colour)
    on the first 500 held-out images (measured: 96.8% shape, 99.4% colour, 99.0% size, 100% background and
    position) and is at chance on noise."""
    from baselines.models import load_clip
    from eval.metrics import zero_shot_attributes

    clip, tok = load_clip("shapes")
    batch = data.ShapesDataset(split="heldout").batch(range(500))
    real = zero_shot_attributes(clip, tok, batch["pixel_values"], batch["attributes"])
    assert real["shape"] >= 0.95 and real["colour"] >= 0.95, real
    assert all(real[k] >= 0.98 for k in ("background", "position", "size")), real
    noise = torch.rand(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    at_noise = zero_shot_attributes(clip, tok, noise, batch["attributes"])
    chance = {"shape": 1 / 3, "colour": 1 / 7, "background": 1 / 7, "position": 1 / 5, "size": 1 / 2}
    assert all(abs(at_noise[k] - chance[k]) < 0.1 for k in chance), at_noise


def test_two_extractors_of_one_kind_get_distinct_names():
    sweep = ["embedded", "clip:/a/evaluator", "clip:openai/clip-vit-base-patch32", "inception"]
    names = [metric_name(e, sweep) for e in sweep]
    assert names == ["FD-embedded", "FD-clip(evaluator)", "FD-clip(clip-vit-base-patch32)", "FID"]
    assert metric_name("clip:/a/evaluator", ["clip:/a/evaluator", "embedded"]) == "FD-clip"  # the only clip
    same_folder_name = ["clip:/a/clip", "clip:/b/clip/"]
    assert [metric_name(e, same_folder_name) for e in same_folder_name] == ["FD-clip(/a/clip)", "FD-clip(/b/clip/)"]
    assert [metric_name(e, ["embedded", "embedded:/x/c"]) for e in ("embedded", "embedded:/x/c")] == [
        "FD-embedded", "FD-embedded(c)"
    ]  # fmt: skip


# ----------------------------------------------------------------------------- a CLIP trained in the fixture


def _tower(width: int, layers: int, heads: int, **kw) -> dict:
    return dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads, **kw
    )


@pytest.fixture(scope="module")
def fixture_trained_clip(tmp_path_factory):
    """A CLIP trained here through the one loop (``baselines.train.train`` on ``clip_contrastive_loss``, the
    train_clip stage's loss) on 16 px shapes: the ``tiny`` preset with 32-wide towers and a 2-layer vision tower
    (one layer cannot localise the shape, position stayed at chance), 1000 steps of 128 from a pre-rendered pool
    of 8192 training images (rendering every batch would double the time), one thread (as fast for this size;
    the result does not depend on the core count). ~35 s. The caption tokenizer is the shipped one: the BPE
    merges of ``build_tokenizer()`` tie-break differently from process to process, so word ids, and with them
    the trained model, changed between runs."""
    import dataclasses

    from transformers import CLIPTokenizer

    from baselines import models
    from baselines.guidance import tokenize
    from baselines.teacher import clip_contrastive_loss
    from baselines.train import TrainConfig, train

    preset = dataclasses.replace(
        models.get_preset("tiny"),
        clip_text=_tower(32, 1, 2),
        clip_vision=_tower(32, 2, 4, patch_size=4),
        projection_dim=32,
    )
    tok = CLIPTokenizer.from_pretrained(models.PACKAGED / "clip")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        clip = models.build_clip(preset, tok)
        size, batch_size = 8192, 128
        pool = data.ShapesDataset(split="train", resolution=preset.resolution).batch(range(size))
        pool["input_ids"] = tokenize(tok, pool["captions"])

        def batches(i: int) -> dict:
            idx = torch.arange(i * batch_size, (i + 1) * batch_size) % size
            return {
                "pixel_values": pool["pixel_values"][idx],
                "input_ids": pool["input_ids"][idx],
                "captions": [pool["captions"][j] for j in idx.tolist()],
            }

        def loss(batch, generator):
            return clip_contrastive_loss(clip, batch["pixel_values"], batch["input_ids"], batch["captions"])

        config = TrainConfig(
            steps=1000, batch_size=batch_size, lr=2e-3, warmup_steps=100, lr_schedule="cosine", log_every=100
        )
        train(
            loss=loss, modules={"clip": clip}, batches=batches, config=config, out_dir=tmp_path_factory.mktemp("clip")
        )
    finally:
        torch.set_num_threads(threads)
    return clip.eval(), tok


def test_zero_shot_attributes_of_a_fixture_trained_clip(fixture_trained_clip):
    """Zero-shot accuracy on 500 real held-out images is exact where the fixture's training converges, and at
    chance on noise. Measured on 1000 held-out images after 1000 steps (model seeds 0 / 1 / 2): background 100% /
    100% / 100%; colour 99.2 / 99.4 / 99.8% and size 99.4 / 99.6 / 99.7% (the misses are small triangles, ~2 px
    across at 16 px); position 98.5 / 92.4 / 96.9% (still rising: 28% at 250 steps, 78% at 500, 97% at 750);
    shape 59 / 59 / 60% (chance 33%; it stays there up to 3000 steps, where colour, position and size reach
    99.3-99.9%). So only background is asserted exact; colour, size and position get bounds under the
    measured values, shape only above chance. The shipped CLIP (32 px, shape hard negatives) is tested above."""
    from eval.metrics import zero_shot_attributes

    clip, tok = fixture_trained_clip
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(500))
    real = zero_shot_attributes(clip, tok, batch["pixel_values"], batch["attributes"])
    assert real["background"] == 1.0, real
    assert real["colour"] >= 0.98 and real["size"] >= 0.98 and real["position"] >= 0.9, real
    assert real["shape"] >= 0.5, real
    noise = torch.rand((300, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    at_noise = zero_shot_attributes(clip, tok, noise, batch["attributes"][:300])
    chance = {"shape": 1 / 3, "colour": 1 / 7, "background": 1 / 7, "position": 1 / 5, "size": 1 / 2}
    assert all(abs(at_noise[k] - chance[k]) < 0.1 for k in chance), at_noise


def test_zero_shot_correct_equals_one_image_at_a_time(fixture_trained_clip):
    """Encoding each distinct candidate caption once gives the choices of the direct computation: per image
    and attribute, encode that image's alternative captions and take the argmax (real and noisy images)."""
    from baselines.guidance import tokenize
    from eval.metrics import clip_image_embeds, clip_text_embeds, zero_shot_correct

    clip, tok = fixture_trained_clip
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(40))
    noisy = batch["pixel_values"][20:] + 0.7 * torch.randn((20, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    images = torch.cat([batch["pixel_values"][:20], noisy.clamp(-1, 1)])
    got = zero_shot_correct(clip, tok, images, batch["attributes"], batch_size=16)
    with torch.no_grad():
        for i, attrs in enumerate(batch["attributes"]):
            emb = clip_image_embeds(clip, images[i : i + 1])[0]
            for key in data.ATTRIBUTES:
                values = data.attribute_values(key, attrs)
                text = clip_text_embeds(clip, tokenize(tok, [data.caption({**attrs, key: v}) for v in values]))
                assert got[key][i] == (values[int((text @ emb).argmax())] == attrs[key]), (i, key)
    assert not all(all(v) for v in got.values())  # some misses: the comparison covers wrong picks too


# ----------------------------------------------------------------------------- CLIP score against torchmetrics


def _torchmetrics_clip_scores(clip: LoadedCLIP, pixels: Tensor, prompts: list[str], unwrap: bool) -> Tensor:
    """torchmetrics' CLIP score of each (image in [0, 255], prompt) pair on our model, through a real
    ``CLIPProcessor``: our tokenizer, and an image processor that maps [0, 255] to the embedded CLIPs' [-1, 1]
    ((x / 255 - 0.5) / 0.5, no resize or crop). One pair per call: torchmetrics clamps the batch mean at 0,
    fewstep each image's score. ``unwrap`` passes on ``pooler_output`` where transformers 5's
    ``get_*_features`` return a model output instead of the projected features torchmetrics expects."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip.tokenizer)
    processed = processor(images=list(pixels), return_tensors="pt")["pixel_values"]
    # both paths feed the vision tower the same pixels, so any difference is in the scoring itself
    torch.testing.assert_close(processed, clip.pixels(pixels / 127.5 - 1), rtol=0, atol=1e-6)

    class Unwrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            out = self.model.get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):
            out = self.model.get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    model = Unwrapped(clip.model) if unwrap else clip.model
    with torch.no_grad():
        return torch.stack([tm_clip_score(p, t, lambda: (model, processor)) for p, t in zip(pixels, prompts)])


def _scored_pairs():
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(6))
    return batch["pixel_values"], batch["captions"][::-1]


def test_clip_score_matches_torchmetrics(tiny_clip):
    """fewstep's CLIP score equals torchmetrics' on the same tiny CLIP wherever the installed versions agree."""
    import torchmetrics
    import transformers

    images, prompts = _scored_pairs()
    try:
        theirs = _torchmetrics_clip_scores(tiny_clip, (images + 1) * 127.5, prompts, unwrap=False)
    except AttributeError as e:
        if "'BaseModelOutputWithPooling' object has no attribute 'norm'" not in str(e):
            raise
        pytest.skip(f"torchmetrics {torchmetrics.__version__} with transformers {transformers.__version__}: {e}")
    torch.testing.assert_close(theirs, clip_score(tiny_clip, images, prompts), rtol=0, atol=1e-4)


def test_clip_score_matches_torchmetrics_maths_with_the_features_unwrapped(tiny_clip):
    """The same comparison where only transformers 5's return type is bridged (the projected features are its
    ``pooler_output``): torchmetrics' processor, normalisation and scaling against fewstep's."""
    images, prompts = _scored_pairs()
    theirs = _torchmetrics_clip_scores(tiny_clip, (images + 1) * 127.5, prompts, unwrap=True)
    ours = clip_score(tiny_clip, images, prompts)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert ours.std() > 1  # distinct scores, not one value compared six times
