"""``radgen pixel-baseline``: the command line over :mod:`radgen.pixel_baseline`."""

from __future__ import annotations

import argparse
import json

from encoder.io import atomic_write_text
from radgen.pixel_baseline import format_probe_table, pixel_baseline


def add_pixel_baseline_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pixel-baseline",
                              help="logistic regression on raw downsampled pixels, AUROC per finding",
                              description="The raw-pixel baseline of a manifest with train and "
                                          "validate/test splits (e.g. a synthetic set).")
    p.add_argument("data", help="manifest file, or a folder holding manifest.jsonl")
    p.add_argument("--size", type=int, default=32, help="downsampled side (default 32)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--out", help="also write the table as JSON to this file")
    p.set_defaults(func=cmd_pixel_baseline)
    return p


def cmd_pixel_baseline(args) -> int:
    results = pixel_baseline(args.data, size=args.size, n_resamples=args.resamples)
    print(format_probe_table(results, title=f"raw-pixel baseline ({args.size}x{args.size}, "
                                            f"logistic regression, AUROC with 95% bootstrap CI)"))
    if args.out:
        atomic_write_text(args.out, json.dumps([r.__dict__ for r in results], indent=2))
    return 0
