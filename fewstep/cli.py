"""The ``fewstep`` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import os
import sys

from baselines.errors import ConfigError, FewstepError


def _run(args) -> None:
    from fewstep import experiment

    cfg = experiment.load_config(args.config, args.overrides)
    experiment.run(cfg, dry_run=args.dry_run, force=args.force or [])


DEVICE_HELP = "cpu or cuda (default: a GPU when there is one)"


def _accelerator(args):
    """The accelerator a single-process verb runs under: a GPU when there is one, unless ``--device cpu``. The
    verbs' models load on its device and their training loops run on it (a second GPU: CUDA_VISIBLE_DEVICES)."""
    import torch
    from accelerate import Accelerator

    if args.device == "cuda" and not torch.cuda.is_available():
        raise FewstepError("--device cuda: there is no CUDA device on this machine")
    try:
        return Accelerator(cpu=args.device == "cpu")
    except ValueError as e:  # accelerate keeps one state per process: a second verb asking another device
        raise FewstepError(f"--device {args.device}: {str(e).splitlines()[0]}") from None


def _sample(args) -> None:
    from baselines import samplers

    paths = samplers.sample_to_folder(
        args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        seed=args.seed,
        num_images=args.num_images,
        batch_size=args.batch_size,
        out=args.out,
        device=_accelerator(args).device,
    )
    print(f"wrote {len(paths)} images to {args.out}")


# options only some methods of a verb read: given to another they are an error (they were ignored)
METHOD_OPTIONS = {
    "edit": {
        "mask": ("inpaint",),
        "strength": ("sdedit", "inpaint"),
        "eta": ("imagic",),
        "embedding_steps": ("imagic",),
        "finetune_steps": ("imagic",),
        "no_composite": ("inpaint",),
    },
    "train": {
        "num_vectors": ("textual-inversion",),
        "prior_weight": ("dreambooth",),
        "num_class_images": ("dreambooth",),
        "class_noun": ("dreambooth",),
        "train_text_encoder": ("dreambooth",),
    },
}
RUN_RECORD = "fewstep-cli.json"


def _check_method_options(verb: str, args) -> None:
    for key, methods in METHOD_OPTIONS[verb].items():
        given = getattr(args, key)
        if given is not None and given is not False and args.method not in methods:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} is only used by 'fewstep {verb} {' / '.join(methods)}'")


def _files(root):
    """(name, path) of a file, or of every file under a folder (names relative to it), in a fixed order."""
    if root.is_file():
        yield root.name, root
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        if f.is_file():
            yield str(f.relative_to(root)), f


def _inputs_digest(paths: list[str | None]) -> str:
    """sha256 of the contents of the input files and of every file in the input folders."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for given in paths:
        for name, f in _files(Path(given)) if given is not None else []:
            digest.update(f"{name}\n".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _model_identity(model: str) -> str:
    """What the model is, cheaply: the shipped models' identity for ``shapes``; for a folder, the names, sizes
    and modification times of its files (a model retrained in place is another model); a hub id as is."""
    import hashlib
    from pathlib import Path

    from baselines import models

    if model == "shapes":
        return models.shipped_identity()
    if not Path(model).is_dir():
        return model
    digest = hashlib.sha256()
    for name, f in _files(Path(model)):
        stat = f.stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _resumable(verb: str, args, run):
    """Run ``run()``, whose ``--out`` holds checkpoints it resumes from. The folder records the command's
    arguments, its inputs' digest and the model's identity: a rerun with the same ones resumes, and a folder
    holding another run (another prompt, image, setting or model) is a one-line error rather than a silent
    resume of that run's checkpoints."""
    import json
    import shutil
    from pathlib import Path

    out = Path(args.out)
    skip = ("func", "device", "out")
    record = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    record["inputs"] = _inputs_digest([getattr(args, k, None) for k in ("image", "mask", "images")])
    record["model_identity"] = _model_identity(args.model)
    record = json.loads(json.dumps({"verb": verb, **record}))
    path = out / RUN_RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            key = next(k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k))
            raise ConfigError(
                f"{out} holds a run with other arguments ({key}: {old.get(key)!r}, now {record.get(key)!r}); "
                "give another --out, or delete it"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no 'fewstep {verb}' run: give a new or empty --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    try:
        return run()
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [RUN_RECORD]:  # failed before writing anything
            shutil.rmtree(out)
        raise


def _edit(args) -> None:
    from pathlib import Path

    from baselines.train import TrainConfig
    from editing import common, imagic, inpaint, sdedit

    _check_method_options("edit", args)
    if args.method == "inpaint" and args.strength and len(args.strength) > 1:
        raise ConfigError("inpaint takes one --strength")
    source = common.EditSource(image=args.image, prompt=args.prompt, source_prompt=args.source_prompt)
    shared = dict(model=args.model, source=source, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
    out = Path(args.out)
    accelerator = _accelerator(args)
    if args.method == "sdedit":
        stage = sdedit.SDEditStage(**shared, strengths=args.strength or [0.6])
        rows = sdedit.run_sdedit(stage, out, accelerator=accelerator)
    elif args.method == "inpaint":
        strength = args.strength[0] if args.strength else 1.0
        stage = inpaint.InpaintStage(**shared, mask=args.mask, strength=strength, composite=not args.no_composite)
        rows = inpaint.run_inpaint(stage, out, accelerator=accelerator)
    else:
        embedding_steps = 100 if args.embedding_steps is None else args.embedding_steps
        finetune_steps = 100 if args.finetune_steps is None else args.finetune_steps
        stage = imagic.ImagicStage(
            **shared,
            etas=args.eta or imagic.ImagicStage().etas,
            embedding=TrainConfig(steps=embedding_steps, batch_size=4, lr=1e-2, checkpoint_every=10_000),
            finetune=TrainConfig(steps=finetune_steps, batch_size=4, lr=1e-4, checkpoint_every=10_000),
        )
        rows = _resumable("edit", args, lambda: imagic.run_imagic(stage, out, accelerator=accelerator))
    print(f"wrote {len(rows)} edits to {out / 'edits.jsonl'}")


def _concept(text: str | None) -> dict:
    pairs = [p.split("=", 1) for p in (text or "colour=purple,shape=triangle").split(",") if p]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--concept {text!r} must look like colour=purple,shape=triangle")
    return dict(pairs)


def _train(args) -> None:
    from pathlib import Path

    from baselines.train import TrainConfig
    from editing import concepts, dreambooth, textual_inversion

    _check_method_options("train", args)
    source = concepts.ConceptSource(
        images=args.images, template=args.template, concept=_concept(args.concept), num_images=args.num_images
    )
    lr = args.lr or (5e-3 if args.method == "textual-inversion" else 5e-5)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed, checkpoint_every=10_000)
    out = Path(args.out)
    accelerator = _accelerator(args)
    if args.method == "textual-inversion":
        stage = textual_inversion.TextualInversionStage(
            model=args.model,
            source=source,
            placeholder=args.token or "<concept>",
            num_vectors=1 if args.num_vectors is None else args.num_vectors,
            train=train,
        )
        _resumable("train", args, lambda: textual_inversion.run_textual_inversion(stage, out, accelerator=accelerator))
        print(f"wrote {out / textual_inversion.EMBEDS_FILE} (load with pipe.load_textual_inversion)")
    else:
        stage = dreambooth.DreamBoothStage(
            model=args.model,
            source=source,
            identifier=args.token or "sks",
            class_noun=args.class_noun or "",
            prior_weight=1.0 if args.prior_weight is None else args.prior_weight,
            num_class_images=32 if args.num_class_images is None else args.num_class_images,
            train_text_encoder=args.train_text_encoder,
            train=train,
        )
        folder = _resumable("train", args, lambda: dreambooth.run_dreambooth(stage, out, accelerator=accelerator))
        print(f"wrote {folder}")


def _report(args) -> None:
    from eval.report import report_run_dir

    print(f"wrote {report_run_dir(args.run_dir)}")


# `fewstep eval` options, each a field of the sweep stage (eval.sweep.SweepStage); unset ones keep its defaults
EVAL_FIELDS = (
    "samplers", "steps", "student_steps", "timestep_spacing", "guidance_scales", "n_images", "reference_images",
    "dataset", "prompts", "extractors", "clip", "metrics", "bootstrap", "grid_images", "seed", "batch_size",
    "cache_dir",
)  # fmt: skip


def _eval(args) -> None:
    from pathlib import Path

    from baselines.train import barrier, is_main_process, process_group
    from eval.report import render_report
    from eval.sweep import SweepStage, model_specs, run_sweep

    given = {k: getattr(args, k) for k in EVAL_FIELDS if getattr(args, k) is not None}
    cfg = SweepStage(models=model_specs(args.models), **given)
    process_group()  # under torchrun: the processes split each cell's images (before accelerate, as `run` does)
    out = Path(args.out)
    rows = run_sweep(cfg, out, _accelerator(args))
    barrier()  # rank 0 scores the last cell while the others wait
    if is_main_process():
        report = render_report([out], [], out / "report", f"fewstep eval: {out.name}")
        print(f"{len(rows)} cells in {out / 'results.jsonl'}; wrote {report}")


def _bench(args) -> None:
    from eval.bench import markdown_table, run_bench

    rows = run_bench(
        args.models,
        args.steps,
        out=args.out,
        sampler=args.sampler,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device=args.device,
    )
    print(markdown_table(rows))
    print(f"wrote the table into {args.out}")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fewstep`` verb."""
    p = argparse.ArgumentParser(prog="fewstep", description="Fast, editable text-to-image latent diffusion.")
    sub = p.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="run an experiment config's stages (cached, resumable)")
    run.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.teacher.train.steps=100")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    run.add_argument("--force", action="append", metavar="STAGE", help="rerun STAGE from scratch (repeatable)")
    run.set_defaults(func=_run)

    s = sub.add_parser("sample", help="sample images from any pipeline folder (or 'shapes')")
    s.add_argument("model", help="'shapes', a pipeline folder, or a hub id")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=None, help="default: the model's recommended steps")
    s.add_argument("--guidance-scale", type=float, default=None, help="default: the model's recommended scale")
    s.add_argument("--sampler", default=None, help="ddim, dpmpp-2m, euler, euler-a, heun, pndm, lms, unipc")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--out", required=True, help="output folder for PNGs")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    s.set_defaults(func=_sample)

    from editing.common import IMAGE_HELP

    edit = sub.add_parser("edit", help="edit an image: imagic | sdedit | inpaint", description=IMAGE_HELP)
    edit.add_argument("method", choices=["imagic", "sdedit", "inpaint"])
    edit.add_argument("model", help="'shapes', a pipeline folder (teacher or student), or a hub id")
    edit.add_argument("--image", required=True, help=IMAGE_HELP)
    edit.add_argument("--mask", default=None, help="inpaint: white = repaint; same size as the image")
    edit.add_argument("--prompt", required=True, help="the target text")
    edit.add_argument("--source-prompt", default=None, help="what the input shows (recorded only)")
    edit.add_argument("--strength", type=float, nargs="+", default=None, help="sdedit sweep / inpaint, in [0, 1]")
    edit.add_argument("--eta", type=float, nargs="+", default=None, help="imagic sweep (default 0 .25 .5 .75 1)")
    edit.add_argument("--steps", type=int, default=None, help="default: the model's recommended steps")
    edit.add_argument("--guidance-scale", type=float, default=None)
    edit.add_argument("--embedding-steps", type=int, default=None, help="imagic stage A steps (default 100)")
    edit.add_argument("--finetune-steps", type=int, default=None, help="imagic stage B steps (default 100)")
    edit.add_argument("--no-composite", action="store_true", help="inpaint: do not paste unmasked pixels back")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--out", required=True, help="output folder (PNGs and edits.jsonl)")
    edit.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    edit.set_defaults(func=_edit)

    t = sub.add_parser("train", help="personalise a model: textual-inversion | dreambooth", description=IMAGE_HELP)
    t.add_argument("method", choices=["textual-inversion", "dreambooth"])
    t.add_argument("model", help="'shapes', a pipeline folder, or a hub id")
    t.add_argument("--images", default=None, help="folder of concept images; default: shapes images of --concept")
    t.add_argument("--concept", default=None, help="shapes attributes, e.g. colour=purple,shape=triangle")
    t.add_argument("--template", default="a photo of {}", help="prompt for --images; {} = the token")
    t.add_argument("--token", default=None, help="placeholder (default <concept>) or identifier (default sks)")
    t.add_argument("--num-images", type=int, default=4)
    t.add_argument("--num-vectors", type=int, default=None, help="textual inversion: vectors per placeholder (1)")
    t.add_argument("--prior-weight", type=float, default=None, help="dreambooth (1): 0 turns prior preservation off")
    t.add_argument("--num-class-images", type=int, default=None, help="dreambooth (32)")
    t.add_argument("--class-noun", default=None, help="dreambooth, --images: e.g. dog -> 'a photo of sks dog'")
    t.add_argument("--train-text-encoder", action="store_true", help="dreambooth")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=None, help="default 5e-3 (textual inversion), 5e-5 (dreambooth)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    t.set_defaults(func=_train)
    rep = sub.add_parser("report", help="render RUN/report/report.md from a run's sweep and edit-eval folders")
    rep.add_argument("run_dir", help="a run folder, e.g. runs/quickstart")
    rep.set_defaults(func=_report)

    ev = sub.add_parser(
        "eval",
        help="evaluate pipeline folders over samplers x steps x guidance scales, then render a report",
        description="A sweep (as the 'sweep' stage of 'fewstep run') over the models given, into --out: one row per "
        "cell in results.jsonl (a rerun skips finished cells; other settings set the old cells aside in "
        "results.dropped.jsonl) and --out/report/report.md. Students run at their own steps unless "
        "--student-steps is given.",
    )
    ev.add_argument("models", nargs="+", help="'shapes', pipeline folders, hub ids, or name=folder")
    ev.add_argument("--out", required=True, help="output folder (results.jsonl, grids/, report/)")
    ev.add_argument("--samplers", nargs="+", default=None, help="training-free samplers for teachers (ddim)")
    ev.add_argument("--steps", type=int, nargs="+", default=None, help="step counts for teachers (4)")
    ev.add_argument(
        "--timestep-spacing",
        default=None,
        help="leading, linspace or trailing for non-students (default: each model's)",
    )
    ev.add_argument("--student-steps", type=int, nargs="+", default=None, help="default: each student's own")
    ev.add_argument("--guidance-scales", type=float, nargs="+", default=None, help="default: each model's own")
    ev.add_argument("--n-images", type=int, default=None, help="images per cell (200)")
    ev.add_argument("--reference-images", type=int, default=None, help="real images for FD / KID (2000)")
    ev.add_argument("--dataset", default=None, help="prompts and real images: shapes or a caption folder")
    ev.add_argument("--prompts", default=None, help="a text file, one prompt per line (instead of the captions)")
    ev.add_argument("--extractors", nargs="+", default=None, help="embedded, inception, clip:<folder> (embedded)")
    ev.add_argument("--clip", default=None, help="CLIP for CLIP score, CMMD, attributes (shapes)")
    ev.add_argument("--metrics", nargs="+", default=None, help="fd kid cmmd clip_score attributes (all)")
    ev.add_argument("--bootstrap", type=int, default=None, help="FD bootstrap rounds for the 95%% interval (50)")
    ev.add_argument("--grid-images", type=int, default=None, help="images per cell in its grid (8)")
    ev.add_argument("--seed", type=int, default=None, help="image i uses seed + i (0)")
    ev.add_argument("--batch-size", type=int, default=None, help="(50)")
    ev.add_argument("--cache-dir", default=None, help="reference-feature cache (runs/.cache)")
    ev.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    ev.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="seconds per image vs the raw U-Net + VAE cost (sampling overhead)")
    b.add_argument("models", nargs="*", help="'shapes', pipeline folders or name=folder (default: shapes)")
    b.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    b.add_argument("--sampler", default=None, help="default: the model's recommended sampler")
    b.add_argument("--guidance-scale", type=float, default=None, help="default: the model's recommended scale")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--repeats", type=int, default=11, help="paired timings per setting (the median one is kept)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    b.add_argument("--out", default="BENCHMARKS.md", help="file whose bench section is replaced")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit non-zero (2 for a bad config)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep library chatter off the one-line errors
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    cli = parser()
    args, extra = cli.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options: run CONFIG --dry-run a.b=1
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            cli.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        args.func(args)
    except ConfigError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
