"""Shared by every bench script: the one row shape that ``--json FILE`` writes (read by ``radgen bench``).

A result row is a dict with these keys (``radgen.bench`` reads nothing else):

* ``bench``: the script's name without ``.py`` (``"encoder_forward"``);
* ``case``: what was measured, short (``"224px b8 fp32"``);
* ``ratio_kind``: what ``ratio`` compares, with its direction (one of the ``RATIO_*`` strings
  below), or None for a row that only reports a value (a matmul peak, a parity check);
* ``ratio``: the headline ratio of the case (float, or None);
* ``value``, ``unit``: one measured quantity behind it (e.g. our median ms per batch);
* ``notes``: one line of context (other ratios of the same case, rounds, load);
* ``detail``: a dict with whatever else the script measured for that row (free form).

A row with ``detail["matmul_peak"]`` set is a 2048³ ``torch.mm`` peak of this machine
(:func:`peak_row`); ``radgen bench`` puts those in its header, not in the table.
"""

from __future__ import annotations

import json
import math
import os

RATIO_OURS_VS_HF = "ours vs transformers.Dinov2Model (time ratio, >1 = ours faster)"
RATIO_OURS_VS_CARD = "radgen features vs rad-dino model-card loop (throughput ratio, >1 = ours faster)"
RATIO_BATCHED = "batched vs one-at-a-time (time ratio, >1 = batched faster)"
RATIO_PEAK = "achieved vs measured 2048³ matmul peak (fraction, 1.0 = at peak)"
RATIO_TARGET = "target / measured wall time (>1 = within target)"
RATIO_WHAT_IF = "what-if variant vs as-run (time ratio, >1 = variant faster)"


def _clean(x):
    """JSON-safe: NaN and infinities become None (json.dumps would write invalid ``NaN``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def row(bench: str, case: str, ratio_kind: str | None = None, ratio: float | None = None,
        value: float | None = None, unit: str | None = None, notes: str = "", detail: dict | None = None,
        **more) -> dict:
    """One result row in the common shape; ``detail`` and any further keyword arguments form its ``detail``."""
    return {"bench": bench, "case": case, "ratio_kind": ratio_kind,
            "ratio": None if ratio is None else float(ratio),
            "value": None if value is None else float(value), "unit": unit, "notes": notes,
            "detail": _clean({**(detail or {}), **more})}


def peak_row(bench: str, precision: str, gflops: float, when: str) -> dict:
    """A 2048³ matmul peak measured by ``bench`` (``when``: ``"start"`` or ``"end"`` of its run)."""
    return row(bench, f"matmul peak {precision} (2048³, {when})", value=gflops, unit="GFLOP/s",
               matmul_peak=precision, when=when)


def add_json_arg(ap) -> None:
    ap.add_argument("--json", metavar="FILE",
                    help="also write the result rows as JSON (a list, in the shape of bench/_common.py)")


def write_json(path: str | os.PathLike | None, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` (no-op when None), atomically: a reader never sees half a file."""
    if not path:
        return
    from encoder.io import atomic_write_text

    atomic_write_text(path, json.dumps(_clean(rows), indent=2, allow_nan=False) + "\n")
