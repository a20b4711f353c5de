"""``radgen train``: the command line over :mod:`radgen.train`."""

from __future__ import annotations

import argparse
import sys

from radgen.config import add_config_args, load_config
from radgen.model.run import ADAPTER_DIR
from radgen.train import run_train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train the report generator (frozen encoder -> projector -> LoRA LLM)",
        description="Two-stage training (projector only, then projector + LoRA) on a manifest with "
                    "findings. One process or torchrun (DDP). Re-running the same command resumes.")
    p.add_argument("--data", metavar="MANIFEST", help="manifest file or folder holding one (data.path)")
    p.add_argument("--encoder", metavar="SPEC", help="frozen encoder: checkpoint, HF Dinov2 folder, "
                   "random:..., random-like:... (encoder.spec)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p, "reportgen", "cpu_smollm2")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    flags = [f"data.path={args.data}"] if args.data else []
    flags += [f"encoder.spec={args.encoder}"] if args.encoder else []
    flags += [f"out={args.out}"] if args.out else []
    cfg = load_config("reportgen", args.config, flags + list(args.overrides))
    summary = run_train(cfg, progress=not args.quiet)
    if summary["rank"] != 0:
        return 143 if summary["status"] == "preempted" else 0
    if summary["status"] == "already-complete":
        print(f"train: {summary['out']} is already complete (delete it or choose another --out to retrain)")
        return 0
    print(f"train: {summary['status']} in {summary['seconds']} s ({summary['device']}, {summary['precision']}, "
          f"world size {summary['world_size']}); {summary['n_train']} training / {summary['n_val']} validation images"
          + (f", {summary['n_skipped']} unreadable skipped (skipped.jsonl)" if summary["n_skipped"] else "")
          + (f", {summary['n_without_text']} training rows with an empty {cfg.data.text_field!r} left out"
             if summary.get("n_without_text") else ""))
    if summary["status"] == "complete":
        print(f"  run folder: {summary['out']} (model.json, projector.safetensors, {ADAPTER_DIR}/, log.csv)"
              + (f"; final val loss {summary['final_val_loss']:.4f}" if summary.get("final_val_loss") else ""))
        return 0
    print("  preempted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
    return 143
