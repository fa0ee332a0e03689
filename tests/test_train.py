import json

import pytest
import torch
from torch import nn

from baselines.train import TrainConfig, lr_at, train


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


def test_loss_goes_down_and_log_is_json_lines(tmp_path):
    model = _toy()
    train(loss=_loss_for(model), modules={"m": model}, batches=_batches, config=_cfg(steps=60), out_dir=tmp_path)
    rows = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert rows[-1]["step"] == 60 and rows[-1]["loss"] < 0.2 * rows[0]["loss"]


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path):
    straight = _toy()
    train(loss=_loss_for(straight), modules={"m": straight}, batches=_batches, config=_cfg(), out_dir=tmp_path / "a")

    crashed = _toy()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            loss=_loss_for(crashed, crash_at=5),
            modules={"m": crashed},
            batches=_batches,
            config=_cfg(),
            out_dir=tmp_path / "b",
        )
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    (tmp_path / "b" / "checkpoints" / ".tmp-step-00000006").mkdir()  # a half-written checkpoint is ignored
    resumed = _toy(seed=123)  # fresh weights: everything must come from the checkpoint
    train(loss=_loss_for(resumed), modules={"m": resumed}, batches=_batches, config=_cfg(), out_dir=tmp_path / "b")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert any('"resume"' in line for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines())


def test_ema_weights_are_returned(tmp_path):
    model = _toy()
    init = [p.detach().clone() for p in model.parameters()]
    raw = _toy()
    train(loss=_loss_for(raw), modules={"m": raw}, batches=_batches, config=_cfg(steps=3), out_dir=tmp_path / "raw")
    train(
        loss=_loss_for(model),
        modules={"m": model},
        batches=_batches,
        config=_cfg(steps=3, ema_decay=0.5),
        out_dir=tmp_path / "e",
    )
    for p, q, p0 in zip(model.parameters(), raw.parameters(), init):
        assert not torch.allclose(p, q) and not torch.allclose(p, p0)


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
