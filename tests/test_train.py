import json

import pytest
import torch
from torch import nn

from baselines.train import TrainConfig, lr_at, read_log, train


def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


def _batches(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 4, generator=g)
    return {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1}


def _loss_for(model, crash_at=None):
    calls = {"n": 0}

    def loss(batch, generator):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        noise = 0.01 * torch.randn(8, generator=generator)
        return (model(batch["x"]).squeeze(1) - batch["y"] - noise).pow(2).mean()

    return loss


def _cfg(**kw):
    return TrainConfig(**{**dict(steps=6, batch_size=8, lr=0.05, checkpoint_every=2, log_every=1), **kw})


def _fit(model, out_dir, config=None, crash_at=None):
    """Train the toy ``model`` on the toy loss into ``out_dir``; with ``crash_at``, expect the simulated crash at
    that loss call."""
    kwargs = dict(modules={"m": model}, batches=_batches, config=config or _cfg(), out_dir=out_dir)
    if crash_at is None:
        return train(loss=_loss_for(model), **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(loss=_loss_for(model, crash_at), **kwargs)


def test_loss_goes_down_and_log_is_json_lines(tmp_path):
    model = _toy()
    _fit(model, tmp_path, _cfg(steps=60))
    rows = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert rows[-1]["step"] == 60 and rows[-1]["loss"] < 0.2 * rows[0]["loss"]


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path):
    straight = _toy()
    _fit(straight, tmp_path / "a")

    crashed = _toy()
    _fit(crashed, tmp_path / "b", crash_at=5)
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    _fit(_toy(seed=7), tmp_path / "b", crash_at=1)  # pre-empted again before the resumed run's next checkpoint:
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    (tmp_path / "b" / "checkpoints" / ".tmp-step-00000006").mkdir()  # a half-written checkpoint is ignored
    resumed = _toy(seed=123)  # fresh weights: everything must come from the checkpoint
    _fit(resumed, tmp_path / "b")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert any('"resume"' in line for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines())


def test_ema_weights_are_returned(tmp_path):
    """The returned weights are the EMA of the raw trajectory, ema <- d ema + (1 - d) w after each step from the
    initial weights, at d = 0.8 (at 0.5 the two arguments of the lerp are interchangeable)."""
    raw = []
    for k in (1, 2, 3):  # constant LR: a k-step run's weights are the first k steps of a longer one
        model = _toy()
        _fit(model, tmp_path / f"raw{k}", _cfg(steps=k))
        raw.append([p.detach().clone() for p in model.parameters()])
    model = _toy()
    expected = [p.detach().clone() for p in model.parameters()]
    for weights in raw:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    _fit(model, tmp_path / "ema", _cfg(steps=3, ema_decay=0.8))
    for p, e, w in zip(model.parameters(), expected, raw[-1]):
        torch.testing.assert_close(p.detach(), e)
        assert not torch.allclose(p, w)


def test_a_non_finite_loss_stops_training_with_one_line(tmp_path):
    from baselines.errors import FewstepError

    model = _toy()
    before = [p.detach().clone() for p in model.parameters()]

    def loss(batch, generator):
        return model(batch["x"]).sum() * float("nan")

    with pytest.raises(FewstepError, match="step 1: the loss or a gradient is not finite"):
        train(loss=loss, modules={"m": model}, batches=_batches, config=_cfg(), out_dir=tmp_path)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing was updated


def test_resume_never_starts_a_fresh_log(tmp_path):
    """An 8-step run, then a 4-step one with resume: never in the same folder: the log (and the loss summary
    written into fewstep.json) is the new run's, not its 4 steps plus the old run's steps 5-8."""
    _fit(_toy(), tmp_path, _cfg(steps=8))
    _fit(_toy(), tmp_path, _cfg(steps=4, resume="never"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]


def test_frozen_parameters_stay_frozen(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    train(
        loss=lambda b, g: model(b["x"]).pow(2).mean(),
        modules={"m": model},
        batches=_batches,
        config=_cfg(steps=3),
        out_dir=tmp_path,
    )
    assert torch.equal(before, model[0].weight)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(0.0)


def test_resume_with_ema_and_gradient_accumulation_gives_the_uninterrupted_weights(tmp_path):
    """The EMA weights (what ``train`` returns) and accumulated micro-batches resume exactly too."""
    cfg = _cfg(ema_decay=0.8, grad_accum=2)
    straight = _toy()
    _fit(straight, tmp_path / "a", cfg)
    crashed = _toy()
    _fit(crashed, tmp_path / "b", cfg, crash_at=10)  # call 10: step 5's second micro-batch
    resumed = _toy(seed=123)
    _fit(resumed, tmp_path / "b", cfg)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_resume_never_starts_afresh_over_an_earlier_run(tmp_path):
    """``resume: never`` in a folder holding another run's checkpoints trains from the given weights and keeps
    only its own checkpoints (before: it collided with the earlier ``step-N`` folders)."""
    first = _toy(seed=1)
    _fit(first, tmp_path / "a", _cfg(steps=8))
    fresh, again = _toy(), _toy()
    _fit(fresh, tmp_path / "b")
    never = _cfg(resume="never")
    _fit(again, tmp_path / "a", never)
    for p, q in zip(fresh.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert [p.name for p in sorted((tmp_path / "a" / "checkpoints").iterdir())] == ["step-00000004", "step-00000006"]


def test_mixed_precision_comes_from_the_train_config_under_a_shared_accelerator(tmp_path):
    """``fewstep run`` passes one ``Accelerator()`` to every stage; a stage's ``mixed_precision: bf16`` still
    autocasts its loss (before: the shared accelerator's "no" won and the setting did nothing)."""
    from accelerate import Accelerator

    seen = []
    model = _toy()

    def loss(batch, generator):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return model(batch["x"]).float().pow(2).mean()

    for precision in ("bf16", "no"):
        config = _cfg(steps=1, mixed_precision=precision)
        train(
            loss=loss,
            modules={"m": model},
            batches=_batches,
            config=config,
            out_dir=tmp_path / precision,
            accelerator=Accelerator(),
        )
    assert seen == [torch.bfloat16, None]


@pytest.mark.parametrize(
    "bad",
    [
        dict(checkpoint_every=0),
        dict(log_every=0),
        dict(keep_checkpoints=0),
        dict(ema_decay=1.0),
        dict(mixed_precision="fp16"),
        dict(clip_grad=-1.0),  # negative: clip_grad_norm_ flipped every gradient (training climbed the loss)
        dict(clip_grad=0.0),  # read as "no clipping"
        dict(lr=-1e-4),
        dict(weight_decay=-0.1),
        dict(warmup_steps=-5),
        dict(adam_betas=(2.0, 0.9)),
    ],
)
def test_bad_train_configs_are_config_errors(bad):
    from baselines.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        _cfg(**bad)


def test_the_log_of_a_resumed_run_has_one_row_per_step(tmp_path):
    """A crash at step 3 (checkpoint at 2) logs step 3 twice: ``read_log`` keeps the resumed run's row."""
    crashed = _toy()
    _fit(crashed, tmp_path, crash_at=4)
    log = tmp_path / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    marked = [{**r, "loss": -1.0} if r.get("step") == 3 else r for r in rows]  # the crashed run's step-3 row
    log.write_text("".join(json.dumps(r) + "\n" for r in marked))
    resumed = _toy()
    _fit(resumed, tmp_path)
    raw = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert raw.count(3) == 2  # the file keeps both
    kept = read_log(tmp_path)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6]
    assert kept[2]["loss"] != -1.0  # the resumed run's row
