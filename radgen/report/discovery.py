"""Where a run folder's job outputs are, and reading them: the results page reads nothing else.

:func:`find_outputs` walks a run folder (at most ``MAX_DEPTH`` deep, skipping feature caches,
adapters, images) for ``metrics.json``, ``comparison.json``, ``probe.json``, training ``log.csv``,
``generated.jsonl`` and ``stage.json``; the readers return ``None`` / ``[]`` for what is missing
or unreadable, so a page shows what it finds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

__all__ = ["PAGE_DIR", "find_outputs", "read_csv", "read_json", "csv_header", "probe_rows", "stage_markers",
           "system_order", "as_number", "find_image"]

PAGE_DIR = "page"

MAX_DEPTH = 4

SKIP_DIRS = {"features", "features_train", "features_test", PAGE_DIR, "adapter", "tensorboard", "images", "masks"}

def _walk(root: Path, depth: int = 0) -> Iterable[Path]:
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for p in entries:
        if p.is_symlink():
            continue
        if p.is_dir():
            if depth < MAX_DEPTH and p.name not in SKIP_DIRS and not p.name.startswith("."):
                yield from _walk(p, depth + 1)
        else:
            yield p

def find_outputs(run: Path) -> dict[str, list[Path]]:
    """Known job outputs under ``run`` (a few levels deep), by kind."""
    found: dict[str, list[Path]] = {k: [] for k in ("metrics", "comparison", "probe", "pretrain_log",
                                                    "train_log", "generated", "stage")}
    for p in _walk(run):
        if p.name == "metrics.json":
            found["comparison" if (p.parent / "comparison.json").is_file() else "metrics"].append(p)
        elif p.name == "probe.json":
            found["probe"].append(p)
        elif p.name == "log.csv":
            header = csv_header(p)
            if "teacher_entropy" in header:
                found["pretrain_log"].append(p)
            elif "stage" in header and "loss" in header:
                found["train_log"].append(p)
        elif p.name == "generated.jsonl" or (p.suffix == ".jsonl" and p.name.startswith("generated")):
            found["generated"].append(p)
        elif p.name == "stage.json":
            found["stage"].append(p)
    # demo stages in the order they ran, not by folder name
    found["stage"].sort(key=lambda p: str((read_json(p) or {}).get("finished", "")))
    return found

def csv_header(p: Path) -> list[str]:
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []

def read_csv(p: Path) -> list[dict]:
    with open(p, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))

def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

PROBE_ROW_KEYS = {"model", "probe", "target", "metric", "value"}

def probe_rows(d: dict | None) -> list[dict]:
    """The rows of a loaded ``probe.json`` (none for another format)."""
    return [r for r in (d or {}).get("rows") or [] if isinstance(r, dict) and PROBE_ROW_KEYS <= r.keys()]

def stage_markers(found) -> list[dict]:
    """The demo stage markers, in the order they ran."""
    return [d for d in (read_json(p) for p in found["stage"]) if d and "stage" in d]

def system_order(systems: dict) -> list[str]:
    """The trained model first, then the baselines by name."""
    return sorted(systems, key=lambda s: (0 if "generator" in s or "generated" in s else 1, s))

def as_number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None

def find_image(rel: str, gen_file: Path, run: Path) -> Path | None:
    p = Path(rel)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (gen_file.parent, run, run / "data", *gen_file.parents):
        if (base / p).is_file():
            return base / p
    manifest_dirs = [m.parent for m in run.glob("*/manifest.jsonl")]
    for base in manifest_dirs:
        if (base / p).is_file():
            return base / p
    return None
