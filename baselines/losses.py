"""Loss callables shared by every method that trains a denoiser (teacher, DreamBooth, Imagic, ...)."""

from __future__ import annotations

import torch
from torch import Tensor

from baselines import diffusion


def draw_timesteps(
    n: int, num_train_timesteps: int, generator: torch.Generator, max_timestep: int | None = None
) -> Tensor:
    """Uniform integer timesteps in [0, T), or in [0, max_timestep] (training at low noise only)."""
    high = num_train_timesteps if max_timestep is None else min(num_train_timesteps, max_timestep + 1)
    return torch.randint(0, high, (n,), generator=generator)


def denoising_loss(
    *,
    denoiser,
    x0: Tensor,
    text: Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    max_timestep: int | None = None,
    reduce: bool = True,
    **denoiser_kwargs,
) -> Tensor:
    """The diffusion training loss in the denoiser's native parametrisation (Ho et al. 2020;
    v-prediction: Salimans & Ho 2022). With ``snr_gamma``, Min-SNR-gamma weights (Hang et al.
    2023) rescaled to the native parametrisation: min(SNR, gamma) on the x0 error, so on a zero-terminal-SNR
    schedule the x0 and v weights vanish at t = T - 1, where 1-step sampling starts (off by default). With
    ``max_timestep``, t is drawn from [0, max_timestep]."""
    n = x0.shape[0]
    t = draw_timesteps(n, len(denoiser.alphas_cumprod), generator, max_timestep).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    alpha, sigma = denoiser.alpha_sigma(t)
    z = diffusion.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    native = denoiser.native
    target = {"eps": eps, "x0": x0, "v": diffusion.v_from(x0=x0, eps=eps, alpha=alpha, sigma=sigma)}[native]
    pred = denoiser(z, t, text, parametrisation=native, **denoiser_kwargs)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma is not None:
        s = diffusion.snr(alpha=alpha, sigma=sigma).to(per_sample)
        clipped = torch.minimum(s, torch.full_like(s, snr_gamma))
        eps_weight = (snr_gamma / s).clamp(max=1)  # = min(SNR, gamma) / SNR, also 1 at SNR = 0 (zero terminal SNR)
        weight = {"eps": eps_weight, "x0": clipped, "v": clipped / (s + 1)}[native]
        per_sample = per_sample * weight
    return per_sample.mean() if reduce else per_sample


def distillation_loss(*, prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over the batch of weight x per-example MSE between a student's prediction and its
    distillation target (progressive: x0 vs x~ with max(SNR, 1); guidance: the CFG teacher's
    prediction in the student's native parametrisation)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()
