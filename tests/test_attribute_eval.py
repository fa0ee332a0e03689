"""The attribute_eval stage on tiny components: prompts, textual-inversion tokens, rows, resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from baselines import data, models
from baselines.errors import ConfigError
from eval import attributes as A


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    pipe = models.build_pipeline("tiny", seed=0)
    info = {"method": "teacher", "recommended": {"num_inference_steps": 2, "guidance_scale": 2.0}}
    models.save_pipeline(pipe, root / "teacher", info)
    torch.manual_seed(2)
    tok = models.build_tokenizer()
    models.save_clip(models.build_clip(models.get_preset("tiny"), tok), tok, root / "clip")
    width = pipe.text_encoder.config.hidden_size
    save_file({"<tok>": torch.randn(1, width, generator=torch.Generator().manual_seed(0))}, root / "embeds.safetensors")
    return root


def test_entry_prompts_set_attributes_and_replace_words_with_the_phrase():
    entry = A.AttributeEntry(name="x", model="m", set={"colour": "purple"}, replace=["colour"], phrase="sks")
    prompts, targets = A.entry_prompts(entry, 30)
    assert all(t["colour"] == "purple" and t["background"] != "purple" for t in targets)
    assert all(" sks " in p and "purple" not in p for p in prompts)
    assert prompts[0] == data.caption(targets[0]).replace("purple", "sks")


def test_wilson_interval_matches_the_textbook_values():
    assert A.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert A.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert A.wilson_interval(10, 10)[1] == 1.0


def test_bad_entries_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown attribute"):
        A.AttributeEntry(name="x", model="m", set={"hue": "red"})
    with pytest.raises(ConfigError, match="not a shapes value"):
        A.AttributeEntry(name="x", model="m", set={"colour": "mauve"})
    with pytest.raises(ConfigError, match="replace"):
        A.AttributeEntry(name="x", model="m", replace=["background"])
    with pytest.raises(ConfigError, match="no value to score"):  # scored against a random colour before
        A.AttributeEntry(name="x", model="m", replace=["colour"], phrase="sks")
    with pytest.raises(ConfigError, match="same value"):  # no caption qualified: entry_prompts looped forever
        A.AttributeEntry(name="x", model="m", set={"colour": "red", "background": "red"})
    with pytest.raises(ConfigError, match="n_images"):
        A.AttributeEvalStage(n_images=0)


def test_stage_writes_one_row_per_entry_loads_tokens_and_resumes(tiny, tmp_path, monkeypatch):
    entries = [
        {"name": "teacher", "model": str(tiny / "teacher"), "set": {"shape": "triangle"}},
        {
            "name": "token",
            "model": str(tiny / "teacher"),
            "set": {"colour": "purple", "shape": "triangle"},
            "replace": ["colour", "shape"],
            "phrase": "<tok>",
            "embeddings": str(tiny / "embeds.safetensors"),
        },
    ]
    cfg = A.AttributeEvalStage(entries=entries, n_images=6, clip=str(tiny / "clip"), batch_size=3, grid_images=4)
    seen = []
    real = A.generate

    def spy(pipe, prompts, **kw):
        images = real(pipe, prompts, **kw)
        tok_loaded = pipe.tokenizer.convert_tokens_to_ids("<tok>") != pipe.tokenizer.unk_token_id
        seen.append((list(prompts), tok_loaded, images))
        return images

    monkeypatch.setattr(A, "generate", spy)
    rows = A.run_attribute_eval(cfg, tmp_path)
    assert [r["name"] for r in rows] == ["teacher", "token"]
    assert seen[1][1] and all("<tok>" in p for p in seen[1][0])  # the token was loaded and used
    from eval.metrics import load_clip_model, zero_shot_correct

    clip = load_clip_model(str(tiny / "clip"))
    for row, entry, (_, _, images) in zip(rows, entries, seen):
        assert row["n_images"] == 6 and row["steps"] == 2 and row["nfe"] == 4
        targets = data.ShapesDataset(split="heldout").attributes_with(entry["set"], 6)
        assert all(t["shape"] == "triangle" for t in targets)
        correct = zero_shot_correct(clip.model, clip.tokenizer, clip.pixels(images * 2 - 1), targets)
        for key in data.ATTRIBUTES:  # the CLIP's reading of the generated images against the set attributes
            assert row["accuracy"][key] == pytest.approx(sum(correct[key]) / 6)
            assert row["interval"][key] == pytest.approx(list(A.wilson_interval(sum(correct[key]), 6)))
        assert (tmp_path / row["grid"]).is_file()
    seen.clear()
    assert A.run_attribute_eval(cfg, tmp_path) == rows and seen == []  # finished entries are skipped


def test_report_renders_the_attribute_table_and_grids(tiny, tmp_path):
    from eval.report import report_run_dir

    entries = [{"name": "teacher triangles", "model": str(tiny / "teacher"), "set": {"shape": "triangle"}}]
    cfg = A.AttributeEvalStage(entries=entries, n_images=4, clip=str(tiny / "clip"), grid_images=4)
    (row,) = A.run_attribute_eval(cfg, tmp_path / "run" / "personalisation")
    text = report_run_dir(tmp_path / "run").read_text()
    assert "## Attributes of generated images `personalisation`" in text
    assert f"| teacher triangles | `{row['prompt_example']}` | 4 | 2 |" in text  # code span: <tokens> survive
    assert (tmp_path / "run" / "report" / f"personalisation_{row['grid']}").is_file()


def test_stage_loads_its_models_on_the_accelerators_device(tiny, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from eval import attributes as A

    devices = []

    def load(path, device="cpu"):
        devices.append(torch.device(device))
        raise StopIteration

    monkeypatch.setattr(A.models, "load_pipeline", load)
    cfg = A.AttributeEvalStage(
        entries=[{"name": "teacher", "model": str(tiny / "teacher"), "set": {"shape": "triangle"}}],
        clip=str(tiny / "clip"),
        n_images=2,
    )
    with pytest.raises(StopIteration):
        A.run_attribute_eval(cfg, tmp_path, accelerator=SimpleNamespace(device=torch.device("meta")))
    assert devices == [torch.device("meta")]


@pytest.mark.parametrize(
    "stage, bad",
    [
        ("CheckCLIPStage", dict(num_images=10_001)),
        ("CheckEvaluatorStage", dict(num_images=5_001)),  # two disjoint sets of it
        ("CheckTeacherStage", dict(fd_images=5_001)),  # prompts, then as many real images after them
        ("CheckTeacherStage", dict(grid_prompts=300)),  # more than its 200 accuracy captions
        ("AttributeEvalStage", dict(n_images=6_000)),
    ],
)
def test_counts_beyond_the_heldout_split_are_config_errors(stage, bad):
    """They passed the config and crashed on an IndexError after the stage's first work (the split is fixed)."""
    from baselines.errors import ConfigError
    from eval import attributes, checks

    cls = getattr(checks, stage, None) or getattr(attributes, stage)
    with pytest.raises(ConfigError, match=next(iter(bad))):
        cls(**bad)
