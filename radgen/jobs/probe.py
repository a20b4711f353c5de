"""``radgen probe`` and ``radgen probe scaling``: the command lines over :mod:`radgen.probes` and :mod:`radgen.pipelines.scaling`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from encoder.features import POOLS
from eval.probes.classify import UNCERTAIN_RULES
from eval.probes.segment import SEG_HEAD_EPOCHS
from radgen.config import add_config_args
from radgen.pipelines.scaling import run_scaling
from radgen.probes import PROBES, ProbeStudyError, format_report, resolve_encoders, run_probes, write_report


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """The probe options `radgen probe` and `radgen probe scaling` share (one definition)."""
    p.add_argument("--data", required=True, metavar="DIR", help="manifest file or folder with train/validate/test rows")
    p.add_argument("--probes", default=",".join(PROBES),
                   help=f"comma-separated probes to run (default {','.join(PROBES)})")
    p.add_argument("--target", action="append", metavar="NAME",
                   help="classification target (repeatable; default: every finding column, and sex)")
    p.add_argument("--uncertain", choices=UNCERTAIN_RULES, default="ignore",
                   help="uncertain (-1) labels: drop the row for that target (ignore, default), or count "
                        "as positive / negative")
    p.add_argument("--pixel-size", type=int, default=32, help="raw-pixel baseline side (0: none; default 32)")
    p.add_argument("--mask-size", type=int, default=64, help="side the masks are scored at (default 64)")
    p.add_argument("--seg-epochs", type=int, default=SEG_HEAD_EPOCHS,
                   help=f"epochs of the 1x1 segmentation head (default {SEG_HEAD_EPOCHS}: most of its rise is done "
                        "by then, docs/encoder.md)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN probe (default 20)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / head seed")
    p.add_argument("--min-pos", type=int, default=5, help="minimum positives/negatives per split (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pool", choices=[q for q in POOLS if q != "patches"], default="cls",
                   help="token pooling for the image-level probes (default cls)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I", help="concatenate these blocks (e.g. -4 -3 -2 -1)")
    p.add_argument("--seg-layers", type=int, nargs="+", metavar="I",
                   help="blocks whose patch tokens the segmentation head reads (default: the final output)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: OUT/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``radgen probe`` (and ``radgen probe scaling``); returns the parser."""
    p = subparsers.add_parser(
        "probe", help="frozen-feature probes (classification, kNN, segmentation, age) vs random inits and pixels",
        description="How good are an encoder's frozen features? Logistic and kNN probes per finding "
                    "and sex (AUROC, AP), ridge for age (MAE, R^2), a 1x1 segmentation head on patch "
                    "tokens (Dice, IoU), each with 95%% bootstrap CIs, for each --encoder, N random "
                    "inits of the same architecture and raw pixels. 'radgen probe scaling --help': "
                    "the data-scaling study.")
    p.add_argument("--encoder", action="append", default=[], metavar="NAME=SPEC",
                   help="encoder to probe (repeatable): checkpoint file (its teacher), student:<checkpoint>, "
                        "HF Dinov2 folder, random:<arch>:<img_size>:<seed> or random-like:<spec>:<seed>")
    p.add_argument("--random-seeds", type=int, default=0, metavar="N",
                   help="add N random-init encoders (random-0 ...) with the first checkpoint's "
                        "ViTConfig, or --random-arch")
    p.add_argument("--random-arch", metavar="ARCH",
                   help="architecture of the random inits (default: the first encoder's config)")
    p.add_argument("--image-size", type=int,
                   help="preprocessing size (default: the first encoder's img_size, else 224)")
    p.add_argument("--out", metavar="DIR", help="write probe.json/.csv/.md and PNG plots here")
    add_probe_args(p)
    p.set_defaults(func=cmd_probe)
    return p


def _parse_encoders(values: Sequence[str]) -> dict[str, str]:
    encoders: dict[str, str] = {}
    for i, v in enumerate(values):
        name, sep, spec = v.partition("=")
        if not sep:
            name, spec = ("pretrained" if i == 0 else Path(v).stem or v), v
        if not name or not spec:
            raise ProbeStudyError(f"--encoder {v!r}: expected NAME=SPEC")
        if name in encoders:
            raise ProbeStudyError(f"--encoder name {name!r} given twice")
        encoders[name] = spec
    return encoders


def probe_kwargs(args) -> dict:
    """run_probes keyword arguments from parsed ``radgen probe`` options."""
    return dict(probes=[p.strip() for p in args.probes.split(",") if p.strip()],
                targets=tuple(args.target) if args.target else None, uncertain=args.uncertain,
                pixel_size=args.pixel_size or None, mask_size=args.mask_size, seg_epochs=args.seg_epochs,
                knn_k=args.knn_k, n_resamples=args.resamples, seed=args.seed, min_pos=args.min_pos,
                batch_size=args.batch_size, pool=args.pool, layers=args.layers, seg_layers=args.seg_layers,
                progress=not args.quiet,
                device=args.device)


def cmd_probe(args) -> int:
    t0 = time.perf_counter()
    encoders, image_size = resolve_encoders(_parse_encoders(args.encoder), args.random_seeds,
                                            args.random_arch, args.image_size)
    if not encoders:
        raise ProbeStudyError("give at least one --encoder (or --random-seeds with --random-arch)")
    cache = args.cache_dir or (str(Path(args.out) / "features") if args.out else None)
    run = run_probes(args.data, encoders, image_size, cache_dir=cache, **probe_kwargs(args))
    title = f"Frozen-feature probes, image {image_size}, pool {args.pool} (test split, 95% bootstrap CIs)"
    print(format_report(run, title=title))
    if args.out:
        meta = {"data": str(Path(args.data).resolve()), "image_size": image_size, "pool": args.pool,
                "layers": args.layers, "encoders": encoders, "options": vars(args) | {"func": None}}
        written = write_report(run, args.out, meta, title)
        print("\nwrote " + ", ".join(str(w) for w in written), file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def add_scaling_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe-scaling", help="pretrain on nested fractions of the data, probe each (also: radgen probe scaling)",
        description="Data scaling: pretrain the same encoder config on nested fractions of the train "
                    "split, probe every checkpoint (plus random inits and pixels) with the same protocol, "
                    "and plot probe quality against the number of pretraining images. Resumable.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (reused on re-runs)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="fractions of the train split (default 0.25 0.5 1.0)")
    p.add_argument("--random-seeds", type=int, default=2, help="random-init controls (default 2)")
    add_probe_args(p)
    add_config_args(p, "encoder", "cpu_tiny")
    p.set_defaults(func=cmd_scaling)
    return p


def cmd_scaling(args) -> int:
    if len(args.fractions) < 3:
        print("radgen probe scaling: note: fewer than 3 fractions make a thin curve", file=sys.stderr)
    res = run_scaling(args.out, args.data, args.config, list(args.overrides), args.fractions,
                      random_seeds=args.random_seeds, seed=args.seed, probe_kw=probe_kwargs(args),
                      progress=not args.quiet)
    print(res["table"])
    print("wrote " + ", ".join(res["pngs"]), file=sys.stderr)
    return 0
