"""The ``radgen`` command line: one subcommand per job.

Every job takes ``--config FILE`` (thin YAML overrides on ``configs/<job>/default.yaml``) and
``key=value`` overrides, validates its config before starting, and writes the resolved config
next to its outputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

__all__ = ["main", "build_parser"]

SHARED_DATA_HINT = "../shared/data"

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="override file(s) merged onto the job's default config, in order; "
                        "a bare name like 'small' means configs/<job>/small.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


# Jobs whose modules register their own sub-parser; imported only when needed (see build_parser).
JOB_PARSERS = {
    "features": ("radgen.jobs.features", "add_features_parser"),
    "probe": ("radgen.jobs.probe", "add_probe_parser"),
    "probe-scaling": ("radgen.jobs.probe_scaling", "add_scaling_parser"),
    "pretrain-study": ("radgen.jobs.study", "add_study_parser"),
    "evaluate": ("radgen.jobs.evaluate", "add_evaluate_parser"),
    "labeler-check": ("radgen.jobs.evaluate", "add_labeler_check_parser"),
    "train": ("radgen.jobs.train", "add_train_parser"),
    "generate": ("radgen.jobs.generate", "add_generate_parser"),
    "export": ("radgen.jobs.export", "add_export_parser"),
    "baselines": ("radgen.jobs.report_baselines", "add_baselines_parser"),
    "bench": ("radgen.jobs.bench", "add_bench_parser"),
    "demo": ("radgen.jobs.demo", "add_demo_parser"),
    "report": ("radgen.jobs.report_page", "add_report_parser"),
    "manifest": ("radgen.jobs.manifest", "add_manifest_parser"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that job's module is imported (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="radgen",
        description="Chest X-ray AI: image-only encoder pretraining (RAD-DINO), probes, "
                    "LLaVA-style report generation and clinical metrics.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, device, and where models and data are looked up")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="write a synthetic chest X-ray set (images, masks, reports, manifest)",
                       description="Procedural chest radiograph phantoms with CheXpert-14 findings, "
                                   "reports, masks, sex and age. Deterministic for a seed.")
    p.add_argument("--out", help="output folder")
    p.add_argument("--n", type=int, help="number of images")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--format", choices=["png", "dicom"], help="image file format")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pixel-baseline",
                       help="logistic regression on raw downsampled pixels, AUROC per finding",
                       description="The raw-pixel baseline of a manifest with train and "
                                   "validate/test splits (e.g. a synthetic set).")
    p.add_argument("data", help="manifest file, or a folder holding manifest.jsonl")
    p.add_argument("--size", type=int, default=32, help="downsampled side (default 32)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--out", help="also write the table as JSON to this file")
    p.set_defaults(func=cmd_pixel_baseline)

    p = sub.add_parser("synth-check",
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

    p = sub.add_parser("pretrain-encoder",
                       help="pretrain a RAD-DINO encoder (DINO + iBOT + KoLeo) on radiographs",
                       description="DINOv2-style self-supervised pretraining on a manifest or image "
                                   "folder; one process or torchrun. Resumes from out/checkpoint.pt.")
    p.add_argument("--data", help="manifest or image folder (data.path)")
    p.add_argument("--out", help="output folder")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    for name, (module, fn) in JOB_PARSERS.items():
        if command in (None, name):
            getattr(importlib.import_module(module), fn)(sub)
        else:  # another command runs: don't pay for importing this job's stack (torch, timm)
            sub.add_parser(name)

    return parser


# ----------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import importlib.metadata as md

    import torch

    from encoder.inference import cpu_bf16_flags

    print(f"radgen {md.version('radgen')}  (python {platform.python_version()}, {platform.platform()})")
    for pkg in ("torch", "torchvision", "transformers", "peft", "timm", "datasets", "evaluate",
                "pycocoevalcap", "pydicom", "numpy", "pillow", "scikit-learn", "omegaconf"):
        try:
            print(f"  {pkg:14s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:14s} (not installed)")
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = "mps"
    else:
        dev = "cpu"
    print(f"device: {dev}; torch threads: {torch.get_num_threads()}; "
          f"native bf16 on CPU: {', '.join(cpu_bf16_flags()) or 'no (bf16 would be emulated)'}")
    from radgen.config import configs_dir

    print("lookup paths (every loader takes a local path; nothing is downloaded at run time):")
    print(f"  configs:        {configs_dir()}")
    print(f"  RADGEN_HOME:    {os.environ.get('RADGEN_HOME', str(Path.home() / '.cache' / 'radgen'))}")
    from radgen.model.llm import builtin_llm_cache_dir  # light: transformers is imported lazily there
    print(f"  built-in LLM:   {builtin_llm_cache_dir()}")
    print(f"  HF_HOME:        {os.environ.get('HF_HOME', str(Path.home() / '.cache' / 'huggingface'))}"
          f"  (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})")
    shared = Path(SHARED_DATA_HINT).resolve()
    print(f"  shared data:    {shared} ({'present' if shared.is_dir() else 'absent'})")
    return 0


def cmd_synth(args) -> int:
    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset

    flags = {k: getattr(args, k) for k in ("out", "n", "size", "seed", "format", "workers")}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config("synth", args.config, overrides)
    summary = generate_dataset(cfg, progress=not args.quiet)
    print(summary.format())
    return 0


def cmd_synth_check(args) -> int:
    from radgen.jobs.synth_check import run_synth_check

    report = run_synth_check(args.data, Path(args.real).resolve(), out=args.out, n=args.n, seed=args.seed,
                             n_resamples=args.resamples, progress=not args.quiet)
    print(report.format())
    out = Path(report.sources["out"])
    print("written: " + ", ".join(str(out / f) for f in ("realism.json", "realism.md", "grid.png")))
    return 0


def cmd_pretrain(args) -> int:
    from radgen.config import load_config
    from radgen.jobs.pretrain import run_pretrain

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
    if summary["skipped"]:
        kinds = Counter(r["error"] for r in summary["skipped"])
        print(f"  {len(summary['skipped'])} of {summary['n_images']} images unreadable, skipped and recorded in "
              f"{summary['skipped_file']} ("
              + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")")
    print(f"  checkpoint: {summary['checkpoint']}")
    return code


def cmd_pixel_baseline(args) -> int:
    from radgen.jobs.baselines import format_probe_table, pixel_baseline

    results = pixel_baseline(args.data, size=args.size, n_resamples=args.resamples)
    print(format_probe_table(results, title=f"raw-pixel baseline ({args.size}x{args.size}, "
                                            f"logistic regression, AUROC with 95% bootstrap CI)"))
    if args.out:
        from encoder.io import atomic_write_text

        atomic_write_text(args.out, json.dumps([r.__dict__ for r in results], indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from encoder.errors import InputError
    from encoder.guards import TrainingStopped

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["probe", "scaling"]:  # `radgen probe scaling` is `radgen probe-scaling`
        argv = ["probe-scaling", *argv[2:]]
    command = argv[0] if argv and argv[0] in JOB_PARSERS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:  # every user-fixable error (encoder/errors.py): the message, exit 2
        print(f"radgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # a NaN/inf loss or a collapse: the last good checkpoint is kept
        print(f"radgen {args.command}: stopped: {exc}", file=sys.stderr)
        return 4
    except OSError as exc:  # disk full, permissions on an output folder...: the file and the reason
        print(f"radgen {args.command}: error: {exc.filename or ''}{': ' if exc.filename else ''}"
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"radgen {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down a torchrun job's process group before the interpreter exits, the ranks together.

    Left to the interpreter's shutdown, or torn down by one rank while another still talks to it,
    gloo's threads can abort the process ("terminate called without an active exception", seen in
    the 2-rank pretraining test under load), failing a run that succeeded. So gloo ranks first meet
    at a barrier, bounded in time so that a rank whose peer died still exits."""
    from datetime import timedelta

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
    except Exception:  # a peer that failed or left: nothing to wait for
        pass
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
