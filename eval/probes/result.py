"""One result shape for every probe, so tables, CSVs and plots treat them alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ProbeScore", "finite_or_none", "HIGHER_IS_BETTER"]

# Metrics where a larger value is better; the rest (mae) are errors.
HIGHER_IS_BETTER = {"auroc": True, "ap": True, "dice": True, "iou": True, "r2": True, "mae": False}


def finite_or_none(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


@dataclass
class ProbeScore:
    """One number a probe produced, with its 95% bootstrap CI.

    ``probe`` is the protocol (``logistic``, ``knn``, ``segment``, ``ridge``), ``target`` what was
    predicted (a finding, ``macro``, ``sex (F)``, ``age``, a structure such as ``right_lung``),
    ``metric`` the measure (``auroc``, ``ap``, ``dice``, ``iou``, ``mae``, ``r2``). ``value`` is
    ``None`` (with a ``note``) when the probe could not be fitted, e.g. too few positives.
    """

    probe: str
    target: str
    metric: str
    value: float | None
    low: float | None = None
    high: float | None = None
    n_train: int = 0
    n_test: int = 0
    n_pos: int | None = None  # binary targets: positives in the test rows
    note: str = ""
    extra: dict = field(default_factory=dict)  # e.g. the regularisation chosen on validation

    def to_dict(self) -> dict:
        return asdict(self)
