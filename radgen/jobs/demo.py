"""``radgen demo``: the command line over :mod:`radgen.pipelines.demo`."""

from __future__ import annotations

import argparse
import sys

from radgen.config import add_config_args
from radgen.pipelines.demo import DemoInterrupted, load_demo_config, run_demo


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the whole system end to end on built-in synthetic data, with a results page",
        description="Synthesise phantoms, pretrain the cpu_tiny encoder, probe it against random init "
                    "and raw pixels, train the report generator on the built-in SmolLM2, generate "
                    "findings for the held-out images, evaluate them against three baselines, and "
                    "write OUT/index.html. Re-running skips finished stages; deleting a stage's "
                    "folder redoes it and the stages that read it.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run of every stage (~3 min on 2 cores)")
    size.add_argument("--full", action="store_true", help="the README's measured preset (< 1 h on 2 cores)")
    p.add_argument("--out", help="run folder (default runs/demo, runs/demo-quick or runs/demo-full)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p, "demo", "full")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    preset = "quick" if args.quick else "full" if args.full else None
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    try:  # bad input of any stage: radgen.cli.main prints it and exits 2
        cfg = load_demo_config(preset, args.config, overrides)
        summary = run_demo(cfg, force=args.force, progress=not args.quiet)
    except DemoInterrupted as exc:
        print(f"radgen demo: {exc}; run the same command again to resume", file=sys.stderr)
        return 143
    print("\nstage        status     seconds")
    for r in summary["stages"]:
        print(f"  {r['stage']:<10} {r['status']:<9} {r['seconds'] if r['seconds'] is not None else '-':>7}")
    print(f"total {summary['seconds']:.0f} s; results page: {summary['page']}")
    return 0
