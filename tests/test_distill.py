"""Distillation: exact maths of the progressive target and grids, guidance-student contracts, and
the stages end to end on tiny pipelines (v / zero-SNR like the embedded teacher, eps like SD 1.x)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

from baselines import diffusion as D
from baselines import models
from baselines.errors import ConfigError
from baselines.guidance import encode_text
from baselines.train import TrainConfig
from distill import student as students
from distill.data import PoolConfig
from distill.guidance import GuidanceStage, run_guidance
from distill.progressive import ProgressiveStage, round_grid, round_steps, run_progressive, two_step_target


def sd_like_scheduler() -> PNDMScheduler:
    """Stable Diffusion 1.x's scheduler: eps-prediction, non-zero terminal SNR, T = 1000."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )


@pytest.fixture(scope="module")
def pipes():
    v_pipe = models.build_pipeline("tiny", seed=0)
    eps_pipe = models.build_pipeline("tiny", seed=1)
    eps_pipe.scheduler = sd_like_scheduler()
    return {"v": v_pipe, "eps": eps_pipe}


@pytest.mark.parametrize("T", [1000, 1024])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
def test_trailing_grids_nest(T, n):
    coarse = D.trailing_timesteps(num_train_timesteps=T, steps=n)
    assert coarse == D.trailing_timesteps(num_train_timesteps=T, steps=2 * n)[::2]
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == coarse


@pytest.mark.parametrize("T", [1000, 1024])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 64])
def test_stock_exactness_claim_matches_the_stock_scheduler(T, n):
    """Feed the stock DDIM step an x0 prediction and see which alpha_prev it used at each step."""
    sched = DDIMScheduler(
        num_train_timesteps=T,
        timestep_spacing="trailing",
        prediction_type="sample",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(0)
    exact = True
    for t, t_prev in D.trailing_transitions(num_train_timesteps=T, steps=n):
        z, x0 = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
        stock = sched.step(x0, t, z).prev_sample
        alpha, sigma = D.alpha_sigma(alphas_cumprod=sched.alphas_cumprod, t=torch.tensor([t]))
        a_prev, s_prev = D.alpha_sigma(alphas_cumprod=sched.alphas_cumprod, t=torch.tensor([t_prev]))
        ours = D.ddim_step(
            x0=x0, eps=D.eps_from_x0(z=z, x0=x0, alpha=alpha, sigma=sigma), alpha_prev=a_prev, sigma_prev=s_prev
        )
        exact &= torch.allclose(stock, ours, atol=1e-6)
    assert exact == D.stock_ddim_is_exact(num_train_timesteps=T, steps=n)
    assert D.stock_ddim_is_exact(num_train_timesteps=1024, steps=64)
    assert not D.stock_ddim_is_exact(num_train_timesteps=1000, steps=16)


def test_round_steps_and_grid():
    assert round_steps(64, 1) == [32, 16, 8, 4, 2, 1]
    assert round_steps(8, 2) == [4, 2]
    grid = round_grid(num_train_timesteps=1024, steps=2)
    assert grid.tolist() == [[1023, 767, 511], [511, 255, -1]]


@pytest.mark.parametrize("teacher", ["v", "eps"])
@pytest.mark.parametrize("parametrisation", ["v", "x0"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_one_student_step_on_x_tilde_lands_on_two_teacher_steps(pipes, teacher, parametrisation, n):
    """For random z_t at every point of the round's grid (including the last step), the stock
    DDIMScheduler step of the student's scheduler, fed x~ in the student's parametrisation, lands on
    the teacher's two-step z'' to 1e-5."""
    pipe = pipes[teacher]
    den = students.denoiser_of(pipe.unet, pipe.scheduler)
    text = encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle", "a blue square"])
    sched = students.student_scheduler(dict(pipe.scheduler.config), parametrisation=parametrisation)
    T = sched.config.num_train_timesteps
    sched.set_timesteps(n)
    grid = round_grid(num_train_timesteps=T, steps=n)
    g = torch.Generator().manual_seed(n)
    for row in grid:
        ts = row.expand(2, 3)
        z = torch.randn(2, 4, 4, 4, generator=g) * 2

        def teacher_x0(z_, t_):
            return den(z_, t_, text, parametrisation="x0")

        with torch.no_grad():
            x_tilde = two_step_target(teacher_x0, z, ts, den.alpha_sigma)
            z_mid = _ddim(den, teacher_x0, z, ts[:, 0], ts[:, 1])
            z_next = _ddim(den, teacher_x0, z_mid, ts[:, 1], ts[:, 2])
        alpha, sigma = den.alpha_sigma(ts[:, 0])
        pred = D.convert(z=z, pred=x_tilde, source="x0", target=parametrisation, alpha=alpha, sigma=sigma)
        stock = sched.step(pred, int(row[0]), z).prev_sample
        torch.testing.assert_close(stock, z_next, atol=1e-5, rtol=1e-5)


def _ddim(den, predict_x0, z, t, t_prev):
    alpha, sigma = den.alpha_sigma(t)
    a_prev, s_prev = den.alpha_sigma(t_prev)
    x0 = predict_x0(z, t)
    return D.ddim_step(
        x0=x0, eps=D.eps_from_x0(z=z, x0=x0, alpha=alpha, sigma=sigma), alpha_prev=a_prev, sigma_prev=s_prev
    )


def test_guidance_student_starts_as_the_teachers_conditional_prediction(pipes):
    pipe = pipes["v"]
    unet = students.guidance_conditioned_unet(pipe.unet, 8)
    teacher = students.denoiser_of(pipe.unet, pipe.scheduler)
    student = students.denoiser_of(unet, pipe.scheduler)
    text = encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle"] * 3)
    z, t = torch.randn(3, 4, 4, 4), torch.tensor([5, 500, 1023])
    with torch.no_grad():
        expected = teacher(z, t, text, parametrisation="v")
        for s in (1.0, 3.0, 9.0):
            got = student(z, t, text, parametrisation="v", guidance_scale=torch.full((3,), s))
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert unet.config.time_cond_proj_dim == 8 and unet.time_embedding.cond_proj.weight.abs().sum() == 0


def test_guidance_embedding_fed_in_training_equals_the_pipelines(pipes):
    """Capture what reaches the U-Net's cond_proj from the stock pipeline and from fewstep's
    denoiser (the training path) at the same scale."""
    pipe = pipes["v"]
    unet = students.guidance_conditioned_unet(pipe.unet, 8)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    seen = []
    unet.time_embedding.cond_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    student_pipe = models.assemble_pipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler
    )
    student_pipe.set_progress_bar_config(disable=True)
    student_pipe("a red circle", num_inference_steps=1, guidance_scale=3.5, output_type="latent")
    text = encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    with torch.no_grad():
        students.denoiser_of(unet, pipe.scheduler)(
            torch.randn(1, 4, 4, 4), torch.tensor([1023]), text, guidance_scale=torch.tensor([3.5])
        )
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)


def _save(pipe, folder, info):
    return models.save_pipeline(pipe, folder, info)


def _train(steps=2):
    return TrainConfig(steps=steps, batch_size=4, lr=1e-3, checkpoint_every=1, log_every=1)


def test_progressive_on_an_sd_like_eps_teacher(pipes, tmp_path, monkeypatch):
    """eps-prediction, non-zero terminal SNR, T = 1000, PNDM scheduler (SD 1.x): the students
    predict v, load in stock diffusers offline, and sample exactly their distilled grid."""
    teacher = _save(pipes["eps"], tmp_path / "teacher", {"recommended": {"guidance_scale": 3.0}})
    cfg = ProgressiveStage(
        teacher=str(teacher), start_steps=4, end_steps=1, pool=PoolConfig(size=8, steps=2, batch_size=8), train=_train()
    )
    out = tmp_path / "prog"
    with pytest.warns(UserWarning, match="predicts eps and the students v"):  # round one relearns the output
        run_progressive(cfg, out)
    for n in (2, 1):
        folder = out / f"progressive-{n}step"
        info = json.loads((folder / "fewstep.json").read_text())
        assert info["steps"] == n and info["method"] == "progressive" and info["parametrisation"] == "v"
        assert info["guidance"] == {"conditioned": False, "distilled_scale": 3.0}
        assert info["recommended"] == {"num_inference_steps": n, "guidance_scale": 1.0, "sampler": "ddim"}
        assert info["stock_pipeline_exact"] is True and info["loss"]["logged_points"] == 2
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
        assert sched["_class_name"] == "DDIMScheduler" and sched["num_train_timesteps"] == 1000
    assert json.loads((out / "progressive-1step" / "fewstep.json").read_text())["parent"] == str(
        out / "progressive-2step"
    )
    assert (out / "model").resolve() == (out / "progressive-1step").resolve()
    # the stock pipeline walks the student's grid: same latents as fewstep's own DDIM steps
    pipe = StableDiffusionPipeline.from_pretrained(out / "progressive-2step", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
    ).images
    den = students.denoiser_of(pipe.unet, pipe.scheduler)
    text = encode_text(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    z = torch.randn(stock.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t, t_prev in D.trailing_transitions(num_train_timesteps=1000, steps=2):
            z = _ddim(
                den,
                lambda z_, t_: den(z_, t_, text, parametrisation="x0"),
                z,
                torch.tensor([t]),
                torch.tensor([t_prev]),
            )
    torch.testing.assert_close(stock, z, atol=1e-5, rtol=1e-5)

    # a rerun loads the finished rounds instead of training them again
    def retrain(*args, **kwargs):
        raise AssertionError("a finished round was trained again")

    monkeypatch.setattr("distill.progressive._train_round", retrain)
    saved = {n: (out / f"progressive-{n}step" / "fewstep.json").stat().st_mtime_ns for n in (2, 1)}
    run_progressive(cfg, out)
    assert {n: (out / f"progressive-{n}step" / "fewstep.json").stat().st_mtime_ns for n in (2, 1)} == saved


def test_guidance_then_progressive_chain(pipes, tmp_path):
    teacher = _save(
        pipes["v"], tmp_path / "teacher", {"recommended": {"guidance_scale": 3.0, "num_inference_steps": 8}}
    )
    run_guidance(
        GuidanceStage(
            teacher=str(teacher),
            guidance_range=[1.0, 5.0],
            embedding_dim=8,
            pool=PoolConfig(size=8, steps=2, batch_size=8),
            train=_train(),
        ),
        tmp_path / "guide",
    )
    student = tmp_path / "guide" / "model"
    info = json.loads((student / "fewstep.json").read_text())
    assert info["method"] == "guidance" and info["guidance"]["range"] == [1.0, 5.0]
    assert info["recommended"]["guidance_scale"] == 3.0 and "negative_prompt" in info
    pipe = StableDiffusionPipeline.from_pretrained(student, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 8
    calls = []
    pipe.unet.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a red circle", negative_prompt="blue", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert calls == [1, 1, 1, 1]  # one pass per step, no CFG doubling
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # negative_prompt has no effect, as fewstep.json says

    with pytest.warns(UserWarning, match="predicts v and the students x0"):
        run_progressive(
            ProgressiveStage(
                teacher=str(student),
                start_steps=2,
                end_steps=1,
                parametrisation="x0",
                pool=PoolConfig(size=8, steps=2, batch_size=8),
                train=_train(),
            ),
            tmp_path / "prog",
        )
    info = json.loads((tmp_path / "prog" / "progressive-1step" / "fewstep.json").read_text())
    assert info["method"] == "guidance+progressive" and info["guidance"] == {"conditioned": True, "range": [1.0, 5.0]}
    assert info["recommended"]["guidance_scale"] == 3.0
    assert models.load_pipeline(tmp_path / "prog" / "model").unet.config.time_cond_proj_dim == 8


def test_guidance_student_recommends_a_scale_it_was_trained_at(pipes, tmp_path):
    """A teacher's recommended scale outside ``guidance_range`` (Stable Diffusion's 7.5, range [1, 5]) is clamped
    into it; an explicit one outside it is a config error."""
    from baselines.errors import ConfigError

    teacher = _save(pipes["v"], tmp_path / "teacher", {"recommended": {"guidance_scale": 7.5}})
    stage = GuidanceStage(
        teacher=str(teacher),
        guidance_range=[1.0, 5.0],
        embedding_dim=8,
        pool=PoolConfig(size=8, steps=2, batch_size=8),
        train=_train(),
    )
    run_guidance(stage, tmp_path / "guide")
    assert (
        json.loads((tmp_path / "guide" / "model" / "fewstep.json").read_text())["recommended"]["guidance_scale"] == 5.0
    )
    with pytest.raises(ConfigError, match="outside guidance_range"):
        GuidanceStage(teacher="x", guidance_range=[1.0, 5.0], recommended_guidance_scale=7.5)
    with pytest.raises(ConfigError, match="recommended_steps must be >= 1"):  # 0 was read as "unset"
        GuidanceStage(teacher="x", recommended_steps=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(start_steps=6, end_steps=1),
        dict(start_steps=4, end_steps=4),
        dict(parametrisation="eps"),
        dict(guidance_range=[0.5, 2.0]),
        dict(seed=1),  # unused: an error, not a silent no-op
    ],
)
def test_bad_progressive_configs_are_one_line_errors(bad):
    from baselines.errors import ConfigError

    with pytest.raises(ConfigError):
        ProgressiveStage(teacher="x", **bad)


def test_the_teacher_pool_is_reused_only_for_its_own_config(pipes, tmp_path, monkeypatch):
    """Written whole then renamed; read again for the same pool config and guidance range; made again (not
    silently reused) for another; more scales than samples is a one-line error."""
    from distill import data as pool_data

    pipe = pipes["v"]
    cfg = PoolConfig(size=4, steps=1, batch_size=4, scales=2)
    first = pool_data.teacher_pool(pipe, cfg, guidance_range=(1.0, 3.0), cache=tmp_path / "pool")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]  # no partial folder left
    assert first["guidance_scale"] == [1.0, 3.0, 1.0, 3.0] and first["x0"].shape[0] == 4
    monkeypatch.setattr(pool_data, "generate_split", lambda *a, **k: pytest.fail("an equal pool was made again"))
    again = pool_data.teacher_pool(pipe, cfg, guidance_range=(1.0, 3.0), cache=tmp_path / "pool")
    assert torch.equal(again["x0"], first["x0"]) and again["prompts"] == first["prompts"]
    monkeypatch.undo()
    other = pool_data.teacher_pool(pipe, cfg, guidance_range=(2.0, 4.0), cache=tmp_path / "pool")
    assert other["guidance_scale"] == [2.0, 4.0, 2.0, 4.0]
    with pytest.raises(ConfigError, match=r"pool.scales \(3\) must be <= pool.size \(2\)"):
        pool_data.teacher_pool(pipe, PoolConfig(size=2, scales=3), guidance_range=(1.0, 3.0), cache=tmp_path / "p2")


def test_progressive_options_the_teacher_would_ignore_are_errors(pipes, tmp_path):
    """A CFG teacher is distilled at one guidance_scale, a guidance-conditioned one over a guidance_range inside
    the range it was distilled on: the other option was silently ignored, a wider range silently accepted."""
    from distill.student import guidance_conditioned_unet

    cfg_teacher = models.save_pipeline(pipes["v"], tmp_path / "cfg", {"method": "teacher"})
    conditioned = models.build_pipeline("tiny", seed=0)
    conditioned.unet = guidance_conditioned_unet(conditioned.unet, 8)
    w_teacher = models.save_pipeline(conditioned, tmp_path / "w", {"method": "guidance", "guidance": {"range": [1, 4]}})
    for teacher, extra, message in [
        (cfg_teacher, {"guidance_range": [1.0, 2.0]}, "guidance_range is for a guidance-conditioned teacher"),
        (w_teacher, {"guidance_scale": 2.0}, "guidance_scale is for a CFG teacher"),
        (w_teacher, {"guidance_range": [1.0, 8.0]}, r"reaches outside \[1, 4\]"),
    ]:
        stage = ProgressiveStage(teacher=str(teacher), start_steps=2, end_steps=1, **extra)
        with pytest.raises(ConfigError, match=message):
            run_progressive(stage, tmp_path / "out")
    with pytest.raises(ConfigError, match="guidance.seed does nothing"):
        GuidanceStage(teacher="x", seed=1)
