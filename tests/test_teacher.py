"""The teacher chain's own maths on stubs: the VAE scaling factor."""

from types import SimpleNamespace

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
