"""Diffusion maths as pure keyword-only functions (notation of Salimans & Ho 2022).

z_t = alpha_t x0 + sigma_t eps,  alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t]),
v = alpha_t eps - sigma_t x0  (so that x0 = alpha_t z_t - sigma_t v and eps = sigma_t z_t + alpha_t v).
Per-sample coefficients broadcast from shape (B,) over the remaining dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

PARAMETRISATIONS = ("eps", "x0", "v")
_DIFFUSERS_NAMES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def parametrisation_of(prediction_type: str) -> str:
    """fewstep's name (eps, x0, v) for a diffusers ``prediction_type``."""
    if prediction_type in PARAMETRISATIONS:
        return prediction_type
    return _DIFFUSERS_NAMES[prediction_type]


def diffusers_prediction_type(parametrisation: str) -> str:
    """The diffusers ``prediction_type`` for fewstep's eps / x0 / v."""
    return {v: k for k, v in _DIFFUSERS_NAMES.items()}[parametrisation]


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim)).to(like)


def alpha_sigma(*, alphas_cumprod: Tensor, t: Tensor, final_alpha_cumprod: float = 1.0) -> tuple[Tensor, Tensor]:
    """alpha_t and sigma_t for integer timesteps t; t < 0 means "after the last step" (the
    scheduler's ``final_alpha_cumprod``, 1.0 with ``set_alpha_to_one``). Computed in float64 on the CPU and
    returned on t's device, wherever the schedule's table lives."""
    t = torch.as_tensor(t)
    acp = alphas_cumprod.detach().to("cpu", torch.float64)[t.clamp(min=0).cpu()]
    acp = torch.where(t.cpu() < 0, torch.as_tensor(final_alpha_cumprod, dtype=torch.float64), acp)
    return acp.sqrt().float().to(t.device), (1 - acp).clamp(min=0).sqrt().float().to(t.device)


def snr(*, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2."""
    return alpha**2 / sigma**2


def diffuse(*, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """z_t = alpha_t x0 + sigma_t eps."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def v_from(*, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha_t eps - sigma_t x0."""
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def x0_from_eps(*, z: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (z_t - sigma_t eps) / alpha_t (undefined where alpha_t = 0)."""
    return (z - _bcast(sigma, z) * eps) / _bcast(alpha, z)


def eps_from_x0(*, z: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (z_t - alpha_t x0) / sigma_t."""
    return (z - _bcast(alpha, z) * x0) / _bcast(sigma, z)


def x0_from_v(*, z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = alpha_t z_t - sigma_t v."""
    return _bcast(alpha, z) * z - _bcast(sigma, z) * v


def eps_from_v(*, z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = sigma_t z_t + alpha_t v."""
    return _bcast(sigma, z) * z + _bcast(alpha, z) * v


def to_x0_eps(*, z: Tensor, pred: Tensor, parametrisation: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a prediction in any parametrisation."""
    if parametrisation == "v":
        return x0_from_v(z=z, v=pred, alpha=alpha, sigma=sigma), eps_from_v(z=z, v=pred, alpha=alpha, sigma=sigma)
    if parametrisation == "eps":
        return x0_from_eps(z=z, eps=pred, alpha=alpha, sigma=sigma), pred
    if parametrisation == "x0":
        return pred, eps_from_x0(z=z, x0=pred, alpha=alpha, sigma=sigma)
    raise ValueError(f"unknown parametrisation {parametrisation!r}; choose one of {PARAMETRISATIONS}")


def convert(*, z: Tensor, pred: Tensor, source: str, target: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Re-express a prediction from one parametrisation in another."""
    if source == target:
        return pred
    x0, eps = to_x0_eps(z=z, pred=pred, parametrisation=source, alpha=alpha, sigma=sigma)
    return {"x0": x0, "eps": eps, "v": v_from(x0=x0, eps=eps, alpha=alpha, sigma=sigma)}[target]


def ddim_step(*, x0: Tensor, eps: Tensor, alpha_prev: Tensor, sigma_prev: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) update: z_{t'} = alpha_{t'} x0 + sigma_{t'} eps (Song et al. 2021, eq. 12)."""
    return diffuse(x0=x0, eps=eps, alpha=alpha_prev, sigma=sigma_prev)


def trailing_timesteps(*, num_train_timesteps: int, steps: int) -> list[int]:
    """The N-step "trailing" grid of diffusers (Lin et al. 2023, Table 2), first step first:
    round(arange(T, 0, -T/N)) - 1. With T divisible by 2N, the N-step grid is every other point
    of the 2N-step grid (progressive distillation's nested grids)."""
    import numpy as np

    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    return [int(t) for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1]


def trailing_transitions(*, num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) for each step of the N-step trailing grid; the last step goes to t_prev = -1
    ("after the last step": alpha = 1, sigma = 0 with ``set_alpha_to_one``)."""
    grid = trailing_timesteps(num_train_timesteps=num_train_timesteps, steps=steps)
    return list(zip(grid, grid[1:] + [-1]))


def stock_ddim_is_exact(*, num_train_timesteps: int, steps: int) -> bool:
    """Whether the stock ``DDIMScheduler.step`` walks the trailing grid exactly: it steps from t to
    t - T // N (diffusers #9261), which is the next grid point for every step only for some N
    (every N dividing T; e.g. T = 1000 is off-grid at N = 16 and 64)."""
    stride = num_train_timesteps // steps
    return all(
        t - stride == t_prev or (t_prev == -1 and t - stride < 0)
        for t, t_prev in trailing_transitions(num_train_timesteps=num_train_timesteps, steps=steps)
    )


def progressive_target(
    *, z_t: Tensor, z_target: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_target: Tensor, sigma_target: Tensor
) -> Tensor:
    """Progressive distillation's target x~ (Salimans & Ho 2022, Alg. 2): the x0 with which ONE
    DDIM step from z_t lands on z_target (= z'' after two teacher steps t -> t' -> t''):
    x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t)."""
    ratio = _bcast(sigma_target / sigma_t, z_t)
    return (z_target - ratio * z_t) / (_bcast(alpha_target, z_t) - ratio * _bcast(alpha_t, z_t))


def truncated_snr_weight(*, alpha: Tensor, sigma: Tensor) -> Tensor:
    """max(SNR, 1): the x0-space loss weight of progressive distillation ("truncated SNR")."""
    return torch.clamp(snr(alpha=alpha, sigma=sigma), min=1.0)
