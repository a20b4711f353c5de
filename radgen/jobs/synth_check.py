"""``radgen synth-check``: the command line over :mod:`radgen.data.synth.check`."""

from __future__ import annotations

import argparse
from pathlib import Path

from radgen.config import SHARED_DATA_HINT
from radgen.data.synth.check import run_synth_check


def add_synth_check_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth-check",
                              help="realism of a synthetic set: phantoms vs real films on image statistics",
                              description="Histogram, power-spectrum, gradient and local-contrast statistics "
                                          "of phantoms and real radiographs; AUROC of a phantom-vs-real "
                                          "logistic regression (0.5 = indistinguishable). Writes realism.json, "
                                          "realism.md and grid.png.")
    p.add_argument("data", metavar="DIR", help="synthetic set folder (holding manifest.jsonl)")
    p.add_argument("--real", metavar="PATH", default=str(Path(SHARED_DATA_HINT) / "cxr" / "images"),
                   help=f"folder of real radiographs (default {Path(SHARED_DATA_HINT) / 'cxr' / 'images'})")
    p.add_argument("--out", metavar="PATH", help="output folder (default DIR/realism)")
    p.add_argument("--n", type=int, help="number of phantoms (default: as many as real images)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (folds, bootstrap, grid)")
    p.add_argument("--resamples", type=int, default=1000, metavar="R", help="bootstrap resamples for the CI")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth_check)
    return p


def cmd_synth_check(args) -> int:
    report = run_synth_check(args.data, Path(args.real).resolve(), out=args.out, n=args.n, seed=args.seed,
                             n_resamples=args.resamples, progress=not args.quiet)
    print(report.format())
    out = Path(report.sources["out"])
    print("written: " + ", ".join(str(out / f) for f in ("realism.json", "realism.md", "grid.png")))
    return 0
