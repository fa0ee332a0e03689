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
