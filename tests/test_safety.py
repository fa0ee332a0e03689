"""Weights are read as safetensors; pickles only with weights_only=True; no remote code."""

import ast
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


def _from_pretrained_calls(path):
    """(class name, use_safetensors keyword value or None, line) of every ``X.from_pretrained(...)`` in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
            flag = next((k.value for k in node.keywords if k.arg == "use_safetensors"), None)
            yield name, getattr(flag, "value", flag), node.lineno


def test_every_weight_loader_reads_safetensors_only():
    """Every ``from_pretrained`` of a model or pipeline (not a tokenizer or scheduler, which hold no weights)
    passes ``use_safetensors=True``: a folder with only a pickled ``.bin`` is an error, never unpickled."""
    loaders = []
    for path in SOURCES:
        for name, flag, line in _from_pretrained_calls(path):
            if name.endswith(("Tokenizer", "Scheduler")):
                continue
            loaders.append(name)
            assert flag is True, f"{path}:{line}: {name}.from_pretrained without use_safetensors=True"
    assert {"StableDiffusionPipeline", "AutoencoderKL", "CLIPModel", "UNet2DConditionModel"} <= set(loaders)
