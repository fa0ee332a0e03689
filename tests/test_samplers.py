import hashlib
import warnings

import pytest
import torch

from baselines.samplers import (
    SAMPLERS,
    generate,
    has_multi_vector_tokens,
    make_scheduler,
    prompt_states,
    save_png,
    unet_evaluations,
)

PROMPTS = ["a small red circle on a blue background, top left", "a large white square on a black background, center"]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_is_finite(tiny_pipe, sampler):
    images = generate(tiny_pipe, PROMPTS, seeds=[0, 1], sampler=sampler, num_inference_steps=3, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "euler-a"])
def test_image_i_does_not_depend_on_batch_size(tiny_pipe, sampler):
    prompts = PROMPTS * 4
    seeds = list(range(10, 18))
    one = generate(
        tiny_pipe, prompts, seeds=seeds, sampler=sampler, num_inference_steps=4, guidance_scale=3.0, batch_size=1
    )
    eight = generate(
        tiny_pipe, prompts, seeds=seeds, sampler=sampler, num_inference_steps=4, guidance_scale=3.0, batch_size=8
    )
    assert (one - eight).abs().max() <= 1 / 255
    assert not torch.allclose(one[0], one[2])  # different seeds, same prompt: different images


def test_same_seed_gives_byte_identical_pngs(tiny_pipe, tmp_path):
    digests = []
    for run in range(2):
        images = generate(tiny_pipe, PROMPTS, seeds=[5, 6], num_inference_steps=3, guidance_scale=2.0)
        paths = [tmp_path / f"{run}-{i}.png" for i in range(2)]
        save_png(images, paths)
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_the_zero_terminal_snr_schedule_the_model_was_trained_on(tiny_pipe, sampler):
    trained = tiny_pipe.scheduler
    assert trained.config.rescale_betas_zero_snr and trained.alphas_cumprod[-1] == 0
    scheduler = make_scheduler(sampler, trained.config)
    torch.testing.assert_close(scheduler.alphas_cumprod[:-1], trained.alphas_cumprod[:-1], rtol=1e-5, atol=1e-7)
    assert scheduler.alphas_cumprod[-1] <= 2.0**-24 * (1 + 1e-4)  # 0, or 2**-24 where sigma_T must stay finite


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_unet_evaluations_count_the_pipelines_unet_calls(tiny_pipe, sampler):
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        for steps, scale in [(1, 1.0), (2, 1.0), (3, 2.0)]:
            calls.clear()
            generate(
                tiny_pipe, PROMPTS[:1], seeds=[0], sampler=sampler, num_inference_steps=steps, guidance_scale=scale
            )
            assert sum(calls) == unet_evaluations(sampler=sampler, steps=steps, guidance_scale=scale), (steps, scale)
    finally:
        hook.remove()
    assert unet_evaluations(sampler="ddim", steps=4, guidance_scale=4.0, guidance_conditioned=True) == 4


def test_generate_leaves_the_pipelines_scheduler_alone(tiny_pipe):
    own = tiny_pipe.scheduler
    generate(tiny_pipe, PROMPTS[:1], seeds=[0], sampler="heun", num_inference_steps=2, guidance_scale=1.0)
    assert tiny_pipe.scheduler is own


def test_prompt_states_encode_each_distinct_prompt_once_as_the_pipeline_does(tiny_pipe):
    prompts = [PROMPTS[0], "", PROMPTS[1], PROMPTS[0], ""]
    calls = []
    hook = tiny_pipe.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        ours = prompt_states(tiny_pipe, prompts)
    finally:
        hook.remove()
    stock, _ = tiny_pipe.encode_prompt(prompts, "cpu", 1, False)
    assert calls == [3]  # three distinct prompts, one text-encoder pass
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


def test_prompt_states_warn_only_when_a_prompt_is_cut(tiny_pipe):
    limit = tiny_pipe.tokenizer.model_max_length
    fits = " ".join(["red"] * (limit - 2))  # with the start and end tokens: exactly model_max_length
    assert len(tiny_pipe.tokenizer(fits).input_ids) == limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt_states(tiny_pipe, [fits, "a red circle"])
    with pytest.warns(UserWarning, match=f"is {limit + 1} tokens"):
        prompt_states(tiny_pipe, [fits + " red", "a red circle"])


def test_prompt_states_expand_multi_vector_textual_inversion_tokens_as_the_pipeline_does():
    from baselines.models import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"<one>": torch.randn(width)}, token="<one>")
    assert not has_multi_vector_tokens(pipe.tokenizer)  # a single vector: prompts are not rewritten
    pipe.load_textual_inversion({"<pair>": torch.randn(2, width)}, token="<pair>")
    assert has_multi_vector_tokens(pipe.tokenizer)
    prompts = ["a <pair> on a red background", "a <one> circle", ""]
    stock, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(prompt_states(pipe, prompts), stock, rtol=0, atol=1e-6)
    expanded = prompt_states(pipe, prompts[:1])
    pipe.maybe_convert_prompt = lambda prompts, tokenizer: prompts  # without the rewrite, <pair> reads as one token
    assert not torch.allclose(prompt_states(pipe, prompts[:1]), expanded)


def test_generate_matches_the_stock_pipeline_with_negative_prompts(tiny_pipe):
    negatives = ["a black background", ""]
    ours = generate(
        tiny_pipe, PROMPTS, seeds=[3, 4], negative_prompt=negatives, num_inference_steps=3, guidance_scale=3.0
    )
    stock = tiny_pipe(
        PROMPTS,
        negative_prompt=negatives,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="pt",
    ).images
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)


def test_prompt_states_warn_on_truncation_and_use_the_mask_when_the_encoder_asks(tiny_pipe, monkeypatch):
    long = " ".join(["red"] * (tiny_pipe.tokenizer.model_max_length + 3))
    with pytest.warns(UserWarning, match="the text encoder reads the first"):
        prompt_states(tiny_pipe, [long, "a red circle"])
    prompts = ["a red circle", "a blue square on a green background"]
    monkeypatch.setattr(tiny_pipe.text_encoder.config, "use_attention_mask", True, raising=False)
    masked = prompt_states(tiny_pipe, prompts)
    stock, _ = tiny_pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(masked, stock, rtol=0, atol=1e-6)
    monkeypatch.setattr(tiny_pipe.text_encoder.config, "use_attention_mask", False)
    assert not torch.allclose(prompt_states(tiny_pipe, prompts), masked)  # the mask changed the states


def test_defaults_fill_only_what_is_unset(tiny_pipe):
    from baselines.errors import FewstepError
    from baselines.samplers import resolve_defaults

    info = {"recommended": {"num_inference_steps": 4, "guidance_scale": 3.0, "sampler": "unipc"}}
    assert resolve_defaults(tiny_pipe, info, steps=None, guidance_scale=None, sampler=None) == (4, 3.0, "unipc")
    assert resolve_defaults(tiny_pipe, info, steps=2, guidance_scale=1.0, sampler="ddim") == (2, 1.0, "ddim")
    with pytest.raises(FewstepError, match=r"steps must be in \[1, 1024\].*got 0"):  # 0 was read as unset: 4 steps
        resolve_defaults(tiny_pipe, info, steps=0, guidance_scale=None, sampler=None)
    with pytest.raises(FewstepError, match="got 2000"):  # diffusers' traceback, once sampling had started
        resolve_defaults(tiny_pipe, info, steps=2000, guidance_scale=None, sampler=None)


def test_sd1_samplers_follow_diffusers_from_config_unless_one_spacing_is_asked():
    """An SD-1.x scheduler folder (PNDM, no timestep_spacing written): as diffusers' X.from_config does, DDIM takes
    "leading" and the multistep solvers and Euler "linspace" (how published SD-1.x numbers were made);
    timestep_spacing="trailing" puts every sampler on the one trailing grid."""
    from diffusers import PNDMScheduler

    sd1 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
           "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}  # fmt: skip
    base = dict(PNDMScheduler.from_config(sd1).config)
    assert "timestep_spacing" in base["_use_default_values"]

    def grids(**kw):
        out = {}
        for name in ("ddim", "dpmpp-2m", "euler", "unipc"):
            scheduler = make_scheduler(name, base, **kw)
            scheduler.set_timesteps(2)
            out[name] = scheduler.timesteps.round().long().tolist()
        return out

    assert grids() == {"ddim": [501, 1], "euler": [999, 0], "dpmpp-2m": [999, 500], "unipc": [999, 500]}
    assert grids(timestep_spacing="trailing") == {
        "ddim": [999, 499],
        "euler": [999, 499],
        "dpmpp-2m": [999, 499],
        "unipc": [999, 499],
    }


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_sampler_that_cannot_step_an_x0_model_says_so(sampler):
    """x0 ('sample') models: the samplers PREDICTION_TYPES allows run them, the others are a one-line error up front
    (diffusers raised mid-sampling); both directions are checked against diffusers itself."""
    from diffusers import DDIMScheduler

    from baselines.errors import FewstepError
    from baselines.models import build_pipeline
    from baselines.samplers import PREDICTION_TYPES

    pipe = build_pipeline("tiny", seed=0)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "sample"})
    run = lambda: generate(pipe, ["a"], seeds=[0], sampler=sampler, num_inference_steps=2, guidance_scale=1.0)  # noqa: E731
    if "sample" in PREDICTION_TYPES.get(sampler, ("sample",)):
        assert torch.isfinite(run()).all()
    else:
        with pytest.raises(FewstepError, match=f"the {sampler} sampler cannot step a 'sample'-prediction model"):
            run()
        cls, extra = SAMPLERS[sampler]  # and diffusers itself refuses it, mid-sampling
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        with pytest.raises((ValueError, NotImplementedError), match="sample"):
            pipe("a", num_inference_steps=2, guidance_scale=1.0, output_type="latent")


def test_generate_checks_its_prompts_up_front(tiny_pipe):
    from baselines.errors import FewstepError

    with pytest.raises(FewstepError, match="no prompts"):
        generate(tiny_pipe, [], seeds=[], num_inference_steps=1)
    with pytest.raises(FewstepError, match="2 prompts but 1 negative prompts"):
        generate(tiny_pipe, ["a", "b"], seeds=[0, 1], negative_prompt=["x"], num_inference_steps=1)


def test_a_timestep_spacing_replaces_the_models_grid(tiny_pipe):
    """The tiny model is trailing (1 step at t = T - 1); 'leading' asked for runs 1 step at t = steps_offset."""
    from baselines.errors import FewstepError

    own = make_scheduler("ddim", tiny_pipe.scheduler.config)
    own.set_timesteps(1)
    leading = make_scheduler("ddim", tiny_pipe.scheduler.config, timestep_spacing="leading")
    leading.set_timesteps(1)
    assert own.timesteps.tolist() == [1023] and leading.timesteps.tolist() == [1]
    with pytest.raises(FewstepError, match="timestep spacing 'karras'"):
        make_scheduler("ddim", tiny_pipe.scheduler.config, timestep_spacing="karras")
