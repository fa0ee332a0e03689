"""The embedded models shipped in the package load, fit the size budget and match their config."""

import json

import pytest
from conftest import ROOT

from baselines.models import PACKAGED, load_clip, load_pipeline, read_info
from fewstep import experiment

pytestmark = pytest.mark.skipif(
    not (PACKAGED / "MANIFEST.json").is_file(), reason="no shipped models in baselines/pretrained"
)


def test_shipped_models_load_as_fp32():
    pipe = load_pipeline("shapes")
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"
    assert str(pipe.text_encoder.dtype) == "torch.float32"
    clip, tokenizer = load_clip("shapes")
    assert clip.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert read_info("shapes")["method"] == "teacher"


def test_shipped_size_is_within_budget():
    size = sum(f.stat().st_size for f in PACKAGED.rglob("*") if f.is_file())
    assert size <= 16 * 2**20


def test_recorded_config_hashes_match_the_config():
    manifest = json.loads((PACKAGED / "MANIFEST.json").read_text())
    planned = {s.name: s.hash for s in experiment.plan(experiment.load_config(ROOT / manifest["config"]))}
    for stage, digest in manifest["stage_hashes"].items():
        assert planned[stage] == digest, f"{stage}: shipped weights were made by another config"
    assert set(manifest["stage_hashes"]) >= {"vae", "clip", "teacher"}


def test_shipped_recommended_guidance_is_the_ship_stages_choice():
    """The shipped teacher recommends the guidance configs/teacher-shapes.yaml's ship stage chose, and the
    manifest (the shipped models' identity) records it."""
    stages = experiment.load_config(ROOT / "configs/teacher-shapes.yaml").stages
    chosen = stages["ship"]["recommended_guidance_scale"]
    manifest = json.loads((PACKAGED / "MANIFEST.json").read_text())
    assert read_info("shapes")["recommended"]["guidance_scale"] == chosen
    assert manifest["recommended"]["guidance_scale"] == chosen
