"""Editing on tiny components: SDEdit edge cases, inpainting, Imagic, textual inversion, DreamBooth,
the one-line errors and the CLI."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from baselines import diffusion, models
from baselines.errors import ConfigError, FewstepError
from baselines.guidance import encode_text
from baselines.samplers import make_scheduler
from baselines.train import TrainConfig, read_log
from editing import common, concepts, dreambooth, imagic, inpaint, lora, sdedit, textual_inversion
from fewstep import cli

PROMPT = "a small red circle on a blue background, top left"
CONCEPT = {"colour": "purple", "shape": "triangle"}


@pytest.fixture(scope="module")
def tiny_folder(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    info = {"method": "test", "recommended": {"num_inference_steps": 4, "guidance_scale": 3.0}}
    return models.save_pipeline(tiny_pipe, folder, info)


def _pixels(pipe, n=2, seed=0):
    return torch.stack(
        [
            i.pixels
            for i in common.resolve_inputs(common.EditSource(num_inputs=n, seed=seed, change={"colour": "green"}), 16)
        ]
    )


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _quick(steps=2):
    return TrainConfig(steps=steps, batch_size=2, lr=1e-2, checkpoint_every=1000, log_every=1)


# ----------------------------------------------------------------------------- SDEdit


def test_strength_maps_to_the_start_of_the_grid_as_img2img():
    assert common.start_index(10, 0.0) == 10 and common.start_index(10, 1.0) == 0
    assert common.start_index(10, 0.55) == 5 and common.start_index(4, 0.5) == 2
    for bad in (-0.1, 1.5):
        with pytest.raises(FewstepError, match="strength"):
            common.start_index(10, bad)


def test_a_strength_that_runs_no_step_is_an_error_and_strengths_running_the_same_steps_warn(tiny_pipe):
    common.check_strengths([0.0, 0.25, 1.0], 4)  # 0 (the VAE round trip), 1 and 4 steps
    with pytest.raises(ConfigError, match=r"strength 0.2 runs no step of 4 \(int\(4 x 0.2\) = 0\)"):
        common.check_strengths([0.5, 0.2], 4)  # before: the input came back unedited, with the row saying 0.2
    with pytest.warns(UserWarning, match="strengths 0.5, 0.6, 0.7 all run 2 of 4 steps"):
        common.check_strengths([0.5, 0.6, 0.7, 1.0], 4)
    x = _pixels(tiny_pipe)
    with pytest.raises(ConfigError, match="runs no step"):
        sdedit.sdedit(tiny_pipe, x, [PROMPT] * 2, strength=0.2, steps=4, guidance_scale=3.0, seeds=[0, 1])


def test_edits_need_one_seed_per_image(tiny_pipe):
    x = _pixels(tiny_pipe)
    with pytest.raises(FewstepError, match=r"2 image\(s\) but 1 seed\(s\)"):  # before: both images drew seed 0's noise
        sdedit.sdedit(tiny_pipe, x, [PROMPT] * 2, strength=0.5, steps=4, guidance_scale=3.0, seeds=[0])
    masks = torch.ones(2, 1, *x.shape[-2:])
    with pytest.raises(FewstepError, match="one seed per image"):
        inpaint.inpaint(tiny_pipe, x, masks, [PROMPT] * 2, steps=2, guidance_scale=3.0, seeds=[0, 1, 2])


def test_sdedit_strength_zero_returns_the_vae_reconstruction(tiny_pipe):
    x = _pixels(tiny_pipe)
    out = sdedit.sdedit(tiny_pipe, x, [PROMPT] * 2, strength=0.0, steps=4, guidance_scale=3.0, seeds=[0, 1])
    recon = common.decode_latents(tiny_pipe.vae, common.encode_image(tiny_pipe.vae, x))
    assert torch.equal(out, recon)
    assert sdedit.edit_nfe(tiny_pipe, steps=4, strength=0.0, guidance_scale=3.0) == 0


def test_sdedit_strength_one_starts_from_pure_noise_at_the_first_grid_point(tiny_pipe):
    calls = []
    base = sdedit.make_denoiser(tiny_pipe, 1.0)[0]

    def spy(z, t, text, **kw):
        calls.append((z.clone(), t.clone()))
        return base(z, t, text, **kw)

    latents = common.encode_image(tiny_pipe.vae, _pixels(tiny_pipe))
    noise = common.draw_noise(tuple(latents.shape[1:]), [3, 4])
    grid = common.timestep_grid(tiny_pipe.scheduler.config, 4)
    text = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT] * 2)

    def run(strength: float):
        common.ddim_partial(
            spy,
            alphas_cumprod=tiny_pipe.scheduler.alphas_cumprod,
            final_alpha_cumprod=1.0,
            x0=latents,
            noise=noise,
            timesteps=grid,
            start=common.start_index(4, strength),
            text=text,
        )

    run(1.0)
    assert len(calls) == 4
    z_first, t_first = calls[0]
    assert int(t_first[0]) == tiny_pipe.scheduler.config.num_train_timesteps - 1
    torch.testing.assert_close(z_first, noise)  # zero terminal SNR: alpha = 0 at the first grid point
    calls.clear()
    run(0.5)
    assert [int(t[0]) for _, t in calls] == grid[2:].tolist()
    alpha, sigma = diffusion.alpha_sigma(alphas_cumprod=tiny_pipe.scheduler.alphas_cumprod, t=grid[2:3].expand(2))
    torch.testing.assert_close(calls[0][0], diffusion.diffuse(x0=latents, eps=noise, alpha=alpha, sigma=sigma))


SD_LIKE_DDIM = dict(  # Stable Diffusion 1.x's schedule: alpha-bar at the first grid point is not 0
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
    rescale_betas_zero_snr=False,
)


@pytest.mark.parametrize("schedule", [{}, SD_LIKE_DDIM], ids=["zero-terminal-snr", "sd-1.x"])
def test_img2img_at_strength_one_is_the_stock_ddim_pipeline(tiny_pipe, schedule):
    """From pure noise at strength 1 (``pure_noise``: Imagic's stage C, inpainting at full strength) the editing
    sampler is the stock text-to-image DDIM pipeline, also on a schedule without zero terminal SNR."""
    pipe = StableDiffusionPipeline(
        **{**tiny_pipe.components, "scheduler": make_scheduler("ddim", tiny_pipe.scheduler.config)}
    )
    pipe.scheduler = make_scheduler("ddim", {**pipe.scheduler.config, **schedule})
    text = encode_text(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    h = pipe.unet.config.sample_size
    zeros = torch.zeros(1, 4, h, h)
    ours = sdedit.img2img(pipe, zeros, text, strength=1.0, steps=4, guidance_scale=3.0, seeds=[11], pure_noise=True)
    stock = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)
    img2img = sdedit.img2img(pipe, zeros + 1, text, strength=1.0, steps=4, guidance_scale=3.0, seeds=[11])
    assert torch.equal(img2img, ours) == (not schedule)  # without pure_noise alpha_T x0 stays, as in img2img


# ----------------------------------------------------------------------------- inpainting


def test_inpaint_keeps_unmasked_latents_and_pixels(tiny_pipe):
    x = _pixels(tiny_pipe)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 3:9] = 1
    latents = common.encode_image(tiny_pipe.vae, x)
    keep = 1 - common.latent_mask(mask, latents.shape[-1])
    text = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT] * 2)
    out = inpaint.inpaint_latents(tiny_pipe, latents, keep, text, steps=4, guidance_scale=3.0, seeds=[0, 1])
    k = keep.expand_as(latents).bool()
    assert torch.equal(out[k], latents[k])
    assert not torch.allclose(out[~k], latents[~k])
    images = inpaint.inpaint(tiny_pipe, x, mask, [PROMPT] * 2, steps=4, guidance_scale=3.0, seeds=[0, 1])
    unmasked = mask.expand_as(x) == 0
    assert torch.equal(images[unmasked], x[unmasked])
    raw = inpaint.inpaint(tiny_pipe, x, mask, [PROMPT] * 2, steps=4, guidance_scale=3.0, seeds=[0, 1], composite=False)
    assert not torch.equal(raw[unmasked], x[unmasked])  # the VAE round trip alone would change them


def test_inpaint_feeds_each_step_the_known_region_noised_to_that_steps_time(tiny_pipe):
    """RePaint-style replacement, as diffusers' inpainting: after every step the kept region is the original
    latent noised (with the same noise) to the time the next step starts from, so the U-Net sees
    alpha_t x0 + sigma_t eps there at every t, and pure noise at the first step (strength 1)."""
    latents = common.encode_image(tiny_pipe.vae, _pixels(tiny_pipe))
    keep = torch.zeros(2, 1, *latents.shape[-2:])
    keep[..., :, :2] = 1
    text = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT] * 2)
    seen = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1])))
    try:
        inpaint.inpaint_latents(tiny_pipe, latents, keep, text, steps=4, guidance_scale=1.0, seeds=[0, 1])
    finally:
        hook.remove()
    noise = common.draw_noise(tuple(latents.shape[1:]), [0, 1])
    grid = common.timestep_grid(tiny_pipe.scheduler.config, 4)
    assert [int(t.flatten()[0]) for _, t in seen] == grid.tolist()
    k = keep.expand_as(latents).bool()
    torch.testing.assert_close(seen[0][0], noise)
    for z, t in seen[1:]:
        alpha, sigma = diffusion.alpha_sigma(alphas_cumprod=tiny_pipe.scheduler.alphas_cumprod, t=t.flatten()[:1])
        expected = diffusion.diffuse(x0=latents, eps=noise, alpha=alpha, sigma=sigma)
        torch.testing.assert_close(z[k], expected[k])
        assert not torch.allclose(z[~k], expected[~k])  # the hole is the model's own


def test_inpaint_ends_on_the_original_latent_when_the_final_alpha_bar_is_not_one(tiny_pipe):
    """Stable Diffusion 1.x schedulers have ``set_alpha_to_one=False``: noising to the final alpha-bar
    would leave noise in the kept region, so after the last step it is the original latent itself."""
    from diffusers import DDIMScheduler

    latents = common.encode_image(tiny_pipe.vae, _pixels(tiny_pipe))
    keep = torch.zeros(2, 1, *latents.shape[-2:])
    keep[..., :2, :] = 1
    text = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT] * 2)
    own = tiny_pipe.scheduler
    tiny_pipe.scheduler = DDIMScheduler.from_config(own.config, set_alpha_to_one=False)
    try:
        assert common.final_alpha_cumprod_of(tiny_pipe) < 1
        out = inpaint.inpaint_latents(tiny_pipe, latents, keep, text, steps=3, guidance_scale=2.0, seeds=[0, 1])
    finally:
        tiny_pipe.scheduler = own
    k = keep.expand_as(latents).bool()
    assert torch.equal(out[k], latents[k])


def test_thin_mask_strokes_survive_downsampling(tmp_path):
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, :, 5] = 1  # a 1-pixel vertical stroke on an odd column
    small = common.latent_mask(mask, 8)
    assert small[0, 0, :, 2].all() and small.sum() == 8
    assert torch.nn.functional.interpolate(mask, size=8, mode="nearest").sum() == 0  # nearest loses it
    stroke = np.zeros((64, 64), np.uint8)
    stroke[:, 33] = 255
    Image.fromarray(stroke).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "image.png")
    loaded = common.load_mask(tmp_path / "mask.png", tmp_path / "image.png", 16)
    assert loaded.shape == (1, 16, 16) and loaded[0, :, 8].all() and loaded.sum() == 16


def test_bad_masks_are_one_line_errors(tmp_path):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((10, 20), 255, np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    (tmp_path / "text.png").write_text("not an image")
    for name, match in (("empty.png", "empty"), ("small.png", "10x20|20x10"), ("text.png", "cannot read")):
        with pytest.raises(FewstepError, match=match) as e:
            common.load_mask(tmp_path / name, tmp_path / "image.png", 16)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- Imagic


def test_imagic_stage_a_trains_only_the_embedding_and_stage_b_only_the_unet(tiny_folder, tmp_path):
    pipe = models.load_pipeline(tiny_folder)
    before = {m: _state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    latents = common.encode_image(pipe.vae, _pixels(pipe, 1))
    e_tgt = encode_text(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    e_opt = imagic.optimise_embedding(pipe, latents, e_tgt, _quick(), tmp_path / "a", guidance_scale=3.0)
    assert e_opt.shape == e_tgt.shape and not torch.equal(e_opt, e_tgt)
    assert all(_same(before[m], _state(getattr(pipe, m))) for m in before)
    e_copy = e_opt.clone()
    imagic.finetune_unet(pipe, latents, e_opt, _quick(), tmp_path / "b", guidance_scale=3.0)
    assert not _same(before["unet"], _state(pipe.unet))
    assert _same(before["vae"], _state(pipe.vae)) and _same(before["text_encoder"], _state(pipe.text_encoder))
    assert torch.equal(e_opt, e_copy)
    torch.testing.assert_close(imagic.interpolate(e_tgt, e_opt, 1.0), e_tgt)
    torch.testing.assert_close(imagic.interpolate(e_tgt, e_opt, 0.0), e_opt)
    torch.testing.assert_close(imagic.interpolate(e_tgt, e_opt, 0.25), 0.25 * e_tgt + 0.75 * e_opt)


def test_imagic_fits_a_guidance_conditioned_model_where_it_predicts_the_conditional_model(
    tiny_folder, tmp_path, monkeypatch
):
    """Stages A and B fit the denoising loss's target, the conditional prediction: a guidance-conditioned
    student is fed its fine-tuning scale there (the lowest it was distilled on), and stage C's scale only
    when sampling."""
    from distill.student import guidance_conditioned_unet

    student = models.load_pipeline(tiny_folder)
    student.unet = guidance_conditioned_unet(student.unet, embedding_dim=8)
    info = {"method": "guidance", "guidance": {"range": [2.0, 8.0]}, "recommended": {"num_inference_steps": 2}}
    models.save_pipeline(student, tmp_path / "student", info)
    fitted = []
    real_loss = imagic.denoising_loss

    def spy(**kwargs):
        fitted.append(kwargs.get("guidance_scale"))
        return real_loss(**kwargs)

    monkeypatch.setattr(imagic, "denoising_loss", spy)
    cfg = imagic.ImagicStage(
        model=str(tmp_path / "student"),
        source=common.EditSource(num_inputs=1, change={"colour": "green"}),
        etas=[1.0],
        guidance_scale=5.0,
        embedding=_quick(),
        finetune=_quick(),
    )
    (row,) = imagic.run_imagic(cfg, tmp_path / "run")
    assert fitted == [2.0] * 4  # 2 steps of stage A, 2 of stage B
    assert row["guidance_scale"] == 5.0 and row["nfe"] == 2  # stage C: one pass per step at its scale


def test_imagic_lora_stage_b_changes_only_attention_projections_and_merges(tiny_folder, tmp_path):
    pipe = models.load_pipeline(tiny_folder)
    before = _state(pipe.unet)
    latents = common.encode_image(pipe.vae, _pixels(pipe, 1))
    e = encode_text(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    imagic.finetune_unet(pipe, latents, e, _quick(), tmp_path / "b", guidance_scale=3.0, lora_rank=2)
    after = _state(pipe.unet)
    assert after.keys() == before.keys()  # merged back: a stock U-Net again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(tuple(f"{t}.weight" for t in lora.TARGETS)) for k in changed)
    models.save_pipeline(pipe, tmp_path / "model", {"method": "test"})
    reloaded = models.load_pipeline(tmp_path / "model")
    assert all(torch.equal(v, _state(reloaded.unet)[k]) for k, v in after.items())


def test_imagic_stage_writes_the_output_contract_and_is_reproducible(tiny_folder, tmp_path):
    cfg = imagic.ImagicStage(
        model=str(tiny_folder),
        source=common.EditSource(num_inputs=1, change={"shape": "square"}),
        etas=[0.0, 1.0],
        steps=2,
        embedding=_quick(),
        finetune=_quick(),
    )
    rows = imagic.run_imagic(cfg, tmp_path / "run")
    assert len(rows) == 2 and [r["param"] for r in rows] == [{"eta": 0.0}, {"eta": 1.0}]
    saved = [json.loads(line) for line in (tmp_path / "run" / "edits.jsonl").read_text().splitlines()]
    assert saved == rows
    row = rows[0]
    assert row["method"] == "imagic" and row["nfe"] == 4 and row["steps"] == 2 and row["mask"] is None
    assert row["target_attributes"]["shape"] == "square" and row["input_attributes"]["shape"] != "square"
    assert Image.open(row["output"]).size == (16, 16) and Image.open(row["input"]).size == (16, 16)
    folder = tmp_path / "run" / row["input"].split("/")[-1][:-4]
    for name in ("e_tgt.safetensors", "e_opt.safetensors", "grid_eta.png", "model/fewstep.json"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "model" / "fewstep.json").read_text())["method"] == "imagic"
    models.load_pipeline(folder / "model")
    again = imagic.run_imagic(cfg, tmp_path / "again")
    assert np.array_equal(np.asarray(Image.open(again[1]["output"])), np.asarray(Image.open(rows[1]["output"])))


def test_few_step_imagic_carries_stage_b_weight_change_onto_the_student(tiny_folder, tmp_path):
    from distill.student import guidance_conditioned_unet

    student = models.load_pipeline(tiny_folder)
    student.unet = guidance_conditioned_unet(student.unet, embedding_dim=8)
    with torch.no_grad():
        student.unet.time_embedding.cond_proj.weight.normal_()  # a trained guidance embedding
    info = {"method": "guidance", "recommended": {"num_inference_steps": 2, "guidance_scale": 3.0}}
    models.save_pipeline(student, tmp_path / "student", info)
    cfg = imagic.ImagicStage(
        model=str(tiny_folder),
        student=str(tmp_path / "student"),
        student_delta_scale=0.5,
        source=common.EditSource(num_inputs=1, change={"colour": "green"}),
        etas=[1.0],
        steps=3,
        embedding=_quick(),
        finetune=_quick(),
    )
    rows = imagic.run_imagic(cfg, tmp_path / "run")
    teacher_row, student_row = rows
    assert (teacher_row["model"], teacher_row["steps"], teacher_row["nfe"]) == (str(tiny_folder), 3, 6)
    assert (student_row["model"], student_row["steps"], student_row["nfe"]) == (str(tmp_path / "student"), 2, 2)
    assert student_row["delta_scale"] == 0.5 and student_row["output"] != teacher_row["output"]
    folder = tmp_path / "run" / teacher_row["input"].split("/")[-1][:-4]
    base, tuned = _state(models.load_pipeline(tiny_folder).unet), _state(models.load_pipeline(folder / "model").unet)
    edited = _state(models.load_pipeline(folder / "model_student").unet)
    original = _state(student.unet)
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    for k in original:
        expected = original[k] + 0.5 * (tuned[k] - base[k]) if k in base else original[k]
        torch.testing.assert_close(edited[k], expected, rtol=0, atol=1e-6, msg=k)
    assert json.loads((folder / "model_student" / "fewstep.json").read_text())["weight_change_from"] == str(tiny_folder)
    wrong = {k: v[..., :1] for k, v in base.items()}
    with pytest.raises(ConfigError, match="distil it from that model"):
        lora.add_weight_change(student.unet, tuned=wrong, base=wrong, scale=1.0)


def test_few_step_imagic_samples_a_plain_student_at_its_own_scale(tiny_folder, tmp_path):
    """A student with the teacher's guidance built in (a progressive student of a CFG teacher) is not wrapped in
    CFG again at the stage's guidance scale: one U-Net evaluation per step."""
    student = models.load_pipeline(tiny_folder)
    info = {"method": "progressive", "recommended": {"num_inference_steps": 2, "guidance_scale": 1.0}}
    models.save_pipeline(student, tmp_path / "student", info)
    cfg = imagic.ImagicStage(
        model=str(tiny_folder),
        student=str(tmp_path / "student"),
        source=common.EditSource(num_inputs=1, change={"colour": "green"}),
        etas=[1.0],
        steps=3,
        guidance_scale=3.0,
        embedding=_quick(),
        finetune=_quick(),
    )
    teacher_row, student_row = imagic.run_imagic(cfg, tmp_path / "run")
    assert (teacher_row["steps"], teacher_row["nfe"]) == (3, 6)  # CFG at s = 3
    assert (student_row["steps"], student_row["nfe"]) == (2, 2)  # before: 4, CFG at s = 3 on the student too


def test_yaml_change_and_concept_replace_rather_than_merge_with_defaults():
    from omegaconf import OmegaConf

    from fewstep import experiment

    cfg = OmegaConf.create(
        {
            "experiment": "x",
            "run_dir": "unused",
            "stages": {
                "a": {"kind": "sdedit", "source": {"change": {"shape": "square"}}},
                "b": {"kind": "textual_inversion", "source": {"concept": {"colour": "red"}}},
            },
        }
    )
    for name in cfg.stages:
        cfg.stages[name].output = f"unused/{name}"
    a, b = experiment.plan(cfg)
    assert a.config.source.change == {"shape": "square"} and b.config.source.concept == {"colour": "red"}
    with pytest.raises(ConfigError, match="change must set"):
        common.resolve_inputs(common.EditSource(), 16)


def test_empty_eta_sweep_fails_before_writing(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="etas"):
        imagic.run_imagic(imagic.ImagicStage(model=str(tiny_folder), etas=[]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- textual inversion


def test_textual_inversion_changes_only_new_rows_and_loads_in_stock_diffusers(tiny_folder, tmp_path):
    pipe = models.load_pipeline(tiny_folder)
    rows_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = _state(pipe.unet)
    cfg = textual_inversion.TextualInversionStage(
        model=str(tiny_folder),
        source=concepts.ConceptSource(num_images=2, concept=CONCEPT),
        placeholder="<tri>",
        num_vectors=2,
        train=_quick(3),
    )
    learned = textual_inversion.learn_embeddings(pipe, cfg, tmp_path / "train")["<tri>"]
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == rows_before.shape[0] + 2 and learned.shape == (2, rows_before.shape[1])
    assert torch.equal(weight[: rows_before.shape[0]], rows_before)  # bit-identical old rows
    init = rows_before[pipe.tokenizer("shape", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(learned, init.expand_as(learned))
    assert _same(unet_before, _state(pipe.unet))

    textual_inversion.run_textual_inversion(cfg, tmp_path / "ti")
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None)
    stock.load_textual_inversion(str(tmp_path / "ti" / textual_inversion.EMBEDS_FILE))
    theirs, _ = stock.encode_prompt("a small <tri> on a red background, center", "cpu", 1, False)
    ref = models.load_pipeline(tiny_folder)
    textual_inversion.learn_embeddings(ref, cfg, tmp_path / "ti" / "train")  # resumes from the finished run
    ours = encode_text(ref.tokenizer, ref.text_encoder, ["a small <tri> <tri>_1 on a red background, center"])
    torch.testing.assert_close(theirs, ours)


def test_textual_inversion_rejects_an_existing_token(tiny_folder, tmp_path):
    cfg = textual_inversion.TextualInversionStage(
        model=str(tiny_folder), source=concepts.ConceptSource(concept=CONCEPT), placeholder="circle</w>", train=_quick()
    )
    with pytest.raises(ConfigError, match="already a token"):
        textual_inversion.run_textual_inversion(cfg, tmp_path)


def test_textual_inversion_guidance_scale_is_only_for_a_guidance_conditioned_student(tiny_folder, tmp_path):
    cfg = textual_inversion.TextualInversionStage(
        model=str(tiny_folder), source=concepts.ConceptSource(concept=CONCEPT), guidance_scale=3.0, train=_quick()
    )
    with pytest.raises(ConfigError, match="takes no scale"):  # it was silently ignored
        textual_inversion.run_textual_inversion(cfg, tmp_path)


def test_a_guidance_conditioned_student_is_finetuned_where_it_predicts_the_conditional_model():
    """s = 1 (w = 0) is the conditional prediction the denoising loss targets; a student distilled only on
    scales above 1 is fine-tuned at the lowest it knows."""
    assert common.finetune_guidance_scale({}) == 1.0
    assert common.finetune_guidance_scale({"guidance": {"range": [1.0, 6.0]}}) == 1.0
    assert common.finetune_guidance_scale({"guidance": {"range": [2.0, 8.0]}}) == 2.0


# ----------------------------------------------------------------------------- DreamBooth


def test_dreambooth_trains_the_unet_only_and_saves_a_pipeline(tiny_folder, tmp_path):
    cfg = dreambooth.DreamBoothStage(
        model=str(tiny_folder),
        source=concepts.ConceptSource(num_images=2, concept=CONCEPT),
        num_class_images=2,
        train=_quick(),
    )
    ref = models.load_pipeline(tiny_folder)
    folder = dreambooth.run_dreambooth(cfg, tmp_path / "db")
    tuned = models.load_pipeline(folder)
    assert not _same(_state(ref.unet), _state(tuned.unet))
    assert _same(_state(ref.vae), _state(tuned.vae)) and _same(_state(ref.text_encoder), _state(tuned.text_encoder))
    info = json.loads((folder / "fewstep.json").read_text())
    assert info["method"] == "dreambooth" and info["instance_prompts"][0].startswith("a ")
    assert "sks purple" not in info["instance_prompts"][0] and "sks triangle" in info["instance_prompts"][0]
    prompts = dreambooth.class_prompts(cfg, 20)
    assert all(p.split(" on a ")[0] in ("a small triangle", "a large triangle") for p in prompts)
    assert len({p.split(" on a ")[1] for p in prompts}) > 10  # varied backgrounds and positions
    user = dreambooth.DreamBoothStage(source=concepts.ConceptSource(images="x", template="a photo of {}"))
    assert dreambooth.class_prompts(dataclasses.replace(user, class_noun="dog"), 2) == ["a photo of dog"] * 2


def test_dreambooth_loss_is_the_instance_term_plus_the_weighted_prior_term(tiny_folder, tmp_path):
    """Paper eq. 2: with the same draws, the first step's loss is L_instance + prior_weight x L_prior."""
    first = []
    for w in (0.0, 1.0, 2.0):
        cfg = dreambooth.DreamBoothStage(
            model=str(tiny_folder),
            source=concepts.ConceptSource(num_images=2, concept=CONCEPT),
            num_class_images=2,
            prior_weight=w,
            train=_quick(steps=1),
        )
        dreambooth.run_dreambooth(cfg, tmp_path / str(w))
        first.append(read_log(tmp_path / str(w) / "train")[0]["loss"])
    prior = first[1] - first[0]
    assert prior > 0
    assert first[2] - first[1] == pytest.approx(prior, rel=1e-4)


def test_dreambooth_class_images_follow_the_training_seed(tiny_folder, tmp_path, monkeypatch):
    """Seed 0 keeps the class images' seeds 0..n-1; another training seed draws other class images (every seed
    drew the same ones, so repeats over seeds shared their prior set)."""
    seen = []

    def stop(pipe, prompts, *, seeds, **kw):
        seen.append(seeds)
        raise KeyboardInterrupt  # enough: the class images' seeds are known

    monkeypatch.setattr(dreambooth, "generate", stop)
    for seed in (0, 1):
        source = concepts.ConceptSource(num_images=2, concept=CONCEPT)
        cfg = dreambooth.DreamBoothStage(model=str(tiny_folder), source=source, num_class_images=3, train=_quick())
        with pytest.raises(KeyboardInterrupt):
            dreambooth.run_dreambooth(
                dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed)), tmp_path
            )
    assert seen[0] == [0, 1, 2] and len(set(seen[1]) | set(seen[0])) == 6


def test_dreambooth_bad_bind_is_a_config_error(tiny_folder, tmp_path):
    cfg = dreambooth.DreamBoothStage(model=str(tiny_folder), bind=["background"], train=_quick())
    with pytest.raises(ConfigError, match="bind"):
        dreambooth.run_dreambooth(cfg, tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "0.png")
    user = dreambooth.DreamBoothStage(source=concepts.ConceptSource(images=str(folder), template="a photo of {}"))
    with pytest.raises(ConfigError, match="class noun"):  # the class prompt would be "a photo of"
        dreambooth.run_dreambooth(user, tmp_path / "user")


def test_dreambooth_class_prompts_never_ask_for_a_shape_the_colour_of_its_background():
    """Binding the shape keeps the concept's colour in every class prompt; a background of that colour has no
    image (the dataset never draws one), so those prompts are skipped (21 of 200 were before)."""
    cfg = dreambooth.DreamBoothStage(source=concepts.ConceptSource(concept=CONCEPT), bind=["shape"])
    prompts = dreambooth.class_prompts(cfg, 200)
    colour = CONCEPT["colour"]
    assert len(prompts) == 200 and all(f"{colour} on a {colour} background" not in p for p in prompts)
    assert all(p.startswith((f"a small {colour} on a ", f"a large {colour} on a ")) for p in prompts)


# ----------------------------------------------------------------------------- CLI


def test_cli_edits_grey_rgba_and_odd_sized_images(tiny_folder, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (23, 37), dtype=np.uint8)).save(tmp_path / "g.png")
    rgba = np.random.default_rng(1).integers(0, 255, (40, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    mask = np.zeros((40, 30), np.uint8)
    mask[10:20, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["--prompt", PROMPT, "--steps", "2"]
    assert (
        cli.main(
            [
                "edit",
                "sdedit",
                str(tiny_folder),
                "--image",
                str(tmp_path / "g.png"),
                *args,
                "--strength",
                "0.5",
                "--out",
                str(tmp_path / "sd"),
            ]
        )
        == 0
    )
    assert cli.main(["edit", "inpaint", str(tiny_folder), "--image", str(tmp_path / "rgba.png"), "--mask",
                     str(tmp_path / "mask.png"), *args, "--out", str(tmp_path / "ip")]) == 0  # fmt: skip
    for run in ("sd", "ip"):
        row = json.loads((tmp_path / run / "edits.jsonl").read_text())
        assert Image.open(row["output"]).size == (16, 16) and row["target_attributes"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "missing.png"], "not found"),
        (["--image", "{text}"], "cannot read"),
        (["--image", "{image}", "--strength", "1.5"], "strength"),
        (["--image", "{image}", "--mask", "{empty}"], "empty"),
        (["--image", "{image}", "--mask", "{small}"], "is 4x4 but the image is 20x20"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tiny_folder, tmp_path, capsys, extra, message):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not an image")
    paths = {k: str(tmp_path / f"{k}.png") for k in ("image", "text", "empty", "small")}
    extra = [e.format(**paths) for e in extra]
    verb = "inpaint" if "--mask" in extra else "sdedit"
    out = tmp_path / "out"
    code = cli.main(["edit", verb, str(tiny_folder), *extra, "--prompt", PROMPT, "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("verb", [["sample"], ["edit", "sdedit"], ["train", "dreambooth"]])
def test_cli_device_cuda_without_a_gpu_is_one_line(tiny_folder, tmp_path, capsys, verb):
    """sample / edit / train run on the accelerator's device (a GPU when there is one, their models and training
    loop alike); asking for CUDA where there is none is a one-line error before anything is written."""
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    extra = ["--image", str(tmp_path / "image.png")] if verb[0] == "edit" else []
    out = tmp_path / "out"
    args = [*verb, str(tiny_folder), "--prompt", PROMPT, *extra, "--device", "cuda", "--out", str(out)]
    if verb[0] == "train":
        args.remove("--prompt"), args.remove(PROMPT)
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no CUDA device" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_trains_textual_inversion_from_an_image_folder_and_rejects_a_missing_one(tiny_folder, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    out = tmp_path / "ti"
    common_args = ["--num-images", "2", "--steps", "1", "--batch-size", "2", "--out", str(out)]
    assert cli.main(["train", "textual-inversion", str(tiny_folder), "--images", str(images), *common_args]) == 0
    assert (out / textual_inversion.EMBEDS_FILE).is_file()
    capsys.readouterr()
    common_args[-1] = str(tmp_path / "db")
    code = cli.main(["train", "dreambooth", str(tiny_folder), "--images", str(tmp_path / "nope"), *common_args])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "is not a folder of images" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "db").exists()
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    common_args[-1] = str(tmp_path / "ti2")
    assert cli.main(["train", "textual-inversion", str(model), "--images", str(images), *common_args]) == 0
    info = model / "fewstep.json"
    info.write_text(info.read_text().replace('"test"', '"retrained"'))  # the model changed in place
    assert cli.main(["train", "textual-inversion", str(model), "--images", str(images), *common_args]) == 2
    assert "holds a run with other arguments (model_identity:" in capsys.readouterr().err
    (images / "0.png").unlink()  # the concept images changed: not a resume of the first run
    common_args[-1] = str(out)
    assert cli.main(["train", "textual-inversion", str(tiny_folder), "--images", str(images), *common_args]) == 2
    assert "holds a run with other arguments (inputs:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "sdedit", "{model}", "--image", "{image}", "--eta", "0.5"], "--eta is only used by 'fewstep edit im"),
        (["edit", "imagic", "{model}", "--image", "{image}", "--strength", "0.5"], "--strength is only used by"),
        (["edit", "sdedit", "{model}", "--image", "{image}", "--no-composite"], "'fewstep edit inpaint'"),
        (["edit", "inpaint", "{model}", "--image", "{image}", "--mask", "{image}", "--strength", "0.5", "1"],
         "inpaint takes one --strength"),
        (["train", "textual-inversion", "{model}", "--prior-weight", "0"], "'fewstep train dreambooth'"),
        (["train", "dreambooth", "{model}", "--num-vectors", "2"], "'fewstep train textual-inversion'"),
    ],
)  # fmt: skip
def test_cli_options_of_another_method_are_errors_not_ignored(tiny_folder, tmp_path, capsys, argv, message):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    argv = [a.format(model=tiny_folder, image=tmp_path / "image.png") for a in argv]
    prompt = ["--prompt", PROMPT] if argv[0] == "edit" else []
    code = cli.main([*argv, *prompt, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_imagic_resumes_its_own_run_and_refuses_another_runs_folder(tiny_folder, tmp_path, capsys):
    """Imagic's --out holds the checkpoints of stages A and B: rerun with the same arguments it resumes (nothing
    is trained again); with another prompt it is an error (it resumed the first run's e_opt and U-Net)."""
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    out = tmp_path / "imagic"
    argv = ["edit", "imagic", str(tiny_folder), "--image", str(tmp_path / "image.png"), "--steps", "2", "--eta", "1",
            "--embedding-steps", "1", "--finetune-steps", "1", "--out", str(out)]  # fmt: skip
    assert cli.main([*argv, "--prompt", PROMPT]) == 0
    logs = sorted(out.glob("image/train_*/log.jsonl"))
    assert len(logs) == 2
    before = [log.read_text() for log in logs]
    assert cli.main([*argv, "--prompt", PROMPT]) == 0
    for log, old in zip(logs, before):  # resumed at its last step: no step trained again
        new = log.read_text()[len(old) :].splitlines()
        assert log.read_text().startswith(old) and [json.loads(line)["event"] for line in new] == ["resume"]
    capsys.readouterr()
    assert cli.main([*argv, "--prompt", "a large blue square on a red background, center"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run with other arguments (prompt:" in err and len(err.splitlines()) == 1
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "image.png")  # same path, new picture
    assert cli.main([*argv, "--prompt", PROMPT]) == 2 and "(inputs:" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli.main([*argv[:-1], str(tmp_path / "other"), "--prompt", PROMPT]) == 2
    assert "holds no 'fewstep edit' run" in capsys.readouterr().err


def test_smoke_experiment_runs_every_editing_kind(smoke_run):
    for stage in ("sdedit", "inpaint", "imagic"):
        rows = [json.loads(line) for line in (smoke_run / stage / "edits.jsonl").read_text().splitlines()]
        assert rows and all(Image.open(r["output"]).size == Image.open(r["input"]).size for r in rows)
        assert all(r["method"] == stage and r["target_attributes"] and r["input_attributes"] for r in rows)
    assert (smoke_run / "textual_inversion" / textual_inversion.EMBEDS_FILE).is_file()
    models.load_pipeline(smoke_run / "dreambooth" / "model")


@pytest.mark.parametrize("method", ["dreambooth", "textual_inversion"])
def test_fine_tuning_losses_use_the_attention_mask_when_the_encoder_asks(method, tiny_folder, tmp_path, monkeypatch):
    """DreamBooth's and textual inversion's losses encode prompts as the pipeline does: with the attention mask
    where the text encoder's config asks for it (``encode_tokens``), never the bare ids."""
    masks, load = [], models.load_pipeline

    def load_asking_for_the_mask(path, **kw):
        pipe = load(path, **kw)
        pipe.text_encoder.config.use_attention_mask = True
        record = lambda module, args, kwargs: masks.append(kwargs.get("attention_mask"))  # noqa: E731
        pipe.text_encoder.register_forward_pre_hook(record, with_kwargs=True)
        return pipe

    monkeypatch.setattr(models, "load_pipeline", load_asking_for_the_mask)
    source = concepts.ConceptSource(num_images=2, concept=CONCEPT)
    if method == "dreambooth":
        cfg = dreambooth.DreamBoothStage(model=str(tiny_folder), source=source, num_class_images=2, train=_quick(2))
        dreambooth.run_dreambooth(cfg, tmp_path)
    else:
        cfg = textual_inversion.TextualInversionStage(
            model=str(tiny_folder), source=source, placeholder="<tri>", train=_quick(2)
        )
        textual_inversion.run_textual_inversion(cfg, tmp_path)
    assert len(masks) >= 2 and all(m is not None for m in masks), masks
