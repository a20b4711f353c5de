"""``radgen export``: the command line over :mod:`radgen.model.export`."""

from __future__ import annotations

import argparse

from radgen.model.export import ExportError, check_run, run_export


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
