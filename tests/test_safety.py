"""Weights are read as safetensors; pickles only with weights_only=True; no remote code."""

import ast
import re

import pytest
from conftest import ROOT

SOURCES = [p for d in ("baselines", "distill", "editing", "eval", "fewstep") for p in (ROOT / d).rglob("*.py")]


def test_every_torch_load_is_weights_only():
    for path in SOURCES:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_nothing_trusts_remote_code():
    for path in SOURCES:
        assert "trust_remote_code" not in path.read_text(), path


def _from_pretrained_calls(path, method="from_pretrained"):
    """(owner name, use_safetensors keyword value or None, line) of every ``X.<method>(...)`` in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
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
    embeddings = [
        (path, flag, line)
        for path in SOURCES
        for _, flag, line in _from_pretrained_calls(path, "load_textual_inversion")
    ]
    assert embeddings and all(flag is True for _, flag, _ in embeddings), embeddings  # a user .bin is never unpickled


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_weights_missing_from_a_file_are_an_error_never_random_weights(tmp_path, component):
    """A weights file whose tensor names do not match its model (another architecture, a damaged export):
    transformers initialised the missing ones at random, saying so only in a log, and diffusers failed with a
    meta-tensor traceback; both are one-line errors naming the component."""
    from safetensors.torch import load_file, save_file

    from baselines import models
    from baselines.errors import FewstepError

    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "m", {"method": "test"})
    models.load_pipeline(folder)  # intact: loads
    (weights,) = (folder / component).glob("*.safetensors")
    renamed = {k.replace("layers.0", "layers.9").replace("down_blocks.0", "down_blocks.9"): v
               for k, v in load_file(weights).items()}  # fmt: skip
    save_file(renamed, weights)
    with pytest.raises(FewstepError, match=rf"{component}.*(lacks \d+ of the model's weights|cannot load)") as e:
        models.load_pipeline(folder)
    assert len(str(e.value).splitlines()) == 1


def test_a_damaged_tokenizer_or_clip_is_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from baselines import models
    from baselines.errors import FewstepError

    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "m", {"method": "test"})
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(FewstepError, match="tokenizer has no vocab.json or tokenizer.json"):
        models.load_pipeline(folder)  # it loaded, then failed with OverflowError at the first prompt
    tokenizer = models.build_tokenizer()
    clip_folder = models.save_clip(models.build_clip(models.get_preset("tiny"), tokenizer), tokenizer, tmp_path / "c")
    models.load_clip(clip_folder)  # intact: loads
    (weights,) = clip_folder.glob("*.safetensors")
    save_file({k.replace("layers.0", "layers.9"): v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(FewstepError, match="lacks .* of the model's weights"):
        models.load_clip(clip_folder)
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(FewstepError, match="cannot load CLIP"):
        models.load_clip(clip_folder)


@pytest.mark.parametrize("text, message", [("{broken", "is not valid JSON"), ("[]", "must hold a JSON object")])
def test_a_damaged_fewstep_json_is_a_one_line_error(tmp_path, text, message):
    from baselines import models
    from baselines.errors import FewstepError

    folder = models.save_pipeline(models.build_pipeline("tiny", seed=0), tmp_path / "m", {"method": "test"})
    (folder / models.INFO_FILE).write_text(text)
    with pytest.raises(FewstepError, match=message):
        models.read_info(folder)


def test_a_mistyped_folder_says_so_when_it_fails_as_a_hub_id(tmp_path, monkeypatch):
    from baselines import models
    from baselines.errors import FewstepError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert models.resolve_model("runs/typo") == "runs/typo"  # owner/name: could be a hub id
    with pytest.raises(FewstepError, match="runs/typo: no such local folder, and as a hub id:"):
        models.load_pipeline("runs/typo")  # offline here: its hub lookup fails
