"""The skip log: one JSON record per input that could not be used (``skipped.jsonl`` in a job's
output folder), the same file name and format for every job that skips and goes on.

A record is an :class:`~radgen.data.images.ImageLoadError` record (``path``, ``error``,
``reason``, never patient data), plus the row ``id`` where the job reads a manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from encoder.io import atomic_write_text

__all__ = ["SKIPPED_FILE", "read_skip_log", "write_skip_log"]

SKIPPED_FILE = "skipped.jsonl"


def write_skip_log(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace ``path`` with ``records`` (atomically: a reader sees the old file or the new one)."""
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))


def read_skip_log(path: str | os.PathLike) -> list[dict]:
    """The records of a skip log, one per path (a log appended to by several data-loader workers
    may name a path twice; a torn last line from a kill is ignored). A missing file: none."""
    seen: dict[str, dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        seen.setdefault(r.get("path"), r)
    return list(seen.values())
