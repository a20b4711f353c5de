"""``radgen report``: the command line over :mod:`radgen.report.page`."""

from __future__ import annotations

import argparse
import sys

from radgen.report.page import PAGE_DIR, build_page


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="build the offline results page (index.html) of a run folder",
                              description="Reads the job outputs in RUN_DIR (metrics.json, comparison.json, "
                                          "probe.json, training log.csv files, generated.jsonl) and writes "
                                          "RUN_DIR/index.html with its figures in RUN_DIR/page/.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--examples", type=int, default=8, help="example radiographs on the page (default 8)")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args) -> int:
    try:
        page = build_page(args.run, examples=args.examples, title=args.title)
    except FileNotFoundError as exc:
        print(f"radgen report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {page} (open it in a browser; figures in {page.parent / PAGE_DIR})")
    return 0
