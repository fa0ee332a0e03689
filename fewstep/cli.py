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
    )
    print(f"wrote {len(paths)} images to {args.out}")


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
    s.set_defaults(func=_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit non-zero (2 for a bad config)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep library chatter off the one-line errors
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = parser().parse_args(argv)
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
