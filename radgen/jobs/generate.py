"""``radgen generate``: the command line over :mod:`radgen.generation`."""

from __future__ import annotations

import argparse
import sys

from radgen.generation import EXIT_FAILURES, GenerateError, merge_lora, run_generate


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate findings for a folder or manifest of X-rays",
        description="Batched generation with a trained run folder. One JSONL (or CSV) record per input, "
                    "written as it goes; unreadable images are recorded and exit status 3 reports them.")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="run folder written by radgen train")
    p.add_argument("--images", metavar="FOLDER_OR_MANIFEST", help="folder of PNG/JPEG/DICOM (recursive) or a manifest")
    p.add_argument("--out", metavar="FILE", help="reports.jsonl (or .csv)")
    p.add_argument("--split", help="only this split of a manifest (e.g. test)")
    p.add_argument("--batch-size", type=int, help="images per generate call (default: the run's, 8)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--num-beams", type=int, help="beam search width (1: greedy, the default)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--keep-repeats", action="store_true",
                   help="let a report repeat a sentence until the token limit (default: the run's generate.stop_on_repeat)")
    p.add_argument("--line-guidance", type=float, metavar="S",
                   help="runs with a findings head: guide the writer on the stated line with scale S "
                        "(1: off; classifier-free guidance against the line 'No finding.')")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default; batched text equals one-at-a-time) or bf16 autocast")
    p.add_argument("--workers", type=int, default=2, help="image-loading threads (default 2)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="keep the records already in --out, do the rest")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a run trained with llm.trust_remote_code=true to run its LLM's own Python code")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--merge-lora", metavar="DIR",
                   help="write a standalone run folder with LoRA merged into the LLM (then generate with it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args) -> int:
    model_dir = args.model
    if args.merge_lora:
        model_dir = str(merge_lora(args.model, args.merge_lora))
        print(f"generate: merged LoRA into a standalone run folder {model_dir}")
    if not args.images:
        if args.merge_lora:
            return 0
        raise GenerateError("--images is required")
    if not args.out:
        raise GenerateError("--out is required")
    settings = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                "do_sample": True if args.sample else None, "temperature": args.temperature,
                "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
                "line_guidance": args.line_guidance, "stop_on_repeat": False if args.keep_repeats else None}
    s = run_generate(model_dir, args.images, args.out, settings, batch_size=args.batch_size,
                     split=args.split, resume=args.resume, overwrite=args.overwrite,
                     workers=args.workers, device=args.device, precision=args.precision,
                     seed=args.seed, progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    if s["rank"] != 0:
        return 0
    print(f"generate: {s['n_ok']} report(s), {s['n_failed']} unreadable input(s) in {s['seconds']} s "
          f"({s['reports_per_s']} reports/s); {s['n_resumed']} kept from before; "
          f"{s['n_records']} records in {s['out']}")
    if s["oom_backoffs"]:
        print(f"generate: out of GPU memory {s['oom_backoffs']} time(s): batch {s['batch_size']} -> "
              f"{s['batch_size_final']} (pass --batch-size {s['batch_size_final']} next time)")
    if s["n_failed_total"]:
        print(f"generate: {s['n_failed_total']} input(s) failed (status 'error' records in {s['out']})",
              file=sys.stderr)
        return EXIT_FAILURES
    return 0
