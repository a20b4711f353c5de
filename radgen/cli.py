"""The ``radgen`` command line: one subcommand per leaf module of ``radgen/jobs/``.

:func:`main` builds the parser (importing only the leaf of the command that runs) and maps what a
user can fix to one error line and an exit code, once for every command: 2 a bad input
(:class:`encoder.errors.InputError`, a missing file), 4 a training stop, 1 another OS error,
130 Ctrl-C. Commands with a config take ``--config FILE`` (thin YAML overrides on
``configs/<job>/default.yaml``) and ``key=value`` overrides, validate it before starting, and
write the resolved config next to their outputs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Every command is a leaf module under radgen/jobs/ that registers its own sub-parser; a leaf is
# imported only when its command runs (or for the full help), so `radgen info` starts fast.
JOB_PARSERS = {
    "info": ("radgen.jobs.info", "add_info_parser"),
    "synth": ("radgen.jobs.synth", "add_synth_parser"),
    "synth-check": ("radgen.jobs.synth_check", "add_synth_check_parser"),
    "pixel-baseline": ("radgen.jobs.pixel_baseline", "add_pixel_baseline_parser"),
    "manifest": ("radgen.jobs.manifest", "add_manifest_parser"),
    "pretrain-encoder": ("radgen.jobs.pretrain", "add_pretrain_parser"),
    "features": ("radgen.jobs.features", "add_features_parser"),
    "probe": ("radgen.jobs.probe", "add_probe_parser"),
    "probe-scaling": ("radgen.jobs.probe", "add_scaling_parser"),
    "pretrain-study": ("radgen.jobs.study", "add_study_parser"),
    "train": ("radgen.jobs.train", "add_train_parser"),
    "generate": ("radgen.jobs.generate", "add_generate_parser"),
    "export": ("radgen.jobs.export", "add_export_parser"),
    "baselines": ("radgen.jobs.baselines", "add_baselines_parser"),
    "evaluate": ("radgen.jobs.evaluate", "add_evaluate_parser"),
    "labeler-check": ("radgen.jobs.evaluate", "add_labeler_check_parser"),
    "report": ("radgen.jobs.report", "add_report_parser"),
    "bench": ("radgen.jobs.bench", "add_bench_parser"),
    "demo": ("radgen.jobs.demo", "add_demo_parser"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that job's module is imported (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="radgen",
        description="Chest X-ray AI: image-only encoder pretraining (RAD-DINO), probes, "
                    "LLaVA-style report generation and clinical metrics.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, fn) in JOB_PARSERS.items():
        if command in (None, name):
            getattr(importlib.import_module(module), fn)(sub)
        else:  # another command runs: don't pay for importing this job's stack (torch, timm)
            sub.add_parser(name)
    return parser


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
    except FileNotFoundError as exc:  # an input that does not exist: fixable by the user, like InputError
        print(f"radgen {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions on an output folder...: the file and the reason
        print(f"radgen {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"radgen {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a command that never imported torch has no group to close
            from encoder.distributed import close_distributed

            close_distributed()


def _os_error_text(exc: OSError) -> str:
    """``file: reason`` of an OSError raised by the OS, or the message of one raised with text only."""
    if exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc.strerror or exc)


if __name__ == "__main__":
    sys.exit(main())
