"""``radgen baselines``: the command line over :mod:`radgen.report_baselines`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radgen.report_baselines import DEFAULT_POOL, REFERENCES_FILE, run_baselines, run_encoder


def add_baselines_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``radgen baselines`` on an ``add_subparsers()`` object; returns the parser."""
    from encoder.features import POOLS
    from encoder.inference import PRECISIONS

    p = subparsers.add_parser(
        "baselines", help="reference baselines of report generation: normal template, most common "
                          "training report, nearest-neighbour retrieval",
        description="Write normal_template.jsonl, most_common.jsonl and nearest_neighbour.jsonl (records "
                    "as radgen generate writes them), references.jsonl and meta.json to --out. "
                    "Nearest neighbour: the training report of the closest training image by cosine "
                    "of frozen encoder features (cached in --out/features_<split>).")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="manifest file or folder holding one")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", metavar="SPEC",
                     help="the generator's frozen encoder: checkpoint, HF Dinov2 folder, random:..., random-like:...")
    src.add_argument("--model", metavar="RUN_DIR",
                     help="take the encoder and image size from a radgen train run folder (model.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--split", default="test", help="rows to predict (default test)")
    p.add_argument("--train-split", default="train", help="rows to retrieve and count from (default train)")
    p.add_argument("--text-field", default="findings", help="report column (default findings)")
    p.add_argument("--image-size", type=int, default=None,
                   help="preprocessing size (default: the run's, else the encoder's img_size, as the generator)")
    p.add_argument("--pool", choices=POOLS, default=DEFAULT_POOL,
                   help=f"feature pooling for retrieval (default {DEFAULT_POOL}: CLS + mean of the patch "
                        "tokens the generator reads)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="background image loaders")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="encoder precision (default auto)")
    p.add_argument("--overwrite", action="store_true", help="recompute cached features")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_baselines)
    return p


def cmd_baselines(args) -> int:
    run = run_encoder(args.model) if args.model else {"spec": args.encoder, "image_size": None, "sha256": None}
    meta = run_baselines(args.data, run["spec"], args.out, split=args.split, train_split=args.train_split,
                         image_size=args.image_size or run["image_size"], pool=args.pool,
                         text_field=args.text_field, batch_size=args.batch_size, workers=args.workers,
                         device=args.device, precision=args.precision, overwrite=args.overwrite,
                         progress=not args.quiet, expect_encoder_sha256=run["sha256"])
    c, mc, nn = meta["counts"], meta["most_common"], meta["nearest_neighbour"]
    text = mc["text"] if len(mc["text"]) <= 100 else mc["text"][:97] + "..."
    print(f"baselines: {c['test_rows_scored']} {meta['split']!r} reports against {c['train_reports']} "
          f"training reports ({c['train_retrieval_pool']} with images) -> {args.out}")
    print(f"  most common ({mc['count']}x of {c['train_reports_distinct']} distinct): {text}")
    print(f"  nearest neighbour ({meta['pool']}, {meta['image_size']} px): mean cosine {nn['mean_cosine']}, "
          f"{nn['distinct_neighbours']} distinct training images retrieved")
    if c["test_images_unreadable"]:
        print(f"  {c['test_images_unreadable']} test image(s) unreadable: error records in nearest_neighbour.jsonl",
              file=sys.stderr)
    if c["test_rows_without_reference"]:
        print(f"  {c['test_rows_without_reference']} test row(s) without a reference left out", file=sys.stderr)
    out = Path(args.out)
    print(f"score one with: radgen evaluate --predictions {out / 'nearest_neighbour.jsonl'} "
          f"--references {out / REFERENCES_FILE} --out {out / 'eval_nearest_neighbour'}")
    return 0
