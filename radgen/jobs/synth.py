"""``radgen synth``: the command line over :mod:`radgen.data.synth.generate`."""

from __future__ import annotations

import argparse

from radgen.config import add_config_args


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help="write a synthetic chest X-ray set (images, masks, reports, manifest)",
                              description="Procedural chest radiograph phantoms with CheXpert-14 findings, "
                                          "reports, masks, sex and age. Deterministic for a seed.")
    p.add_argument("--out", help="output folder")
    p.add_argument("--n", type=int, help="number of images")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--format", choices=["png", "dicom"], help="image file format")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p, "synth", "demo")
    p.set_defaults(func=cmd_synth)
    return p


def cmd_synth(args) -> int:
    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset

    flags = {k: getattr(args, k) for k in ("out", "n", "size", "seed", "format", "workers")}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config("synth", args.config, overrides)
    summary = generate_dataset(cfg, progress=not args.quiet)
    print(summary.format())
    return 0
