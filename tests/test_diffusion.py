import pytest
import torch
from diffusers import DDIMScheduler

from baselines import diffusion as D
from baselines.models import build_scheduler, get_preset


@pytest.fixture
def sched():
    return build_scheduler(get_preset("tiny"))


def _coeffs(sched, t):
    return D.alpha_sigma(alphas_cumprod=sched.alphas_cumprod, t=t)


def test_alpha_sigma_match_the_scheduler(sched):
    t = torch.tensor([0, 10, 500, 1023])
    alpha, sigma = _coeffs(sched, t)
    torch.testing.assert_close(alpha**2, sched.alphas_cumprod[t].float())
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4))
    assert alpha[-1] == 0 and sigma[-1] == 1  # zero terminal SNR
    a, s = _coeffs(sched, torch.tensor([-1]))
    assert a.item() == 1 and s.item() == 0


@pytest.mark.parametrize("source", D.PARAMETRISATIONS)
@pytest.mark.parametrize("target", D.PARAMETRISATIONS)
def test_parametrisation_round_trips(sched, source, target):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 100, 700, 1000])
    alpha, sigma = _coeffs(sched, t)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64).float()
    eps = torch.randn(4, 4, 8, 8, generator=g)
    z = D.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    truth = {"x0": x0, "eps": eps, "v": D.v_from(x0=x0, eps=eps, alpha=alpha, sigma=sigma)}
    converted = D.convert(z=z, pred=truth[source], source=source, target=target, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(converted, truth[target], atol=1e-4 if "eps" in (source,) else 1e-5, rtol=1e-4)
    back = D.convert(z=z, pred=converted, source=target, target=source, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(back, truth[source], atol=1e-4, rtol=1e-4)


def test_v_round_trip_is_exact_to_1e6(sched):
    g = torch.Generator().manual_seed(1)
    t = torch.arange(0, 1024, 37)
    alpha, sigma = _coeffs(sched, t)
    x0, eps = torch.randn(len(t), 16, generator=g), torch.randn(len(t), 16, generator=g)
    z = D.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    v = D.v_from(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(D.x0_from_v(z=z, v=v, alpha=alpha, sigma=sigma), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(D.eps_from_v(z=z, v=v, alpha=alpha, sigma=sigma), eps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_ddim_step_agrees_with_diffusers(prediction_type, steps):
    config = dict(get_preset("tiny").scheduler, prediction_type=prediction_type)
    if prediction_type == "epsilon":  # SD 1.x style: non-zero terminal SNR, T = 1000
        config.update(rescale_betas_zero_snr=False, num_train_timesteps=1000, set_alpha_to_one=False)
    sched = DDIMScheduler(**config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    param = D.parametrisation_of(prediction_type)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)
        expected = sched.step(out, t, z).prev_sample
        prev = t - sched.config.num_train_timesteps // steps
        alpha, sigma = D.alpha_sigma(alphas_cumprod=sched.alphas_cumprod, t=t.expand(2))
        a_prev, s_prev = D.alpha_sigma(
            alphas_cumprod=sched.alphas_cumprod, t=prev.expand(2), final_alpha_cumprod=float(sched.final_alpha_cumprod)
        )
        x0, eps = D.to_x0_eps(z=z, pred=out, parametrisation=param, alpha=alpha, sigma=sigma)
        ours = D.ddim_step(x0=x0, eps=eps, alpha_prev=a_prev, sigma_prev=s_prev)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        z = expected


def test_per_sample_timesteps_broadcast(sched):
    t = torch.tensor([5, 900])
    alpha, sigma = _coeffs(sched, t)
    x0, eps = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    z = D.diffuse(x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    assert torch.allclose(z[0], alpha[0].expand(3, 2, 2)) and torch.allclose(z[1], alpha[1].expand(3, 2, 2))
