import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from baselines.errors import ConfigError, FewstepError
from fewstep import cli, experiment


def test_unknown_key_is_a_one_line_error_with_exit_2():
    result = run_cli("run", "configs/smoke.yaml", "stages.vae.train.stepz=3", "--dry-run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.vae.train.stepz" in lines[0] and "Traceback" not in result.stderr


def test_overrides_may_follow_the_options():
    """``run CONFIG --dry-run key=value``: the override is parsed (here rejected by name), not an
    "unrecognized arguments" error; a stray option still is one."""
    result = run_cli("run", "configs/smoke.yaml", "--dry-run", "stages.vae.train.stepz=3")
    assert result.returncode == 2 and "stages.vae.train.stepz" in result.stderr
    assert "unrecognized" not in result.stderr
    result = run_cli("run", "configs/smoke.yaml", "--dry-run", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_bad_value_names_the_key():
    cfg = experiment.load_config(ROOT / "configs/smoke.yaml", ["stages.vae.train.steps=many"])
    with pytest.raises(ConfigError, match="stages.vae.train.steps"):
        experiment.plan(cfg)
    cfg = experiment.load_config(ROOT / "configs/smoke.yaml", ["stages.vae.kind=nope"])
    with pytest.raises(ConfigError, match="stages.vae.kind"):
        experiment.plan(cfg)
    with pytest.raises(ConfigError, match="lr_schedule"):
        experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml", ["stages.vae.train.lr_schedule=linear"]))


def test_missing_config_file_is_exit_2(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "not found" in result.stderr


@pytest.mark.parametrize("name", ["smoke", "quickstart", "quickstart-full", "teacher-shapes"])
def test_shipped_configs_validate(name):
    stages = experiment.plan(experiment.load_config(ROOT / f"configs/{name}.yaml"))
    assert stages and all(s.output.parts[-1] == s.name for s in stages)


def test_hash_ignores_run_only_fields_but_not_training_ones():
    base = experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml"))[0].hash
    same = experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml", ["stages.vae.train.log_every=7"]))[
        0
    ].hash
    other = experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml", ["stages.vae.train.steps=5"]))[0].hash
    assert base == same != other


def test_an_option_added_later_is_hashed_only_when_set(tmp_path):
    """``init`` (train_vae) and ``vae`` (finetune_teacher) came after models shipped: unset, a stage's hash is
    what it was without the field (so shipped hashes stay valid); set, it changes."""
    import dataclasses

    from baselines.finetune import FinetuneTeacherStage
    from baselines.teacher import TrainVAEStage

    @dataclass
    class Before:  # TrainVAEStage as shipped, without ``init``
        kind: str = "train_vae"
        preset_parts = TrainVAEStage.preset_parts
        preset: str = "shapes"
        dataset: str = "shapes"
        seed: int = 0
        kl_weight: float = 1e-6
        recon_loss: str = "l1"
        scale_images: int = 2048
        train: object = dataclasses.field(default_factory=lambda: TrainVAEStage().train)

    names = [f.name for f in dataclasses.fields(TrainVAEStage)]
    assert [n for n in names if n != "init"] == [f.name for f in dataclasses.fields(Before)]
    assert experiment.config_hash(TrainVAEStage()) == experiment.config_hash(Before())
    assert experiment.config_hash(TrainVAEStage(init=str(tmp_path))) != experiment.config_hash(TrainVAEStage())
    assert experiment.config_hash(FinetuneTeacherStage(vae=str(tmp_path))) != experiment.config_hash(
        FinetuneTeacherStage()
    )


def _hashes(*overrides: str) -> dict[str, str]:
    return {s.name: s.hash for s in experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml", overrides))}


def test_a_changed_stage_changes_the_hash_of_every_stage_reading_it():
    base, changed = _hashes(), _hashes("stages.vae.train.steps=5")
    assert base["vae"] != changed["vae"]
    assert base["teacher"] != changed["teacher"]  # reads ${stages.vae.output}/model
    assert base["clip"] == changed["clip"]  # does not


def test_the_preset_sizes_a_stage_builds_are_part_of_its_hash(monkeypatch):
    import dataclasses

    from baselines import models

    base = _hashes()
    tiny = models.PRESETS["tiny"]
    wider = dataclasses.replace(tiny, unet=dict(tiny.unet, block_out_channels=(16, 48)))
    monkeypatch.setitem(models.PRESETS, "tiny", wider)
    changed = _hashes()
    assert base["teacher"] != changed["teacher"]  # builds the U-Net
    assert base["vae"] == changed["vae"] and base["clip"] == changed["clip"]  # do not


def test_skip_rerun_conflict_and_force(smoke_run):
    n = len(experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml")))
    result = run_cli("run", "configs/smoke.yaml", f"run_dir={smoke_run}")
    assert result.returncode == 0 and result.stdout.count("[skip]") == n
    result = run_cli("run", "configs/smoke.yaml", f"run_dir={smoke_run}", "stages.teacher.train.steps=7")
    assert result.returncode == 2 and "--force teacher" in result.stderr
    result = run_cli("run", "configs/smoke.yaml", f"run_dir={smoke_run}", "--dry-run")
    assert result.stdout.count("[done]") == n
    state = json.loads((smoke_run / "teacher" / "stage.json").read_text())
    assert state["status"] == "done" and (smoke_run / "teacher" / "config.yaml").is_file()


@dataclass
class _Counted:
    """A fake stage kind: appends its name to ``log`` in the run folder's parent (how often it ran)."""

    kind: str = "counted"
    value: int = 0
    reads: str = ""
    model: str = ""


def _run_counted(cfg: _Counted, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out.parent / "ran.txt").open("a") as f:
        f.write(out.name + "\n")


def test_a_stage_naming_the_shipped_models_reruns_when_they_change(tmp_path, monkeypatch):
    """``model: shapes`` (or ``clip: shapes``, the ``embedded`` extractor) names whatever is shipped: new shipped
    weights change the stage's inputs and it reruns by itself; ``preset: shapes`` names sizes and does not."""
    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Counted, _run_counted)})
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: t\nstages:\n  a: {kind: counted}\n  b: {kind: counted, model: shapes}\n")
    ran = tmp_path / "runs" / "ran.txt"

    def run():
        lines = []
        experiment.run(experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}"]), log=lines.append)
        return lines

    run()
    run()
    assert ran.read_text().split() == ["a", "b"]
    monkeypatch.setattr(experiment.models, "shipped_identity", lambda: "new-weights")
    lines = run()
    assert ran.read_text().split() == ["a", "b", "b"] and any(line.startswith("[rerun] b") for line in lines)
    assert not experiment._names_shipped({"preset": "shapes", "dataset": "shapes", "extractor": "embedded:/x/clip"})
    assert experiment._names_shipped({"extractors": ["embedded"]}) and experiment._names_shipped({"clip": "shapes"})


def test_a_stage_that_takes_the_accelerator_gets_the_runs_also_when_only_the_main_process_runs_it(
    tmp_path, monkeypatch
):
    """A single-process stage (attribute_eval, edits) that declares ``accelerator`` loads its models on the
    accelerator's device: it must be given the run's accelerator, not left on the CPU default."""
    seen = []

    def run_with_accelerator(cfg: _Counted, out: Path, accelerator=None) -> None:
        seen.append(accelerator)

    monkeypatch.setattr(
        experiment,
        "_registry",
        lambda: {
            "counted": experiment.StageKind(_Counted, _run_counted),
            "placed": experiment.StageKind(_Counted, run_with_accelerator),
        },
    )
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: t\nstages:\n  a: {kind: counted}\n  b: {kind: placed}\n")
    experiment.run(experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}"]), log=lambda _: None)
    assert (tmp_path / "runs" / "ran.txt").read_text().split() == ["a"]
    assert len(seen) == 1 and seen[0] is not None and hasattr(seen[0], "device")


def test_a_stage_reruns_when_a_user_file_it_names_changes(tmp_path, monkeypatch):
    """A prompts file (or input image, mask) is named by path: editing it reruns the stage and, through its
    hash, the stages reading it (also in a later invocation); a missing one is an error before any output is
    replaced; dataset names and folders are not hashed."""

    @dataclass
    class _Prompts(_Counted):
        prompts: str = ""

    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Prompts, _run_counted)})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"experiment: t\nstages:\n  a: {{kind: counted, prompts: {prompts}}}\n"
        "  b: {kind: counted, reads: '${stages.a.output}/x'}\n  c: {kind: counted}\n"
    )
    ran = tmp_path / "runs" / "ran.txt"

    def cfg():
        return experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}"])

    def run():
        lines = []
        experiment.run(cfg(), log=lines.append)
        return lines

    run()
    run()
    assert ran.read_text().split() == ["a", "b", "c"]
    before = {s.name: s.hash for s in experiment.plan(cfg())}
    prompts.write_text("a blue square\n")
    after = {s.name: s.hash for s in experiment.plan(cfg())}
    assert before["a"] != after["a"] and before["b"] != after["b"] and before["c"] == after["c"]
    lines = run()
    assert ran.read_text().split() == ["a", "b", "c", "a", "b"] and any(line.startswith("[rerun] a") for line in lines)
    prompts.rename(tmp_path / "moved.txt")
    with pytest.raises(ConfigError, match="stages.a: file not found"):
        run()
    assert (tmp_path / "runs" / "a" / "stage.json").is_file()  # the finished output was not replaced
    assert experiment.files_digest({"prompts": "shapes", "image": str(tmp_path)}) == ("", [])


def test_a_forced_stage_reruns_its_readers_and_a_changed_config_stops_before_anything_runs(tmp_path, monkeypatch):
    """``--force a`` with a new config for ``a`` reruns ``a`` and, automatically, ``b`` that reads it (same
    config, changed input); ``c`` reads nothing and is skipped. A stage whose own config changed without
    ``--force`` is an error raised before any stage runs, also when it comes after a stale one."""
    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Counted, _run_counted)})
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: t\nstages:\n"
        "  a: {kind: counted}\n"
        "  b: {kind: counted, reads: '${stages.a.output}/model'}\n"
        "  c: {kind: counted}\n"
    )
    ran = tmp_path / "runs" / "ran.txt"

    def run(*overrides, force=()):
        cfg = experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}", *overrides])
        lines = []
        experiment.run(cfg, force=list(force), log=lines.append)
        return lines

    run()
    assert ran.read_text().split() == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="--force a"):
        run("stages.a.value=1")
    with pytest.raises(ConfigError, match="stages 'a', 'c' .* --force a --force c to replace them"):
        run("stages.a.value=1", "stages.c.value=1")  # every conflict in one error, not one per attempt
    assert ran.read_text().split() == ["a", "b", "c"]
    lines = run("stages.a.value=1", force=["a"])
    assert ran.read_text().split() == ["a", "b", "c", "a", "b"]
    assert any(line.startswith("[rerun] b") for line in lines) and any(line.startswith("[skip] c") for line in lines)
    with pytest.raises(ConfigError, match="--force c"):
        run("stages.a.value=2", "stages.c.value=1", force=["a"])  # c conflicts: a must not run first
    assert ran.read_text().split() == ["a", "b", "c", "a", "b"]
    dry = []
    experiment.run(
        experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}", "stages.a.value=2"]),
        dry_run=True,
        force=["a"],
        log=dry.append,
    )
    assert [line.split("]")[0] for line in dry if line.startswith("[")] == [
        "[force",
        "[to rerun: an input changed",
        "[done",
    ]
    lines = run("stages.a.value=1", force=["a"])  # the same config forced (after a code change): b reruns too
    assert ran.read_text().split() == ["a", "b", "c", "a", "b", "a", "b"]
    assert any(line.startswith("[rerun] b") for line in lines) and any(line.startswith("[skip] c") for line in lines)


def _run_counted_keeping(cfg: _Counted, out: Path) -> None:
    """An incremental fake: records how many files it found already in its output (work kept from before)."""
    kept = len(list(out.glob("work-*")))
    (out / f"work-{cfg.value}").write_text("")
    with (out.parent / "ran.txt").open("a") as f:
        f.write(f"{out.name}:{kept}\n")


def test_an_incremental_stage_updates_in_place_when_its_config_changes(tmp_path, monkeypatch):
    """A sweep-like (incremental) stage whose own config changed is not a conflict: it runs again in its
    output folder, finding its finished work there, and the stages reading it rerun; ``--force`` still
    starts it afresh. When an input changed too (a stage it reads reruns), its finished work may be wrong: a
    conflict again, raised before anything runs. A plain stage with a changed config is still a conflict."""
    monkeypatch.setattr(
        experiment,
        "_registry",
        lambda: {
            "counted": experiment.StageKind(_Counted, _run_counted),
            "keeping": experiment.StageKind(_Counted, _run_counted_keeping, incremental=True),
        },
    )
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: t\nstages:\n"
        "  a: {kind: counted}\n"
        "  s: {kind: keeping, reads: '${stages.a.output}'}\n"
        "  r: {kind: counted, reads: '${stages.s.output}'}\n"
    )
    ran = tmp_path / "runs" / "ran.txt"

    def run(*overrides, force=(), dry_run=False):
        cfg = experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}", *overrides])
        lines = []
        experiment.run(cfg, force=list(force), dry_run=dry_run, log=lines.append)
        return lines

    run()
    dry = run("stages.s.value=1", dry_run=True)
    assert [line.split("]")[0] for line in dry if line.startswith("[")] == [
        "[done",
        "[to update: its config changed; finished work is kept",
        "[to rerun: an input changed",
    ]
    state_file = tmp_path / "runs" / "s" / "stage.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "seconds": 100.0}))  # the first run's
    lines = run("stages.s.value=1")
    assert any(line.startswith("[update] s") for line in lines)
    assert ran.read_text().split() == ["a", "s:0", "r", "s:1", "r"]  # s found its first run's work
    assert 100.0 <= json.loads(state_file.read_text())["seconds"] < 110  # the update's seconds add to the first's
    with pytest.raises(ConfigError, match="--force s"):
        run("stages.a.value=1", "stages.s.value=2", force=["a"])  # s's input changes too
    assert ran.read_text().split()[-1] == "r"  # nothing ran
    run("stages.s.value=2", force=["s"])
    assert ran.read_text().split()[-2:] == ["s:0", "r"]  # forced: a fresh folder
    with pytest.raises(ConfigError, match="--force r"):
        run("stages.s.value=2", "stages.r.value=1")


@dataclass
class _Failing(_Counted):
    fail: bool = False


def _run_failing(cfg: _Failing, out: Path) -> None:
    if cfg.fail and os.environ.get("FEWSTEP_TEST_FAIL") == "1":
        raise FewstepError("stopped on purpose")
    _run_counted(cfg, out)


def test_a_forced_rerun_cut_short_still_reruns_its_readers_next_time(tmp_path, monkeypatch):
    """``--force a`` with a's config unchanged keeps a's hash; when the run stops (here: ``mid`` fails) before
    ``b``, which reads ``a``, reruns, the next invocation must still see b as stale: b recorded which run of a it
    read."""
    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Failing, _run_failing)})
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: t\nstages:\n"
        "  a: {kind: counted}\n"
        "  mid: {kind: counted, fail: true}\n"
        "  b: {kind: counted, reads: '${stages.a.output}/model'}\n"
    )
    ran = tmp_path / "runs" / "ran.txt"

    def run(force=()):
        experiment.run(experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}"]), force=list(force), log=print)

    run()
    monkeypatch.setenv("FEWSTEP_TEST_FAIL", "1")
    with pytest.raises(FewstepError, match="on purpose"):
        run(force=["a", "mid"])
    assert ran.read_text().split() == ["a", "mid", "b", "a"]
    monkeypatch.setenv("FEWSTEP_TEST_FAIL", "0")
    run()  # before: [skip] b, done on the a it no longer matches
    assert ran.read_text().split() == ["a", "mid", "b", "a", "mid", "b"]
    run()
    assert ran.read_text().split() == ["a", "mid", "b", "a", "mid", "b"]
    for name in ("a", "mid", "b"):  # stage.json as written before read runs were recorded
        state_file = tmp_path / "runs" / name / "stage.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({k: v for k, v in state.items() if k not in ("run_id", "read_runs")}))
    run()
    assert ran.read_text().split() == ["a", "mid", "b", "a", "mid", "b"]  # old runs stay done
    monkeypatch.setenv("FEWSTEP_TEST_FAIL", "1")
    with pytest.raises(FewstepError, match="on purpose"):
        run(force=["a", "mid"])
    monkeypatch.setenv("FEWSTEP_TEST_FAIL", "0")
    run()  # b, recorded by the older code, reads an a made since
    assert ran.read_text().split()[-3:] == ["a", "mid", "b"]


def test_run_dir_spelling_does_not_hide_what_a_stage_reads(tmp_path):
    for run_dir in ("./runs/q/", "runs//q", "runs/q"):
        stages = experiment.plan(experiment.load_config(ROOT / "configs/smoke.yaml", [f"run_dir={run_dir}"]))
        reads = {s.name: s.reads for s in stages}
        assert reads["teacher"] == ("vae", "clip"), run_dir  # before: () for ./runs/q/, so nothing reran
        assert all(str(s.output).startswith("runs/q/") for s in stages)


def test_a_stage_naming_a_later_stage_is_a_config_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "experiment: t\nstages:\n"
        "  edit: {kind: sdedit, model: '${stages.teacher.output}/model'}\n"
        "  teacher: {kind: load_teacher, model: shapes}\n"
    )
    with pytest.raises(ConfigError, match="stages.edit reads stages.teacher, which runs after it"):
        experiment.plan(experiment.load_config(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("experiment: t\nstages: {a: {kind: counted}\n", "did not find expected ',' or '}' (line 3)"),
        ("experiment: t\nexperiment: u\nstages: {}\n", "found duplicate key experiment (line 2)"),
        ("experiment: t\nstages: [a]\n", "'stages' must map stage names"),
        ("experiment: t\nstages: {a: 1}\n", "stages.a must be a mapping"),
        ("- a\n- b\n", "an experiment is a mapping"),
        (b"experiment: \xff\xfe\n", "cannot read it as a YAML text file"),
        ("experiment: t\nseed: 1\nstages: {}\n", "a top-level seed is not used"),
    ],
)
def test_a_malformed_experiment_file_is_a_one_line_error(tmp_path, capsys, text, message):
    path = tmp_path / "exp.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert cli.main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_stage_folder_without_its_state_file_is_cleared_not_resumed(tmp_path, monkeypatch):
    """Files but no stage.json (a clean-up killed half way): the stage starts afresh rather than resuming
    checkpoints made under another config."""
    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Counted, _run_counted)})
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: t\nstages:\n  a: {kind: counted}\n")
    leftover = tmp_path / "runs" / "a" / "train" / "checkpoints" / "step-5"
    leftover.mkdir(parents=True)
    lines = []
    experiment.run(experiment.load_config(path, [f"run_dir={tmp_path / 'runs'}"]), log=lines.append)
    assert not leftover.exists() and any(line.startswith("[clear] a") for line in lines)


def test_a_damaged_stage_state_or_a_set_output_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "_registry", lambda: {"counted": experiment.StageKind(_Counted, _run_counted)})
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: t\nstages:\n  a: {kind: counted}\n")
    overrides = [f"run_dir={tmp_path / 'runs'}"]
    experiment.run(experiment.load_config(path, overrides), log=print)
    (tmp_path / "runs" / "a" / "stage.json").write_text("{torn")
    with pytest.raises(ConfigError, match=r"stage.json is damaged: --force a"):
        experiment.run(experiment.load_config(path, overrides), dry_run=True, log=print)
    experiment.run(experiment.load_config(path, overrides), force=["a"], log=print)  # what the message advises
    assert json.loads((tmp_path / "runs" / "a" / "stage.json").read_text())["status"] == "done"
    with pytest.raises(ConfigError, match="stages.a.output is set by the runner"):
        experiment.load_config(path, [*overrides, "stages.a.output=elsewhere"])  # it was silently replaced
