"""The sweep stage over two tiny models x two step counts: rows, per-image seeds, resume, NFE accounting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from baselines import models, samplers
from baselines.errors import ConfigError
from eval import sweep as S
from tests.conftest import ROOT, run_cli
from tests.tiny_sweep import save_tiny_models, sweep_fields


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny CFG teacher, a tiny guidance-conditioned student (time_cond_proj_dim) and a tiny CLIP."""
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def sweep_config(root, run, **kw) -> S.SweepStage:
    return S.SweepStage(**{**sweep_fields(root, run), **kw})


def _patch_generate(monkeypatch, fn) -> None:
    """Replace ``generate`` where the sweep calls it: its own warm-up, and ``generate_split``'s (baselines.samplers)."""
    monkeypatch.setattr(S, "generate", fn)
    monkeypatch.setattr(samplers, "generate", fn)


def test_sweep_rows_resume_and_same_seeds(tiny_models, tmp_path, monkeypatch):
    calls = []
    real_generate = S.generate

    warmups = []

    def spy(pipe, prompts, *, seeds, **kw):
        record = (list(prompts), list(seeds), kw["num_inference_steps"], kw["guidance_scale"])
        (warmups if len(seeds) == 1 else calls).append(record)  # a model's untimed one-image warm-up call
        return real_generate(pipe, prompts, seeds=seeds, **kw)

    _patch_generate(monkeypatch, spy)
    cfg, out = sweep_config(tiny_models, tmp_path), tmp_path / "sweep"
    rows = S.run_sweep(cfg, out)

    cells = {(r["model"], r["steps"], r["guidance_scale"]): r for r in rows}
    assert sorted(cells) == [
        ("student", 1, 2.0), ("student", 2, 2.0),
        ("teacher", 1, 1.5), ("teacher", 1, 3.0), ("teacher", 2, 1.5), ("teacher", 2, 3.0),
    ]  # fmt: skip
    # CFG doubles the teacher's U-Net evaluations; the w-conditioned student takes one pass per step
    assert [cells[("teacher", s, 3.0)]["nfe"] for s in (1, 2)] == [2, 4]
    assert [cells[("student", s, 2.0)]["nfe"] for s in (1, 2)] == [1, 2]
    assert cells[("student", 1, 2.0)]["method"] == "guidance" and "student" in cells[("student", 1, 2.0)]["label"]
    for r in rows:
        assert r["n_images"] == 6 and r["seconds_per_image"] > 0 and r["device"] == "cpu"
        lo, hi = r["FD-clip_ci95"]
        assert np.isfinite(r["FD-clip"]) and r["FD-clip"] > 0 and lo < hi  # a real spread, not a copied value
        assert {"KID-clip", "CMMD", "CLIP score", "attribute accuracy"} <= set(r)
        assert 0 <= r["CLIP score"] <= 100 and 0 <= r["attribute accuracy"] <= 1
        assert (out / r["grid"]).is_file()
    assert len({r["config_hash"] for r in rows}) == 6
    # every cell: the same prompts with the same per-image seeds
    assert len(calls) == 6 and all(c[:2] == calls[0][:2] for c in calls)
    # one per (model, sampler, scale) before its timed cells: the teacher's two scales (CFG batch sizes), the student
    assert [w[2:] for w in warmups] == [(1, 1.5), (1, 3.0), (1, 2.0)]
    assert calls[0][1] == list(range(6))
    # different cells really produced different metrics (not one value copied)
    assert len({round(r["FD-clip"], 9) for r in rows}) > 1

    # rerun: every cell is done, nothing is generated
    _patch_generate(monkeypatch, lambda *a, **k: pytest.fail("a finished cell was regenerated"))
    assert len(S.run_sweep(cfg, out)) == 6

    # a killed sweep (last row lost, a torn half-line written) resumes with exactly the missing cell
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    _patch_generate(monkeypatch, spy)
    calls.clear()
    rows2 = S.run_sweep(cfg, out)
    assert len(calls) == 1 and len(rows2) == 6
    lost = json.loads(lines[-1])
    again = [r for r in rows2 if r["config_hash"] == lost["config_hash"]]
    assert len(again) == 1 and again[0]["FD-clip"] == pytest.approx(lost["FD-clip"], rel=1e-6)  # same seeds
    # reference features are cached once per (dataset, features, resolution)
    assert len(list((tmp_path / "cache").glob("ref-*.npy"))) == 2


def test_student_defaults_to_its_distilled_steps(tiny_models):
    cfg = S.SweepStage(models={"s": str(tiny_models / "student")}, samplers=["unipc"], steps=[8, 16])
    info = {"method": "progressive", "recommended": {"num_inference_steps": 4, "guidance_scale": 1.0}}
    assert S.model_cells(cfg, cfg.models[0], info, guidance_conditioned=False) == [("ddim", 4, 1.0)]
    teacher = {"method": "teacher", "recommended": {"num_inference_steps": 50, "guidance_scale": 2.0}}
    cells = S.model_cells(cfg, cfg.models[0], teacher, guidance_conditioned=False)
    assert cells == [("unipc", 8, 2.0), ("unipc", 16, 2.0)]  # a teacher at its recommended scale unless named
    cfg.guidance_scales = [1.0, 3.0]
    assert S.model_cells(cfg, cfg.models[0], teacher, guidance_conditioned=False) == [
        ("unipc", 8, 1.0), ("unipc", 8, 3.0), ("unipc", 16, 1.0), ("unipc", 16, 3.0)
    ]  # fmt: skip
    assert S.model_cells(cfg, cfg.models[0], {"method": "teacher"}, guidance_conditioned=False)[0][2] == 1.0
    cfg.guidance_scales = None
    assert S.model_cells(cfg, cfg.models[0], {"method": "teacher"}, guidance_conditioned=False)[0][2] == 7.5


def test_sweep_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        S.SweepStage(models={"a": "x"}, samplers=["nope"])
    with pytest.raises(ConfigError, match=r"models\[0\].stepz"):
        S.SweepStage(models=[{"name": "a", "path": "x", "stepz": [1]}])
    with pytest.raises(ConfigError, match="unknown metric"):
        S.SweepStage(models={"a": "x"}, metrics=["fid"])
    with pytest.raises(ConfigError, match=r"reference_images must be in \[2, 3000\]"):  # was capped silently
        S.SweepStage(models={"a": "x"}, reference_images=5000)
    S.SweepStage(models={"a": "x"}, reference_images=3000)
    S.SweepStage(models={"a": "x"}, dataset="/my/folder", reference_images=5000)  # a folder: its own size


@pytest.mark.parametrize("config", ["configs/sd15-distill.yaml", "configs/eval-demo.yaml"])
def test_eval_configs_validate(config):
    result = run_cli("run", config, "--dry-run", cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(sweep)" in result.stdout and "(report)" in result.stdout


def test_reference_cache_is_keyed_by_the_extractor_itself(tmp_path):
    """A changed extractor (same name, new code or weights) must not reuse stale cached reference features."""
    cfg = S.SweepStage(models={"a": "x"}, reference_images=6, cache_dir=str(tmp_path))
    calls = []

    def make(shift):
        def extract(x):
            calls.append(len(x))
            return x.flatten(1)[:, :3] + shift

        return extract

    a = S.reference_features(cfg, "feat", make(0.0), 16)
    assert np.array_equal(S.reference_features(cfg, "feat", make(0.0), 16), a)  # cached
    assert calls.count(6) == 1
    b = S.reference_features(cfg, "feat", make(1.0), 16)  # same name, different features
    assert np.allclose(b, a + 1) and calls.count(6) == 2


def test_reference_cache_sees_a_caption_folder_edited_past_its_first_images(tmp_path):
    """The extractor fingerprint reads four images; an edit to the fifth (or a folder grown past the count asked
    for) is another reference set and must not reuse the cached features."""
    import json

    from PIL import Image

    folder = tmp_path / "captions"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = S.SweepStage(models={"a": "x"}, dataset=str(folder), reference_images=6, cache_dir=str(tmp_path / "c"))

    def extract(x):
        return x.flatten(1)[:, :3]

    before = S.reference_features(cfg, "feat", extract, 16)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(folder / "4.png")
    after = S.reference_features(cfg, "feat", extract, 16)
    assert not np.array_equal(after[4], before[4]) and np.array_equal(after[:4], before[:4])
    assert len(list((tmp_path / "c").glob("ref-*.npy"))) == 2


def test_two_clip_extractors_keep_distinct_metric_keys(tiny_models, tmp_path):
    """Two ``clip:`` extractors in one sweep: each gets its own FD / KID keys (folder name in brackets), each
    equal to the plain 'FD-clip' of a sweep with that extractor alone, and the report shows both."""
    from eval.report import render_report

    torch.manual_seed(3)
    tok = models.build_tokenizer()
    other = models.save_clip(models.build_clip(models.get_preset("tiny"), tok), tok, tmp_path / "clip2")
    one_cell = {"models": [{"name": "student", "path": str(tiny_models / "student"), "steps": [1]}]}
    fields = {**one_cell, "metrics": ["fd", "kid"], "grid_images": 0}
    both = [f"clip:{tiny_models / 'clip'}", f"clip:{other}"]
    (row,) = S.run_sweep(sweep_config(tiny_models, tmp_path, extractors=both, **fields), tmp_path / "both")
    keys = {"FD-clip(clip)", "FD-clip(clip2)", "KID-clip(clip)", "KID-clip(clip2)"}
    assert keys <= set(row) and not {"FD-clip", "KID-clip"} & set(row), sorted(row)
    assert row["FD-clip(clip)"] != row["FD-clip(clip2)"]
    for extractor, name in zip(both, ("clip", "clip2")):
        (alone,) = S.run_sweep(sweep_config(tiny_models, tmp_path, extractors=[extractor], **fields), tmp_path / name)
        assert alone["FD-clip"] == pytest.approx(row[f"FD-clip({name})"], rel=1e-9)
        assert alone["KID-clip"] == pytest.approx(row[f"KID-clip({name})"], rel=1e-9)
    text = render_report([tmp_path / "both"], [], tmp_path / "report").read_text()
    for name in ("clip", "clip2"):
        assert f"### FD-clip({name})" in text and f"### KID-clip({name})" in text
        assert (tmp_path / "report" / f"both_FD-clip({name})_vs_nfe.png").is_file()


def test_sweep_samples_on_the_accelerators_device(tiny_models, tmp_path, monkeypatch):
    """Under accelerate on a GPU the models load on its device (before: always the CPU)."""
    from types import SimpleNamespace

    devices = []

    def load(path, device="cpu"):
        devices.append(torch.device(device))
        raise StopIteration  # enough: where it was asked to load

    monkeypatch.setattr(S.models, "load_pipeline", load)
    with pytest.raises(StopIteration):
        S.run_sweep(
            sweep_config(tiny_models, tmp_path), tmp_path, accelerator=SimpleNamespace(device=torch.device("meta"))
        )
    assert devices == [torch.device("meta")]


@pytest.mark.parametrize("model, nfe", [("teacher", [4, 8]), ("student", [2, 4])])
def test_check_teacher_counts_unet_evaluations_and_reads_attributes(tiny_models, tmp_path, model, nfe):
    """The check stage on a CFG teacher (two evaluations per step) and on a guidance-conditioned student (one:
    before, it was counted as CFG too); accuracy per attribute at each scale, FD at each step count."""
    from eval.checks import CheckTeacherStage, run_check_teacher

    cfg = CheckTeacherStage(
        model=str(tiny_models / model),
        clip=str(tiny_models / "clip"),
        extractor=f"clip:{tiny_models / 'clip'}",
        accuracy_images=4,
        accuracy_steps=2,
        guidance_scales=[1.0, 3.0],
        fd_images=6,
        fd_steps=[2, 4],
        fd_guidance_scale=3.0,
        grid_prompts=2,
        grid_seeds=2,
    )
    metrics = run_check_teacher(cfg, tmp_path)
    assert [metrics["fd"][str(n)]["unet_evaluations"] for n in (2, 4)] == nfe
    assert set(metrics["accuracy"]) == {"1.0", "3.0"} and set(metrics["accuracy"]["3.0"]) >= {"shape", "colour"}
    assert (tmp_path / "grid_guidance3.png").is_file()


def test_a_changed_sweep_keeps_its_finished_cells_and_sets_aside_the_removed_ones(tiny_models, tmp_path, monkeypatch):
    """Updated in place (the runner's ``update``), a sweep generates only its new cells; rows of cells the
    config no longer has leave results.jsonl (so the report shows this config) for results.dropped.jsonl."""
    one = [{"name": "student", "path": str(tiny_models / "student"), "steps": [1]}]
    out = tmp_path / "sweep"
    first = S.run_sweep(sweep_config(tiny_models, tmp_path, models=one, metrics=["clip_score"]), out)
    assert [(r["steps"], r["guidance_scale"]) for r in first] == [(1, 2.0)]
    calls = []
    real_generate = S.generate

    def spy(pipe, prompts, *, seeds, **kw):
        if len(seeds) > 1:  # not the model's one-image warm-up
            calls.append((kw["num_inference_steps"], kw["guidance_scale"]))
        return real_generate(pipe, prompts, seeds=seeds, **kw)

    _patch_generate(monkeypatch, spy)
    changed = [{**one[0], "steps": [1, 2]}]
    rows = S.run_sweep(sweep_config(tiny_models, tmp_path, models=changed, metrics=["clip_score"]), out)
    assert calls == [(2, 2.0)] and [r["steps"] for r in rows] == [1, 2]
    assert rows[0] == first[0]  # the finished cell's row, as it was
    fewer = [{**one[0], "steps": [2]}]
    rows = S.run_sweep(sweep_config(tiny_models, tmp_path, models=fewer, metrics=["clip_score"]), out)
    assert calls == [(2, 2.0)] and [r["steps"] for r in rows] == [2]
    assert [r["steps"] for r in S.read_rows(out / "results.dropped.jsonl")] == [1]


def test_eval_verb_sweeps_folders_resumes_and_renders_its_report(tiny_models, tmp_path, monkeypatch):
    """``fewstep eval`` is the sweep stage over folders named on the command line: its options become the
    stage's fields, a rerun skips finished cells, and the report is rendered into --out/report."""
    from fewstep import cli

    clip = str(tiny_models / "clip")
    out = tmp_path / "eval"
    argv = ["eval", f"cfg={tiny_models / 'teacher'}", str(tiny_models / "student"), "--out", str(out)]
    argv += ["--steps", "1", "2", "--guidance-scales", "2.5", "--n-images", "4", "--reference-images", "8"]
    argv += ["--extractors", f"clip:{clip}", "--clip", clip, "--bootstrap", "3", "--batch-size", "4"]
    argv += ["--grid-images", "2", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(argv) == 0
    rows = S.read_rows(out / "results.jsonl")
    # the teacher at the steps and scale asked; the student (named after its folder) at its distilled 2 steps
    assert sorted((r["model"], r["steps"], r["guidance_scale"], r["nfe"]) for r in rows) == [
        ("cfg", 1, 2.5, 2), ("cfg", 2, 2.5, 4), ("student", 2, 2.5, 2),
    ]  # fmt: skip
    assert all(r["n_images"] == 4 and r["extractors"] == [f"clip:{clip}"] for r in rows)
    report = (out / "report" / "report.md").read_text()
    assert "## Sweep `eval` (3 cells, 4 images per cell)" in report and list((out / "report").glob("*.png"))

    _patch_generate(monkeypatch, lambda *a, **k: pytest.fail("a finished cell was regenerated"))
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--samplers", "nope"]) == 2  # the stage's own validation, one line

    monkeypatch.undo()
    assert cli.main([*argv, "--student-steps", "1"]) == 0  # the student at 1 step; the teacher's cells kept
    rows = S.read_rows(out / "results.jsonl")
    assert sorted((r["model"], r["steps"]) for r in rows) == [("cfg", 1), ("cfg", 2), ("student", 1)]


def test_model_specs_name_folders_and_refuse_one_name_for_two(tmp_path):
    stage = tmp_path / "guidance" / "model"
    stage.mkdir(parents=True)
    given = ["shapes", f"{stage}/", "b=runs/b/model", "runs/lr=1e-4/p-2step", "org/model"]
    assert S.model_specs(given) == {
        "shapes": "shapes", "guidance": f"{stage}/", "b": "runs/b/model", "p-2step": "runs/lr=1e-4/p-2step",
        "model": "org/model",  # a hub id, not a local stage folder
    }  # fmt: skip
    with pytest.raises(ConfigError, match="two models are named 'model'"):
        S.model_specs(["runs/a/model", "org/model"])
    with pytest.raises(ConfigError, match="name=folder"):
        S.model_specs(["=runs/a"])


def test_a_sweeps_timestep_spacing_reaches_every_cell_and_its_row(tiny_models, tmp_path, monkeypatch):
    seen = []
    real_generate = S.generate

    def spy(pipe, prompts, *, seeds, **kw):
        seen.append(kw["timestep_spacing"])
        return real_generate(pipe, prompts, seeds=seeds, **kw)

    _patch_generate(monkeypatch, spy)
    fields = sweep_fields(tiny_models, tmp_path)
    cfg = S.SweepStage(**{**fields, "steps": [1], "timestep_spacing": "leading"})
    rows = S.run_sweep(cfg, tmp_path / "sweep")
    assert set(seen) == {"leading", None}  # the student keeps the trailing grid it was distilled on
    assert {(r["model"], r["timestep_spacing"]) for r in rows} == {("teacher", "leading"), ("student", "trailing")}
    plain = S.SweepStage(**{**fields, "models": fields["models"][:1], "steps": [1]})
    entry = cfg.models[0]
    assert (
        S.cell_spacing(cfg, {"method": "teacher"}) == "leading" and S.cell_spacing(cfg, {"method": "guidance"}) is None
    )
    leading = S.cell_hash(cfg, entry, "ddim", 1, 1.5, timestep_spacing=S.cell_spacing(cfg, {"method": "teacher"}))
    assert leading != S.cell_hash(plain, entry, "ddim", 1, 1.5)
    seen.clear()  # another spacing: the teacher's cells run again, the student's (which ignores it) are kept
    S.run_sweep(dataclasses.replace(cfg, timestep_spacing="trailing"), tmp_path / "sweep")
    assert set(seen) == {"trailing"}
    with pytest.raises(ConfigError, match="sweep.timestep_spacing"):
        S.SweepStage(models={"a": "x"}, timestep_spacing="karras")
