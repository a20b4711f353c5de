"""``radgen pretrain-encoder``: the command line over :mod:`radgen.pretraining`."""

from __future__ import annotations

import argparse
from collections import Counter

from radgen.config import add_config_args, load_config
from radgen.pretraining import run_pretrain


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain-encoder",
                              help="pretrain a RAD-DINO encoder (DINO + iBOT + KoLeo) on radiographs",
                              description="DINOv2-style self-supervised pretraining on a manifest or image "
                                          "folder; one process or torchrun. Resumes from out/checkpoint.pt.")
    p.add_argument("--data", help="manifest or image folder (data.path)")
    p.add_argument("--out", help="output folder")
    add_config_args(p, "encoder", "cpu_tiny")
    p.set_defaults(func=cmd_pretrain)
    return p


def cmd_pretrain(args) -> int:
    flags = [f"data.path={args.data}"] if args.data else []
    flags += [f"out={args.out}"] if args.out else []
    cfg = load_config("encoder", args.config, flags + list(args.overrides))
    summary = run_pretrain(cfg)
    code = 143 if summary["status"] == "preempted" else 0
    if summary["rank"] != 0:  # one summary per job, not one per torchrun rank
        return code
    last = summary["last"]
    print(f"pretrain-encoder: {summary['status']} at step {summary['steps']}/{summary['total_steps']} "
          f"({summary['device']}, {summary['precision']}, world size {summary['world_size']}, "
          f"{summary['strategy']})")
    if last:
        print("  last step: " + ", ".join(f"{k} {last[k]:.4g}" for k in
                                          ("loss", "dino", "ibot", "koleo", "teacher_entropy", "cls_std")
                                          if isinstance(last.get(k), float)) + f", collapse {last.get('collapse')}")
        if isinstance(last.get("teacher_start_share"), float):  # what a probe of the teacher reads
            print(f"  teacher: the EMA still gives its starting weights {last['teacher_start_share']:.0%} "
                  "(probes of the teacher read at least that much init; docs/encoder.md)")
    if summary["skipped"]:
        kinds = Counter(r["error"] for r in summary["skipped"])
        print(f"  {len(summary['skipped'])} of {summary['n_images']} images unreadable, skipped and recorded in "
              f"{summary['skipped_file']} ("
              + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")")
    print(f"  checkpoint: {summary['checkpoint']}")
    return code
