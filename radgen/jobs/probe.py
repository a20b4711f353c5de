"""The ``probe`` job: does the encoder learn? Linear probes on frozen features vs random inits.

``probe_study(data, {"pretrained": "runs/x/checkpoint.pt", "random-0": "random-like:runs/x/checkpoint.pt:0", ...},
image_size)`` extracts features of every row of a manifest with each encoder (cached per encoder
under ``cache_dir/<name>``), fits a logistic probe (:func:`eval.probes.linear.logistic_probe`) on
the ``train`` split and reports AUROC with a bootstrap CI on ``validate`` + ``test``, per target.
The raw-pixel baseline (:func:`radgen.jobs.baselines.pixel_features`) runs on the same rows. Targets
follow :func:`radgen.jobs.baselines.pixel_baseline`: 1 = positive, 0 or blank = negative, uncertain
(-1) rows dropped per target; ``sex (F)`` from the ``sex`` column.

All models are scored on the same rows (those whose image every model could load) with the same
bootstrap seed, so the resamples are paired. :func:`summarize_probe_study` gives, per target,
the pretrained AUROC minus the mean random-init AUROC and the spread (max - min) across random
seeds: a gap well beyond the spread means pretraining taught the encoder something.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from encoder.checkpoint import CheckpointError
from encoder.features import POOLS
from encoder.io import atomic_write_text
from eval.probes.linear import logistic_probe
from radgen.jobs.baselines import binary_targets, pixel_features
from radgen.data.images import ImageLoadError
from radgen.data.manifest import ManifestError, read_manifest
from radgen.jobs.features import (FeatureJobError, encoder_config, extract_features,
                                 random_like_spec)

__all__ = ["DEFAULT_TARGETS", "ProbeStudyError", "is_random_spec", "probe_study",
           "summarize_probe_study", "format_probe_study", "resolve_encoders", "add_probe_parser",
           "cmd_probe"]

DEFAULT_TARGETS = ("Cardiomegaly", "Pleural Effusion", "sex (F)")
TEST_SPLITS = ("validate", "test")


class ProbeStudyError(ValueError):
    """Bad arguments or data for the probe study; the message says which."""


def is_random_spec(spec: str) -> bool:
    """Whether an encoder spec is an untrained random init (``random:`` / ``random-like:``)."""
    return str(spec).startswith(("random:", "random-like:"))


def _pixel_rows(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[int]]:
    """Raw-pixel features of the loadable images and their row indices (bad files skipped)."""
    feats, ok = [], []
    for i, p in enumerate(paths):
        try:
            feats.append(pixel_features([p], size=size)[0])
        except ImageLoadError:
            continue
        ok.append(i)
    return (np.stack(feats) if feats else np.empty((0, size * size), np.float32)), ok


def probe_study(
    data: str | os.PathLike,
    encoders: dict[str, str],
    image_size: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    pixel_size: int | None = 32,
    n_resamples: int = 1000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    pool: str = "cls",
    layers: Sequence[int] | None = None,
    C: float = 0.1,
    min_pos: int = 5,
    progress: bool = False,
    device: str | None = None,
) -> list[dict]:
    """Linear-probe AUROC of each encoder (and raw pixels) per target; one dict per (model, target).

    Args:
        data: manifest (file or folder) with ``train`` and ``validate``/``test`` rows.
        encoders: display name -> encoder spec (checkpoint, HF folder, ``random:...``,
            ``random-like:<spec>:<seed>``); names must be unique and not clash with the pixel row.
        image_size: preprocessing size for every encoder.
        targets: CheXpert observation names and/or ``"sex (F)"``.
        pixel_size: side of the raw-pixel baseline (``None``: no baseline).
        cache_dir: features of encoder ``name`` are cached in ``cache_dir/<name>``.
        min_pos: a target with fewer positives or negatives than this in train or test gets a
            row with ``auroc=None`` and a ``note`` instead of a probe.

    Returns:
        Rows with ``model``, ``kind`` (``encoder`` / ``random`` / ``pixels``), ``spec``, ``target``, ``auroc``, ``ci_low``,
        ``ci_high``, ``n_train``, ``n_test``, ``n_pos``, ``dim``, ``note``; models in the order
        given, pixels last.
    """
    ds = read_manifest(data, check_files=False)
    all_targets = binary_targets(ds)
    unknown = [t for t in targets if t not in all_targets]
    if unknown:
        raise ProbeStudyError(f"unknown target(s) {unknown}; choose from {sorted(all_targets)}")
    if not encoders and not pixel_size:
        raise ProbeStudyError("nothing to probe: no encoders and no pixel baseline")
    pixel_name = f"pixels-{pixel_size}" if pixel_size else None
    if pixel_name in encoders:
        raise ProbeStudyError(f"encoder name {pixel_name!r} is reserved for the raw-pixel baseline")
    split = np.array(list(ds["split"]), dtype=object)
    train, test = split == "train", np.isin(split, TEST_SPLITS)
    if not train.any() or not test.any():
        raise ProbeStudyError(f"{data}: needs rows in split 'train' and in 'validate'/'test'")
    ids = [str(i) for i in ds["id"]]
    row_of = {rid: i for i, rid in enumerate(ids)}

    # Features per model, as (row indices, matrix) over the rows each model could load.
    models: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []  # name, kind, spec, rows, X
    for name, spec in encoders.items():
        out = Path(cache_dir) / name if cache_dir is not None else None
        fs = extract_features(spec, data, out, image_size, batch_size=batch_size, pool=pool,
                              layers=layers, progress=progress, device=device)
        rows = np.array([row_of[r] for r in fs.ids], dtype=int)
        kind = "random" if is_random_spec(spec) else "encoder"
        models.append((name, kind, str(spec), rows, fs.features))
    if pixel_name:
        x, ok = _pixel_rows([imgs[0] for imgs in ds["images"]], pixel_size)
        models.append((pixel_name, "pixels", f"raw pixels {pixel_size}x{pixel_size}",
                       np.array(ok, dtype=int), x))

    # Score every model on the same rows: those all of them could load.
    common = np.ones(len(ids), bool)
    for *_, rows, _ in models:
        has = np.zeros(len(ids), bool)
        has[rows] = True
        common &= has

    results = []
    for name, kind, spec, rows, x in models:
        keep = common[rows]
        rows, x = rows[keep], x[keep]
        tr, te = train[rows], test[rows]
        for target in targets:
            y = all_targets[target][rows]
            ok = ~np.isnan(y)
            ytr, yte = y[tr & ok], y[te & ok]
            row = {"model": name, "kind": kind, "spec": spec, "target": target,
                   "auroc": None, "ci_low": None, "ci_high": None, "n_train": int(len(ytr)),
                   "n_test": int(len(yte)), "n_pos": int(yte.sum()), "dim": int(x.shape[1]), "note": ""}
            counts = (ytr.sum(), len(ytr) - ytr.sum(), yte.sum(), len(yte) - yte.sum())
            if min(counts) < min_pos:
                row["note"] = (f"too few positives/negatives (train {int(counts[0])}/{int(counts[1])}, "
                               f"test {int(counts[2])}/{int(counts[3])}; min {min_pos})")
            else:
                r = logistic_probe(target, x[tr & ok], ytr, x[te & ok], yte, C=C,
                                   n_resamples=n_resamples, seed=seed)
                row.update(auroc=float(r.auroc), ci_low=_num(r.ci_low), ci_high=_num(r.ci_high))
            results.append(row)
    return results


def _num(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def summarize_probe_study(rows: list[dict]) -> list[dict]:
    """Per pretrained model (``kind == "encoder"``) and target: the gap to the random inits.

    Without a pretrained model the rows have ``model=None`` and show only the random spread.
    Each dict: ``model``, ``target``, ``auroc`` (pretrained), ``random_mean``, ``random_spread``
    (max - min over random seeds), ``n_random``, ``delta`` (pretrained - random mean),
    ``beats_all_random`` (above every seed), ``pixels`` and ``delta_pixels`` (vs the raw-pixel
    baseline, when present). Values are ``None`` where a probe could not be fitted.
    """
    out = []
    targets = list(dict.fromkeys(r["target"] for r in rows))
    auroc = {(r["model"], r["target"]): r["auroc"] for r in rows}
    pixels = {r["target"]: r["auroc"] for r in rows if r["kind"] == "pixels"}
    pretrained = list(dict.fromkeys(r["model"] for r in rows if r["kind"] == "encoder")) or [None]
    for model, target in ((m, t) for m in pretrained for t in targets):
        rand = [x["auroc"] for x in rows if x["kind"] == "random" and x["target"] == target
                and x["auroc"] is not None]
        mean = float(np.mean(rand)) if rand else None
        spread = float(max(rand) - min(rand)) if rand else None
        a, pix = auroc.get((model, target)), pixels.get(target)
        out.append({
            "model": model, "target": target, "auroc": a,
            "random_mean": mean, "random_spread": spread, "n_random": len(rand),
            "delta": None if a is None or mean is None else a - mean,
            "beats_all_random": None if a is None or not rand else bool(a > max(rand)),
            "pixels": pix, "delta_pixels": None if a is None or pix is None else a - pix,
        })
    return out


def _f(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def format_probe_study(rows: list[dict], title: str = "") -> str:
    """Markdown: the AUROC table (one row per model and target) and, with random inits, the gaps."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| model | target | AUROC | 95% CI | n_test | n_pos | note |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ci = "—" if r["ci_low"] is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(f"| {r['model']} | {r['target']} | {_f(r['auroc'])} | {ci} | {r['n_test']} | "
                     f"{r['n_pos']} | {r.get('note', '')} |")
    summary = summarize_probe_study(rows)
    if summary and any(s["n_random"] for s in summary):
        lines += ["", "Pretrained vs random init (delta = AUROC - mean over random seeds; "
                      "spread = max - min over seeds):", "",
                  "| model | target | AUROC | random mean | delta | random spread | seeds | "
                  "beats every seed | vs pixels |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|"]
        for s in summary:
            beats = "—" if s["beats_all_random"] is None else ("yes" if s["beats_all_random"] else "no")
            lines.append(f"| {s['model'] or '—'} | {s['target']} | {_f(s['auroc'])} | {_f(s['random_mean'])} | "
                         f"{_f(s['delta'], '{:+.3f}')} | {_f(s['random_spread'])} | {s['n_random']} | "
                         f"{beats} | {_f(s['delta_pixels'], '{:+.3f}')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line (wired into radgen/cli.py by add_probe_parser)
# ----------------------------------------------------------------------------------------------
def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``radgen probe`` on an ``add_subparsers()`` object; returns the parser."""
    p = subparsers.add_parser(
        "probe", help="linear probes of frozen encoder features vs random inits and raw pixels",
        description="Does the encoder learn? Logistic probes (train split -> AUROC with bootstrap "
                    "CI on validate+test) on the frozen features of each --encoder, of N random "
                    "inits with the same architecture, and on raw pixels.")
    p.add_argument("--data", required=True, metavar="DIR", help="manifest file or folder with train/validate/test rows")
    p.add_argument("--encoder", action="append", default=[], metavar="NAME=SPEC",
                   help="encoder to probe (repeatable): checkpoint file, HF folder, "
                        "random:<arch>:<img_size>:<seed> or random-like:<spec>:<seed>")
    p.add_argument("--random-seeds", type=int, default=0, metavar="N",
                   help="add N random-init encoders (random-0 ...) with the first checkpoint's "
                        "ViTConfig, or --random-arch")
    p.add_argument("--random-arch", metavar="ARCH",
                   help="architecture of the random inits (default: the first encoder's config)")
    p.add_argument("--image-size", type=int,
                   help="preprocessing size (default: the first encoder's img_size, else 224)")
    p.add_argument("--target", action="append", metavar="NAME",
                   help=f"target (repeatable; default: {', '.join(DEFAULT_TARGETS)})")
    p.add_argument("--pixel-size", type=int, default=32, help="raw-pixel baseline side (0: none; default 32)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--min-pos", type=int, default=5, help="minimum positives/negatives per split (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pool", choices=POOLS, default="cls")
    p.add_argument("--layers", type=int, nargs="+", metavar="I", help="concatenate these blocks (e.g. -4 -3 -2 -1)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", metavar="DIR", help="write probe.json and probe.md here (features cached in DIR/features)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: OUT/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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


def resolve_encoders(encoders: dict[str, str], random_seeds: int = 0, random_arch: str | None = None,
                     image_size: int | None = None) -> tuple[dict[str, str], int]:
    """Add ``random-<k>`` inits and pick the image size; returns ``(encoders, image_size)``.

    Random inits copy the ``ViTConfig`` of the first non-random encoder (``random-like:``), or
    use ``random:<random_arch>:<image_size>:<k>``. The image size defaults to the first
    encoder's ``img_size``, else 224.
    """
    encoders = dict(encoders)
    first = next((s for s in encoders.values() if not is_random_spec(s)), None)
    if image_size is None:
        source = first or next(iter(encoders.values()), None)
        image_size = encoder_config(source).img_size if source else 224
    if random_seeds:
        if random_arch is None and first is None:
            raise ProbeStudyError("--random-seeds needs a checkpoint --encoder to copy, or --random-arch")
        for k in range(random_seeds):
            name = f"random-{k}"
            if name in encoders:
                raise ProbeStudyError(f"encoder name {name!r} clashes with the added random inits")
            encoders[name] = (f"random:{random_arch}:{image_size}:{k}" if random_arch
                              else random_like_spec(first, k))
    return encoders, int(image_size)


def cmd_probe(args) -> int:
    try:
        encoders, image_size = resolve_encoders(_parse_encoders(args.encoder), args.random_seeds,
                                                args.random_arch, args.image_size)
        if not encoders:
            raise ProbeStudyError("give at least one --encoder (or --random-seeds with --random-arch)")
        cache = args.cache_dir or (str(Path(args.out) / "features") if args.out else None)
        targets = tuple(args.target) if args.target else DEFAULT_TARGETS
        rows = probe_study(args.data, encoders, image_size, targets=targets,
                           pixel_size=args.pixel_size or None, n_resamples=args.resamples,
                           seed=args.seed, cache_dir=cache, batch_size=args.batch_size,
                           pool=args.pool, layers=args.layers, min_pos=args.min_pos,
                           progress=not args.quiet, device=args.device)
    except (ProbeStudyError, FeatureJobError, CheckpointError, ManifestError) as exc:
        print(f"radgen probe: error: {exc}", file=sys.stderr)
        return 2
    title = (f"Linear probes (logistic, train -> validate+test, AUROC with 95% bootstrap CI), "
             f"image {image_size}, pool {args.pool}")
    table = format_probe_study(rows, title=title)
    print(table)
    if args.out:
        out = Path(args.out)
        report = {"data": str(Path(args.data).resolve()), "image_size": image_size, "pool": args.pool,
                  "layers": args.layers, "encoders": encoders, "pixel_size": args.pixel_size or None,
                  "n_resamples": args.resamples, "seed": args.seed, "rows": rows,
                  "summary": summarize_probe_study(rows)}
        atomic_write_text(out / "probe.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "probe.md", table + "\n")
        print(f"\nwrote {out / 'probe.json'} and {out / 'probe.md'}", file=sys.stderr)
    return 0
