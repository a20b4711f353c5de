"""``radgen export``: a trained run folder -> a plain transformers LLaVA folder.

``radgen export --model RUN_DIR --out FOLDER`` writes a folder that
``AutoProcessor.from_pretrained(FOLDER)`` + ``AutoModelForImageTextToText.from_pretrained(FOLDER)``
load with no radgen import and no ``trust_remote_code`` (see :mod:`radgen.model.export`).
``--check`` only says whether the run can be exported, and why not. Exit status 2 on a refusal.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from radgen.model.export import ExportError, check_exportable, export_llava, run_problems

__all__ = ["run_export", "check_run", "add_export_parser", "cmd_export"]


def _read_info(model_dir: str | os.PathLike) -> dict:
    from radgen.model.run import MODEL_JSON

    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise ExportError(f"{model_dir}: no {MODEL_JSON} (not a finished report-generator run)")
    return json.loads(path.read_text(encoding="utf-8"))


def check_run(model_dir: str | os.PathLike, settings: dict | None = None) -> list[str]:
    """Why the run in ``model_dir`` cannot be exported (empty: it can), from its ``model.json``."""
    return run_problems(_read_info(model_dir), settings)


def run_export(model_dir: str | os.PathLike, out: str | os.PathLike, settings: dict | None = None, *,
               overwrite: bool = False, verify: bool = True) -> dict:
    """Export the run in ``model_dir`` to ``out``; returns the manifest (``radgen_export.json``).

    The run is checked from its ``model.json`` before anything is loaded; ``settings``
    (``max_new_tokens``, ``num_beams``, ``repetition_penalty``) override its generation defaults.
    """
    from radgen.model.run import model_sha256
    from radgen.model.run import load_run

    check_exportable(check_run(model_dir, settings), what=f"the run {model_dir}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    built = load_run(model_dir, device="cpu")
    source = {"run_dir": str(Path(model_dir).resolve()), "model_sha256": model_sha256(model_dir)}
    return export_llava(built, out, settings=settings, source=source, overwrite=overwrite, verify=verify)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a trained run as a plain transformers LLaVA folder",
        description="Writes a LlavaForConditionalGeneration folder (Dinov2 vision tower, projector, LLM with "
                    "LoRA merged, processor with rad-dino preprocessing and the chat template) that "
                    "transformers' AutoProcessor and AutoModelForImageTextToText load without radgen. "
                    "Runs whose feature choices LLaVA cannot express are refused with the reason.")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="run folder written by radgen train")
    p.add_argument("--out", metavar="FOLDER", help="the folder to write (required unless --check)")
    p.add_argument("--check", action="store_true", help="only check whether the run can be exported")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the folder back and comparing it with the radgen model")
    p.add_argument("--max-new-tokens", type=int, help="generation default written to generation_config.json")
    p.add_argument("--num-beams", type=int, help="generation default (1: greedy)")
    p.add_argument("--repetition-penalty", type=float,
                   help="generation default; only 1.0 reproduces radgen generate (see radgen.model.export)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    settings = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                "repetition_penalty": args.repetition_penalty}
    if args.check:
        problems = check_run(args.model, settings)
        if problems:
            print(f"export: {args.model} cannot be exported:\n  - " + "\n  - ".join(problems))
            return 2
        print(f"export: {args.model} can be exported as a plain transformers LLaVA folder")
        return 0
    if not args.out:
        raise ExportError("--out is required")
    m = run_export(args.model, args.out, settings, overwrite=args.overwrite, verify=not args.no_verify)
    check = m.get("check")
    print(f"export: wrote {args.out} ({m['n_image_tokens']} image tokens at {m['image_size']} px, "
          f"projector {m['projector']})"
          + (f"; checked: max |logit diff| {check['max_abs_logit_diff']:.2g}" if check else "; not checked"))
    return 0
