"""Weights are read as safetensors; pickles only with weights_only=True; no remote code."""

import re

from conftest import ROOT

SOURCES = [p for d in ("baselines", "distill", "editing", "eval", "fewstep") for p in (ROOT / d).rglob("*.py")]


def test_every_torch_load_is_weights_only():
    for path in SOURCES:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_nothing_trusts_remote_code():
    for path in SOURCES:
        assert "trust_remote_code" not in path.read_text(), path


def test_pipelines_are_loaded_with_safetensors_only():
    text = (ROOT / "baselines" / "models.py").read_text()
    assert text.count("use_safetensors=True") >= 2
