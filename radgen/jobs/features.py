"""``radgen features``: the command line over :mod:`radgen.features`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encoder.features import POOLS
from encoder.inference import PRECISIONS
from radgen.data.skips import SKIPPED_FILE
from radgen.features import LOADERS, extract_features


def add_features_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``radgen features`` on an ``add_subparsers()`` object; returns the parser."""
    p = subparsers.add_parser(
        "features", help="frozen encoder features of a manifest or image folder (cached)",
        description="Encode every image of a manifest (or plain folder) with a frozen encoder and "
                    "write features.safetensors, ids.json, skipped.jsonl and meta.json to --out. "
                    "A matching earlier result in --out is reused.")
    p.add_argument("--encoder", required=True, metavar="SPEC",
                   help="checkpoint file (its teacher), student:<checkpoint>, HF Dinov2 folder, "
                        "random:<arch>:<img_size>:<seed> or random-like:<spec>:<seed>")
    p.add_argument("--data", required=True, metavar="PATH", help="manifest file, folder with a manifest, or image folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output (and cache) folder")
    p.add_argument("--image-size", type=int, default=224, help="preprocessing size (default 224)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: ~2k tokens per batch on CPU, i.e. 1 at "
                        "518 px and 7 at 224 px; 64-256 on GPU)")
    p.add_argument("--pool", choices=POOLS, default="cls", help="token pooling (default cls)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I",
                   help="concatenate these blocks' outputs (e.g. -4 -3 -2 -1); default: final output")
    p.add_argument("--split", help="only rows of this split (train/validate/test)")
    p.add_argument("--workers", type=int, default=None,
                   help="background image loaders, 0 for none (default: none on a CPU of up to "
                        "4 cores, else 1 per 8; on GPU one per core but one, up to 4)")
    p.add_argument("--loader", choices=LOADERS, default="process",
                   help="background loaders are worker processes (default) or threads")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where the device runs it natively (CUDA with bf16, "
                        "CPU with avx512_bf16/amx_bf16), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder blocks")
    p.add_argument("--overwrite", action="store_true", help="recompute even if --out holds a matching result")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)
    return p


def cmd_features(args) -> int:
    fs = extract_features(args.encoder, args.data, args.out, args.image_size,
                          batch_size=args.batch_size, pool=args.pool, layers=args.layers,
                          split=args.split, progress=not args.quiet, workers=args.workers,
                          loader=args.loader, device=args.device, precision=args.precision,
                          compile=args.compile, overwrite=args.overwrite)
    m = fs.meta
    how = "cached" if fs.cached else f"{m['seconds']:.1f} s, {m['images_per_s']} img/s"
    print(f"features: {len(fs.ids)} x {m['dim']} ({m['pool']}, layers {m['layers'] or 'final'}, "
          f"image {m['image_size']}, {m['precision']}) -> {args.out}  [{how}]")
    if fs.skipped:
        print(f"skipped {len(fs.skipped)} unreadable image(s); see {Path(args.out) / SKIPPED_FILE}",
              file=sys.stderr)
    return 0
