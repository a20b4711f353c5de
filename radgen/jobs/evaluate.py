"""``radgen evaluate`` and ``radgen labeler-check``: the command lines over :mod:`radgen.evaluation`."""

from __future__ import annotations

import argparse
from pathlib import Path

from encoder.errors import InputError
from eval.score import DEFAULT_METRICS, METRICS, ScoreOptions
from radgen.evaluation import EvaluateError, TEXT_FIELDS, format_per_finding, format_scores, run_evaluate


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="score generated reports: BLEU/METEOR/ROUGE-L/CIDEr, CheXpert F1, RadGraph, CIs",
        description="Score predictions against references (joined on id) with lexical and clinical "
                    "metrics and 95%% bootstrap CIs; writes metrics.json/.csv/.md, per_report.csv, "
                    "per_observation.csv, per_finding.csv (precision/recall of six findings and the "
                    "false-alarm rate on No-Finding films) and plots to --out. Offline by default: metrics whose "
                    "weights are not supplied are omitted with the reason.")
    p.add_argument("--predictions", required=True, metavar="FILE", help="generated reports (.jsonl/.json/.csv/.tsv)")
    p.add_argument("--references", required=True, metavar="FILE", help="reference reports, same formats")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--compare", metavar="FILE", help="a second system's predictions: paired bootstrap A - B")
    p.add_argument("--metrics", metavar="LIST", help=f"comma-separated families (default: {','.join(DEFAULT_METRICS)}; "
                                                     f"available: {','.join(METRICS)})")
    p.add_argument("--allow-missing", action="store_true",
                   help="score missing predictions as empty reports and ignore extra ids instead of failing")
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", help=f"text column (default: first of {', '.join(TEXT_FIELDS)})")
    p.add_argument("--ref-text-field", help="text column of the references, if different")
    p.add_argument("--chexbert", metavar="PTH", help="CheXbert checkpoint: label with CheXbert instead of the rules")
    p.add_argument("--radgraph-dir", metavar="DIR", help="RadGraph model weights (official RadGraph-F1)")
    p.add_argument("--radgraph-model-type", default="radgraph", choices=("radgraph", "radgraph-xl"))
    p.add_argument("--radgraph-case", default="lower", choices=("lower", "as-written"),
                   help="compare RadGraph tokens lower-cased (default) or as written (radgraph 0.1.18)")
    p.add_argument("--bertscore-model", metavar="DIR", help="local distilroberta-base (RadCliQ-v1)")
    p.add_argument("--device", default="auto",
                   help="CheXbert, RadGraph and BERTScore models: auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (0: no CIs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    opts = ScoreOptions(chexbert=args.chexbert, radgraph_dir=args.radgraph_dir,
                        radgraph_model_type=args.radgraph_model_type,
                        radgraph_lowercase=args.radgraph_case == "lower", bertscore_model=args.bertscore_model,
                        device=args.device, n_resamples=args.resamples, seed=args.seed)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        result = run_evaluate(args.predictions, args.references, args.out, metrics, args.compare,
                              args.allow_missing, args.id_field, args.text_field, args.ref_text_field, opts)
    except (ValueError, RuntimeError, OSError) as e:  # e.g. a bad CheXbert checkpoint: one clear line
        if isinstance(e, InputError):  # already names the file and the reason
            raise
        raise EvaluateError(f"{type(e).__name__}: {e}") from e
    print(format_scores(result, f"radgen evaluate: {args.predictions} vs {args.references}"))
    if "comparison" in result:  # its Markdown ends with the per-finding table of A and B
        print((Path(args.out) / "comparison.md").read_text())
    elif "per_finding" in result:
        print("\n" + format_per_finding({"A": result["per_finding"]}) + "\n")
    print(f"wrote {', '.join(result['written'])} to {args.out}")
    return 0


def add_labeler_check_parser(subparsers) -> argparse.ArgumentParser:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "reports" / "iu_xray_dev.csv"
    p = subparsers.add_parser(
        "labeler-check", help="measure the CheXpert report labeler against IU X-ray gold labels",
        description="Per-finding precision/recall/F1 of the report labeler (rules, or CheXbert with "
                    "--chexbert) against hand-made gold labels of IU X-ray reports; micro F1 last.")
    p.add_argument("--data", default=str(default), help=f"IU reports CSV (default: {default})")
    p.add_argument("--chexbert", metavar="PTH", help="measure CheXbert instead of the rule labeler")
    p.add_argument("--uncertain", default="auto", choices=("auto", "present", "absent", "alternatives"),
                   help="how an uncertain label is counted against the binary gold")
    p.set_defaults(func=cmd_labeler_check)
    return p


def cmd_labeler_check(args) -> int:
    from eval.chexpert.iu_xray import evaluate_labeler_on_iu, format_table

    labeler = None
    if args.chexbert:
        from eval.chexpert.chexbert import CheXbertLabeler

        labeler = CheXbertLabeler(args.chexbert)
    rows, micro = evaluate_labeler_on_iu(args.data, labeler, uncertain=args.uncertain)
    print(format_table(rows, micro))
    return 0
