"""The stage runner: an experiment is an OmegaConf YAML whose ``stages`` run in order.

Each stage has a ``kind`` from ``STAGES``, is validated against that kind's dataclass (an unknown
key or a bad value is a one-line ``ConfigError``), and writes to ``<run_dir>/<stage name>/``.
A stage may refer to an earlier one's folder as ``${stages.NAME.output}``. A stage whose folder
holds a finished run with the same config hash is skipped; a half-finished one resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from baselines import models
from baselines.errors import ConfigError, FewstepError


@dataclass(frozen=True)
class StageKind:
    """A registered stage: its config dataclass, its function and whether all processes run it. A function
    with an ``accelerator`` parameter gets the run's accelerator (its device is where the stage loads its
    models), also when only the main process runs it. An ``incremental`` stage keys its finished work by
    content (a sweep's cells), so a change of its own config updates its output in place: no conflict, nothing
    finished is redone."""

    config: type
    run: Callable
    distributed: bool = False
    incremental: bool = False

    def __call__(self, config, out: Path, accelerator) -> None:
        if "accelerator" in inspect.signature(self.run).parameters:
            self.run(config, out, accelerator=accelerator)
        else:
            self.run(config, out)


def _registry() -> dict[str, StageKind]:
    from baselines import finetune, teacher
    from distill import guidance, progressive
    from editing import dreambooth, imagic, inpaint, sdedit, textual_inversion
    from eval import attributes, checks, edits, report, sweep

    return {
        "train_vae": StageKind(teacher.TrainVAEStage, teacher.run_train_vae, distributed=True),
        "train_clip": StageKind(teacher.TrainCLIPStage, teacher.run_train_clip, distributed=True),
        "finetune_clip": StageKind(teacher.FinetuneCLIPStage, teacher.run_finetune_clip, distributed=True),
        "train_teacher": StageKind(teacher.TrainTeacherStage, teacher.run_train_teacher, distributed=True),
        "finetune_teacher": StageKind(finetune.FinetuneTeacherStage, finetune.run_finetune_teacher, distributed=True),
        "load_teacher": StageKind(teacher.LoadTeacherStage, teacher.run_load_teacher),
        "check_clip": StageKind(checks.CheckCLIPStage, checks.run_check_clip),
        "check_evaluator": StageKind(checks.CheckEvaluatorStage, checks.run_check_evaluator),
        "check_teacher": StageKind(checks.CheckTeacherStage, checks.run_check_teacher),
        "ship": StageKind(checks.ShipStage, checks.run_ship),
        # distill/ (progressive, guidance)
        "progressive": StageKind(progressive.ProgressiveStage, progressive.run_progressive, distributed=True),
        "guidance": StageKind(guidance.GuidanceStage, guidance.run_guidance, distributed=True),
        # editing/ (imagic, sdedit, inpaint, textual_inversion, dreambooth)
        "imagic": StageKind(imagic.ImagicStage, imagic.run_imagic, distributed=True),
        "sdedit": StageKind(sdedit.SDEditStage, sdedit.run_sdedit),
        "inpaint": StageKind(inpaint.InpaintStage, inpaint.run_inpaint),
        "textual_inversion": StageKind(
            textual_inversion.TextualInversionStage, textual_inversion.run_textual_inversion, distributed=True
        ),
        "dreambooth": StageKind(dreambooth.DreamBoothStage, dreambooth.run_dreambooth, distributed=True),
        # eval/ (sweep, edit_eval, report)
        "sweep": StageKind(sweep.SweepStage, sweep.run_sweep, distributed=True, incremental=True),
        "edit_eval": StageKind(edits.EditEvalStage, edits.run_edit_eval),
        "attribute_eval": StageKind(attributes.AttributeEvalStage, attributes.run_attribute_eval),
        "report": StageKind(report.ReportStage, report.run_report),
    }


# Fields that change how a stage runs but not what it produces: left out of the config hash.
_NOT_HASHED = {"resume", "log_every", "checkpoint_every", "keep_checkpoints"}


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a resolved experiment."""

    name: str
    kind: str
    config: object
    output: Path
    hash: str  # config + preset sizes + the hashes of the stages it reads
    own_hash: str = ""  # config + preset sizes only: equal to the stored one when only an input changed
    reads: tuple[str, ...] = ()  # names of the earlier stages whose output it reads
    missing: tuple[str, ...] = ()  # user files it names that do not exist (an error before it would run)
    inputs_hash: str = ""  # the stages it reads, the files it names, the shipped models: only its inputs


def config_hash(config: object, inputs: Sequence[str] = ()) -> str:
    """sha256 (first 16 hex digits) of a stage config, ignoring run-only fields and the options a config
    class lists in ``hashed_when_set`` while they are None, plus what the config
    names but does not spell out: the sizes of the preset components it builds (``preset_parts``) and
    the hashes of the earlier stages whose outputs it reads (``inputs``). Either changes the hash."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _NOT_HASHED}
        return x

    payload = strip(asdict(config))
    for key in getattr(config, "hashed_when_set", ()):  # options added after models shipped: unset = as before
        if payload.get(key) is None:
            payload.pop(key, None)
    parts = getattr(config, "preset_parts", ())
    if parts:
        sizes = asdict(models.get_preset(config.preset))
        payload["_preset"] = {k: sizes[k] for k in parts}
    if inputs:
        payload["_inputs"] = sorted(inputs)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _named_strings(x, key: str = ""):
    """(key, value) of every string in a config's nested dicts and lists (a list's items under its key)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _named_strings(v, k)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _named_strings(v, key)
    elif isinstance(x, str):
        yield key, x


def _names_output(strings: list[str], output: Path) -> bool:
    """Whether a string names ``output`` or a path inside it (also after a scheme prefix such as ``clip:``),
    however it is spelt (``./runs/x``, ``runs//x``, ``runs/x/``)."""
    target = os.path.normpath(output)
    for s in strings:
        path = os.path.normpath(s.split(":", 1)[-1])
        if path == target or path.startswith(target + os.sep):
            return True
    return False


def _reads(config: object, earlier: list[PlannedStage]) -> list[PlannedStage]:
    """The earlier stages whose output folder (or a path inside it) ``config`` names, also after a scheme
    prefix such as ``embedded:``."""
    named = [s for _, s in _named_strings(asdict(config))]
    return [p for p in earlier if _names_output(named, p.output)]


SHIPPED_NAMES = ("shapes", "embedded")  # a model or extractor name that means the shipped embedded models
MODEL_KEYS = ("model", "teacher", "student", "clip", "vae", "path", "extractor", "extractors")


def _names_shipped(config: dict) -> bool:
    """Whether a config names the shipped models under a model key (``model: shapes``, ``clip: shapes``, the
    ``embedded`` extractor); ``preset: shapes`` and ``dataset: shapes`` name sizes and data, not weights."""
    return any(key in MODEL_KEYS and value in SHIPPED_NAMES for key, value in _named_strings(config))


FILE_KEYS = ("prompts", "image", "mask")  # keys naming a user file a stage reads (a folder is not hashed)


def files_digest(config: dict, earlier_outputs: Sequence[Path] = ()) -> tuple[str, list[str]]:
    """(one digest of the contents of the files a config names under ``FILE_KEYS``, "" when none; the named
    files that do not exist). The digest is among the stage's hash inputs, so an edited prompts file, input
    image or mask reruns the stage, and the stages that read it, although its path (the config) is the same.
    Dataset names (``shapes``), folders and files inside earlier stages' outputs (their hashes cover them) are
    left out."""
    combined, found, missing = hashlib.sha256(), False, []
    earlier = [o.resolve() for o in earlier_outputs]
    for key, value in _named_strings(config):
        path = Path(value)
        if key not in FILE_KEYS or value == "shapes" or any(path.resolve().is_relative_to(o) for o in earlier):
            continue
        if not path.exists():
            missing.append(value)
            digest = "missing"
        elif path.is_dir():
            continue
        else:
            try:
                with path.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                raise ConfigError(f"cannot read the {key} file {path}: {e.strerror}") from None
        combined.update(f"{key}:{value}:{digest}\n".encode())
        found = True
    return (combined.hexdigest()[:16] if found else ""), missing


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Read an experiment YAML and merge ``key=value`` overrides (OmegaConf dotlist syntax)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    try:
        cfg = OmegaConf.load(path)
        if not OmegaConf.is_dict(cfg):
            raise ConfigError(f"{path}: an experiment is a mapping with keys experiment and stages")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except yaml.MarkedYAMLError as e:  # what is wrong and where, not the parser's context line
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigError(f"{path}: {e.problem or _first_line(e)}{where}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {_first_line(e)}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read it as a YAML text file ({e.__class__.__name__})") from None
    for key in ("experiment", "stages"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing top-level key '{key}'")
    if not OmegaConf.is_dict(cfg.stages):
        raise ConfigError(f"{path}: 'stages' must map stage names to stage configs")
    for name in cfg.stages:
        if not OmegaConf.is_dict(cfg.stages[name]):
            raise ConfigError(f"{path}: stages.{name} must be a mapping with a 'kind'")
    if "seed" in cfg:  # accepted once and used by nothing: each stage seeds itself
        raise ConfigError(
            f"{path}: a top-level seed is not used; set the stages' seeds (or vars.seed and ${{vars.seed}} in them)"
        )
    unknown = set(cfg.keys()) - {"experiment", "run_dir", "stages", "vars"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}'")
    if "run_dir" not in cfg:
        cfg.run_dir = f"runs/{cfg.experiment}"
    for name in cfg.stages:
        if "output" in cfg.stages[name]:
            raise ConfigError(f"stages.{name}.output is set by the runner ({cfg.run_dir}/{name}): set run_dir instead")
        cfg.stages[name].output = f"{cfg.run_dir}/{name}"
    return cfg


def plan(cfg: DictConfig) -> list[PlannedStage]:
    """Resolve and validate every stage; raises ``ConfigError`` naming the bad key."""
    registry = _registry()
    planned = []
    for name, raw in cfg.stages.items():
        try:
            stage = OmegaConf.to_container(raw, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"stages.{name}: {_first_line(e)}") from None
        output = Path(stage.pop("output"))
        kind = stage.get("kind")
        if kind not in registry:
            raise ConfigError(f"stages.{name}.kind: {kind!r} is not one of {sorted(registry)}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(registry[kind].config), stage)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            where = f"stages.{name}.{key}" if key else f"stages.{name}"
            raise ConfigError(f"{where}: {_first_line(e)}") from None
        except FewstepError as e:
            raise ConfigError(f"stages.{name}: {e}") from None
        later = [n for n in list(cfg.stages)[len(planned) + 1 :] if n != name]
        named = [v for _, v in _named_strings(asdict(config))]
        ahead = [n for n in later if _names_output(named, Path(str(cfg.stages[n].output)))]
        if ahead:
            raise ConfigError(f"stages.{name} reads stages.{ahead[0]}, which runs after it: put {ahead[0]} first")
        reads = _reads(config, planned)
        inputs = [p.hash for p in reads]
        files, missing = files_digest(asdict(config), [p.output for p in planned])
        if files:  # edited user files: an input changed, the stage (and every stage reading it) reruns
            inputs.append(f"files:{files}")
        try:
            if _names_shipped(asdict(config)):  # new shipped weights: an input changed, the stage reruns
                inputs.append(f"shipped:{models.shipped_identity()}")
            digest, own = config_hash(config, inputs), config_hash(config)
        except FewstepError as e:
            raise ConfigError(f"stages.{name}.preset: {e}") from None
        reads_names = tuple(p.name for p in reads)
        inputs_digest = hashlib.sha256(json.dumps(sorted(inputs)).encode()).hexdigest()[:16]
        planned.append(
            PlannedStage(name, kind, config, output, digest, own, reads_names, tuple(missing), inputs_digest)
        )
    return planned


def _read_state(output: Path, *, forced: bool = False) -> dict:
    """A stage folder's stage.json ({} when absent, or damaged in a stage about to be forced afresh)."""
    path = output / "stage.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        if forced:
            return {}
        raise ConfigError(f"{path} is damaged: --force {output.name} (or delete {output}) to run it again") from None


def _write_state(output: Path, stage: PlannedStage, status: str, **extra) -> None:
    output.mkdir(parents=True, exist_ok=True)
    state = {
        "name": stage.name,
        "kind": stage.kind,
        "hash": stage.hash,
        "config_hash": stage.own_hash,
        "inputs_hash": stage.inputs_hash,
    }
    state.update(status=status, **extra)
    tmp = output / ".stage.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(output / "stage.json")


def stage_status(
    stage: PlannedStage, state: dict, *, forced: bool = False, rerun: Sequence[str] = (), incremental: bool = False
) -> str:
    """``force`` (named by ``--force``), ``done`` (finished with this hash), ``resume`` (started with
    this hash), ``new`` (no output), ``stale`` (same config, but a stage it reads or a file it names has
    changed since, or a stage it reads runs again in this invocation (``rerun``): rerun), ``conflict`` (made
    with another config of its own: replace only with ``--force``) or, for an ``incremental`` stage kind
    whose inputs are as they were, ``update`` instead of a conflict (run again in place, keeping what is
    finished: only its own config changed, so its finished work stays valid)."""
    if forced:
        return "force"
    if not state:
        return "new"
    if state.get("hash") == stage.hash:
        if set(stage.reads) & set(rerun):
            return "stale"
        return "done" if state.get("status") == "done" else "resume"
    if state.get("config_hash") == stage.own_hash:
        return "stale"
    same_inputs = state.get("inputs_hash") == stage.inputs_hash and not set(stage.reads) & set(rerun)
    return "update" if incremental and same_inputs else "conflict"


def outdated_reads(stage: PlannedStage, state: dict, states: dict[str, dict]) -> set[str]:
    """The stages ``stage`` reads whose output was made again after it read them (their ``run_id`` is not the
    one it recorded): a forced rerun cut short before reaching its readers leaves them to rerun next time."""
    if not state:
        return set()
    seen = state.get("read_runs") or {}  # none recorded (an older run): any input with a run id was made since
    return {n for n in stage.reads if states.get(n, {}).get("run_id") != seen.get(n)}


def _statuses(
    stages: list[PlannedStage], states: dict[str, dict], force: Sequence[str], registry: dict[str, StageKind]
) -> dict[str, str]:
    """Each stage's status before anything runs, a stage reading one that will run counted stale."""
    statuses: dict[str, str] = {}
    will_run: set[str] = set()
    for s in stages:
        rerun = will_run | outdated_reads(s, states[s.name], states)
        statuses[s.name] = stage_status(
            s, states[s.name], forced=s.name in force, rerun=rerun, incremental=registry[s.kind].incremental
        )
        if statuses[s.name] != "done":
            will_run.add(s.name)
    return statuses


def _conflict(stages: list[PlannedStage], states: dict[str, dict]) -> ConfigError:
    """One error naming every stage whose output was made with another config of its own."""
    if len(stages) == 1:
        stage, state = stages[0], states[stages[0].name]
        return ConfigError(
            f"stage {stage.name!r} in {stage.output} was made with another config "
            f"(hash {state.get('config_hash', state.get('hash'))} != {stage.own_hash}); "
            f"rerun with --force {stage.name} to replace it"
        )
    names = ", ".join(repr(s.name) for s in stages)
    flags = " ".join(f"--force {s.name}" for s in stages)
    return ConfigError(
        f"stages {names} in {stages[0].output.parent} were made with other configs; rerun with {flags} to replace them"
    )


def run(cfg: DictConfig, *, dry_run: bool = False, force: list[str] = (), log=print) -> list[PlannedStage]:
    """Run (or with ``dry_run`` only print) the experiment's stages in order. A stage whose own config
    changed is an error before anything runs (unless forced); one whose inputs changed reruns."""
    stages = plan(cfg)
    unknown = set(force) - {s.name for s in stages}
    if unknown:
        raise ConfigError(f"--force {sorted(unknown)[0]}: no such stage (stages: {[s.name for s in stages]})")
    registry = _registry()
    states = {s.name: _read_state(s.output, forced=s.name in force) for s in stages}
    statuses = _statuses(stages, states, force, registry)
    if dry_run:
        for s in stages:
            status = statuses[s.name]
            label = {
                "new": "to run",
                "resume": "to resume",
                "stale": "to rerun: an input changed",
                "update": "to update: its config changed; finished work is kept",
            }.get(status, status)
            log(f"[{label}] {s.name} ({s.kind}) -> {s.output}  hash={s.hash}")
            log(OmegaConf.to_yaml(OmegaConf.structured(s.config)).rstrip())
        return stages
    conflicts = [s for s in stages if statuses[s.name] == "conflict"]
    if conflicts:
        raise _conflict(conflicts, states)
    for s in stages:  # before any output is replaced: a stage that would run without its file fails
        if s.missing and statuses[s.name] != "done":
            raise ConfigError(f"stages.{s.name}: file not found: {s.missing[0]}")

    from accelerate import Accelerator

    from baselines.train import barrier, process_group

    rank, _ = process_group()
    main = rank == 0
    accelerator = Accelerator()
    ran: set[str] = set()  # stages run in this invocation: the stages reading them run again too
    outputs = {p.name: p.output for p in stages}
    for s in stages:
        state = _read_state(s.output, forced=s.name in force)
        reads = {n: _read_state(outputs[n]) for n in s.reads}
        rerun = ran | outdated_reads(s, state, reads)
        status = stage_status(s, state, forced=s.name in force, rerun=rerun, incremental=registry[s.kind].incremental)
        read_runs = {n: reads[n].get("run_id") for n in s.reads}  # which outputs of its inputs this run reads
        barrier()  # every process has read the stage's state before rank 0 may clear its folder
        if status == "done":
            log(f"[skip] {s.name}: done with the same config ({s.output})")
            continue
        if status == "conflict":  # appeared since the check above (another process)
            raise _conflict([s], {s.name: state})
        ran.add(s.name)
        if status in ("force", "stale", "new") and main and s.output.exists():
            if status == "stale":
                log(f"[rerun] {s.name}: an input changed (a stage it reads, a file it names or the shipped models)")
            if status == "new":  # files but no stage.json: a clean-up cut short; never resume from them
                log(f"[clear] {s.name}: {s.output} holds files but no stage.json; starting afresh")
            shutil.rmtree(s.output)
        if status == "update":
            log(f"[update] {s.name}: its config changed; finished work is kept, the rest runs")
        barrier()
        log(f"[run] {s.name} ({s.kind}) -> {s.output}")
        start = time.time()
        # an update or a resume continues the work in place: its seconds add to those recorded before
        before = float(state.get("seconds", 0.0)) if status in ("update", "resume") else 0.0
        if main:
            _write_state(s.output, s, "running", seconds=before, read_runs=read_runs)
            (s.output / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(s.config)))
        barrier()
        kind = registry[s.kind]
        if kind.distributed or main:
            kind(s.config, s.output, accelerator)
        barrier()
        if main:
            seconds = round(before + time.time() - start, 1)
            _write_state(s.output, s, "done", seconds=seconds, read_runs=read_runs, run_id=uuid.uuid4().hex[:12])
        log(f"[done] {s.name} in {time.time() - start:.0f} s")
    return stages
