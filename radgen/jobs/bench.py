"""``radgen bench``: the command line over :mod:`radgen.bench`."""

from __future__ import annotations

import argparse

from radgen.bench import GPU_CHECK, format_markdown, run_bench


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="run every benchmark script in bench/ and write one table of ratios",
        description="Runs each bench/*.py script in its own process (one after another, from the "
                    "repository root) and collects their results into OUT/bench.json and OUT/bench.md: "
                    "ours vs the reference implementation, batched vs one at a time, achieved vs "
                    "measured matmul peak, wall time against a target. A script that fails or times "
                    "out is recorded and the others still run. Needs a source checkout (bench/).")
    p.add_argument("--quick", action="store_true", help="each script's --quick mode (minutes, not an hour)")
    p.add_argument("--only", metavar="NAME[,NAME]", action="append", default=[],
                   help="run only these scripts (e.g. evaluate_speed,generate_speed); repeatable")
    p.add_argument("--out", metavar="DIR", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads of every script (default: theirs)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds per script before it is stopped (default 900 with --quick, 3600 without)")
    p.add_argument("--gpu", action="store_true",
                   help="only bench/gpu_check.py, the one-command GPU check (minutes on one GPU; with --quick "
                        "its CPU dry run at tiny sizes)")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    only = [n for item in args.only for n in item.split(",") if n.strip()] or None
    if args.gpu:
        only = [GPU_CHECK]
    result = run_bench(quick=args.quick, out_dir=args.out, only=only, threads=args.threads,
                       timeout_s=args.timeout)
    print()
    print(format_markdown(result), end="")
    print(f"\nwritten: {result['files']['md']}, {result['files']['json']} (script logs in {result['files']['logs']})")
    return 0 if result["ok"] else 1
