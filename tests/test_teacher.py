"""The teacher chain's own maths on stubs: the VAE scaling factor."""

from types import SimpleNamespace

import pytest
import torch

from baselines.teacher import measure_scaling_factor


def test_scaling_factor_is_one_over_the_std_of_posterior_mean_latents():
    """Latents of std ~2 give a factor ~0.5, exactly 1 / std over every batch together (not the std itself, and
    not the mean of per-batch values)."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(10, 4, 3, 3, generator=g) + 0.3

    class StubVAE:
        device = torch.device("cpu")

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=means[x[:, 0, 0, 0].long()]))

    dataset = SimpleNamespace(batch=lambda idx: {"pixel_values": torch.tensor(list(idx)).float()[:, None, None, None]})
    factor = measure_scaling_factor(StubVAE(), dataset, n=10, batch_size=4)
    assert factor == float(1.0 / means.std())
    assert abs(factor - 0.5) < 0.1


def test_cfg_training_loss_drops_captions_to_the_pipelines_empty_prompt_states(tiny_pipe):
    """The classifier-free-guidance dropout replaces a caption's states by exactly those the stock pipeline
    uses for the empty negative prompt at sampling time; kept rows are the caption's own states."""
    from baselines.guidance import UNetDenoiser
    from baselines.teacher import cfg_training_loss

    denoiser = UNetDenoiser.from_pipeline(tiny_pipe)
    seen = []
    forward = denoiser.forward
    denoiser.forward = lambda z, t, text, **kw: seen.append(text.clone()) or forward(z, t, text, **kw)
    caption = "a small red circle on a blue background, top left"
    h, c = tiny_pipe.unet.config.sample_size, tiny_pipe.unet.config.in_channels
    cache = {"mean": torch.zeros(16, c, h, h), "std": torch.ones(16, c, h, h), "captions": [caption] * 16}
    batches, loss = cfg_training_loss(
        denoiser=denoiser,
        cache=cache,
        scaling_factor=1.0,
        tokenizer=tiny_pipe.tokenizer,
        text_encoder=tiny_pipe.text_encoder,
        batch_size=16,
        cond_dropout=0.5,
    )
    loss(batches(0), torch.Generator().manual_seed(0))
    cond, uncond = tiny_pipe.encode_prompt(caption, "cpu", 1, True, negative_prompt="")
    dropped = [torch.equal(row, uncond[0]) for row in seen[0]]
    kept = [torch.equal(row, cond[0]) for row in seen[0]]
    assert all(d != k for d, k in zip(dropped, kept)) and 0 < sum(dropped) < 16, dropped


def test_finetune_teacher_with_another_vae_trains_on_its_latents_and_saves_it(tmp_path, monkeypatch):
    """``finetune_teacher`` with ``vae``: the saved pipeline carries that VAE bit for bit (the text encoder
    stays the parent's), and the U-Net trained on that VAE's latents; a missing VAE folder is one line."""
    import dataclasses

    import pytest

    from baselines import models
    from baselines.errors import ConfigError, FewstepError
    from baselines.finetune import FinetuneTeacherStage, run_finetune_teacher
    from baselines.train import TrainConfig

    parent = models.build_pipeline("tiny", seed=0)
    models.save_pipeline(parent, tmp_path / "parent", {"method": "teacher"})
    torch.manual_seed(1)
    other = models.build_vae(models.get_preset("tiny"))
    other.register_to_config(scaling_factor=0.5)
    other.save_pretrained(tmp_path / "vae", safe_serialization=True)
    seen = []
    import baselines.finetune as finetune

    cache_latents = finetune.cache_latents
    monkeypatch.setattr(finetune, "cache_latents", lambda vae, *a: seen.append(vae) or cache_latents(vae, *a))
    cfg = FinetuneTeacherStage(
        model=str(tmp_path / "parent"),
        vae=str(tmp_path / "vae"),
        cache_images=8,
        train=TrainConfig(steps=1, batch_size=4, checkpoint_every=1),
    )
    run_finetune_teacher(cfg, tmp_path / "out")
    saved = models.load_pipeline(tmp_path / "out" / "model")
    assert models.read_info(tmp_path / "out" / "model")["method"] == "teacher"
    assert saved.vae.config.scaling_factor == 0.5
    assert all(torch.equal(a, b) for a, b in zip(saved.vae.state_dict().values(), other.state_dict().values()))
    assert all(
        torch.equal(a, b)
        for a, b in zip(saved.text_encoder.state_dict().values(), parent.text_encoder.state_dict().values())
    )
    assert len(seen) == 1 and all(
        torch.equal(a, b) for a, b in zip(seen[0].state_dict().values(), other.state_dict().values())
    )
    fewer = models.build_vae(
        dataclasses.replace(models.get_preset("tiny"), vae=dict(models.get_preset("tiny").vae, latent_channels=2))
    )
    fewer.save_pretrained(tmp_path / "vae2", safe_serialization=True)
    with pytest.raises(ConfigError, match="2 latent channels"):
        run_finetune_teacher(
            FinetuneTeacherStage(model=str(tmp_path / "parent"), vae=str(tmp_path / "vae2")), tmp_path / "y"
        )
    with pytest.raises(FewstepError, match="not an AutoencoderKL"):
        models.load_vae(tmp_path / "parent" / "unet")
    with pytest.raises(FewstepError, match="cannot load VAE"):
        run_finetune_teacher(
            FinetuneTeacherStage(model=str(tmp_path / "parent"), vae=str(tmp_path / "nope")), tmp_path / "x"
        )


def test_train_vae_with_init_continues_from_that_vae(tmp_path):
    """``train_vae`` with ``init`` starts from that folder's weights (at lr 0 it saves them unchanged, with the
    scaling factor measured anew) instead of a fresh random VAE."""
    from baselines import models
    from baselines.teacher import TrainVAEStage, run_train_vae
    from baselines.train import TrainConfig

    torch.manual_seed(3)
    start = models.build_vae(models.get_preset("tiny"))
    start.save_pretrained(tmp_path / "start", safe_serialization=True)
    cfg = TrainVAEStage(
        preset="tiny", init=str(tmp_path / "start"), scale_images=8, train=TrainConfig(steps=1, batch_size=4, lr=0.0)
    )
    run_train_vae(cfg, tmp_path / "out")
    saved = models.load_vae(tmp_path / "out" / "model")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), start.state_dict().values()))
    assert saved.config.scaling_factor != 1.0


def test_ship_writes_fp16_models_and_the_chosen_recommended_guidance(tiny_pipe, tmp_path):
    """``ship`` records the stages' hashes and, when ``recommended_guidance_scale`` is set, writes it into the
    shipped teacher's fewstep.json and the manifest (so the shipped models' identity changes with it); the
    other recommended settings stay the teacher's, and unset, the teacher's own scale is shipped."""
    import json

    from safetensors import safe_open

    from baselines import models
    from baselines.errors import ConfigError
    from eval.checks import ShipStage, run_ship

    teacher_rec = {"guidance_scale": 4.0, "num_inference_steps": 50}
    models.save_pipeline(tiny_pipe, tmp_path / "teacher", {"method": "teacher", "recommended": teacher_rec})
    tokenizer = models.build_tokenizer()
    models.save_clip(models.build_clip(models.get_preset("tiny"), tokenizer), tokenizer, tmp_path / "clip")
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "stage.json").write_text(json.dumps({"status": "done", "name": "teacher", "hash": "abc"}))
    target = tmp_path / "pretrained"
    cfg = ShipStage(
        teacher=str(tmp_path / "teacher"),
        clip=str(tmp_path / "clip"),
        from_stages=[str(tmp_path / "stage")],
        target=str(target),
        recommended_guidance_scale=2.0,
    )
    manifest = run_ship(cfg, tmp_path / "out")
    info = models.read_info(target / "shapes")
    assert info["recommended"] == {"guidance_scale": 2.0, "num_inference_steps": 50}
    assert manifest["recommended"] == info["recommended"] and manifest["stage_hashes"] == {"teacher": "abc"}
    with safe_open(str(next((target / "shapes" / "unet").glob("*.safetensors"))), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    chosen_manifest = (target / "MANIFEST.json").read_text()
    cfg.recommended_guidance_scale = None
    run_ship(cfg, tmp_path / "out")
    assert models.read_info(target / "shapes")["recommended"] == teacher_rec
    assert (target / "MANIFEST.json").read_text() != chosen_manifest
    with pytest.raises(ConfigError, match="recommended_guidance_scale"):
        ShipStage(recommended_guidance_scale=0.5)


@pytest.mark.parametrize(
    "stage, bad, says",
    [
        ("TrainVAEStage", dict(recon_loss="l2"), "recon_loss"),
        ("TrainVAEStage", dict(kl_weight=-1.0), "kl_weight"),
        ("TrainCLIPStage", dict(hard_negatives=["shap"]), "unknown attribute 'shap'"),
        ("TrainCLIPStage", dict(hard_negatives=["shape", "shape"]), "each attribute once"),
        ("FinetuneCLIPStage", dict(clip="c", hard_negatives=["shape"], dataset="/my/folder"), "known attributes"),
        ("TrainTeacherStage", dict(snr_gamma=0.0), "snr_gamma"),  # the loss was exactly 0: nothing trained
        ("TrainTeacherStage", dict(guidance_scale=0.5), "guidance_scale"),
        ("TrainTeacherStage", dict(num_inference_steps=0), "num_inference_steps"),
        ("FinetuneTeacherStage", dict(cond_dropout=1.5), "cond_dropout"),
        ("FinetuneTeacherStage", dict(max_timestep=-1), "max_timestep"),
    ],
)
def test_bad_stage_values_are_errors_when_the_config_is_read(stage, bad, says):
    """Checked in the stage config itself, so a typo fails at --dry-run, not hours in when the stage starts."""
    from baselines import finetune, teacher
    from baselines.errors import ConfigError

    cls = getattr(teacher, stage, None) or getattr(finetune, stage)
    with pytest.raises(ConfigError, match=says):
        cls(**bad)


def test_a_fine_tuned_student_is_labelled_a_teacher_without_its_few_steps(tmp_path):
    """The plain denoising loss trains a distilled student's few-step skill away: the sweep must not run it as a
    student at its distilled steps (it kept method 'progressive' and 2 recommended steps)."""
    from baselines import models
    from baselines.finetune import FinetuneTeacherStage, run_finetune_teacher
    from baselines.train import TrainConfig

    rec = {"num_inference_steps": 2, "guidance_scale": 3.0}
    models.save_pipeline(
        models.build_pipeline("tiny", seed=0), tmp_path / "s", {"method": "progressive", "recommended": rec}
    )
    cfg = FinetuneTeacherStage(model=str(tmp_path / "s"), cache_images=4, train=TrainConfig(steps=1, batch_size=4))
    run_finetune_teacher(cfg, tmp_path / "out")
    info = models.read_info(tmp_path / "out" / "model")
    assert (info["method"], info["parent_method"], info["recommended"]) == (
        "teacher",
        "progressive",
        {"guidance_scale": 3.0},
    )
