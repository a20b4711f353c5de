"""The one shape every report metric returns, so bootstrap CIs and paired comparisons are generic.

A metric reduces N (reference, hypothesis) pairs to per-pair *sufficient statistics* ``stats``
(shape ``(N, k)``) and an ``aggregate`` function that turns any subset of those rows into named
scores. Averaged metrics (ROUGE-L, RadGraph) store one score per pair and aggregate by the mean;
corpus metrics (BLEU, micro-F1) store counts and aggregate with their own formula. A bootstrap
resample is then just ``aggregate(stats[idx])`` — no re-tokenising, no re-running a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["MetricOutput", "mean_aggregate"]


@dataclass
class MetricOutput:
    """Per-pair statistics of one metric family and how to turn them into scores.

    stats:     (N, k) float array, row i belongs to pair i.
    aggregate: (M, k) rows -> {score_name: value}; ``aggregate(stats)`` is the reported score.
    info:      provenance recorded with the output (implementation, variant, options).
    per_pair:  optional {score_name: (N,) array} for per-report inspection (written to CSV).
    """

    stats: np.ndarray
    aggregate: Callable[[np.ndarray], dict[str, float]]
    info: dict = field(default_factory=dict)
    per_pair: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        return self.aggregate(self.stats)


def mean_aggregate(names: list[str]) -> Callable[[np.ndarray], dict[str, float]]:
    """Aggregate for metrics whose corpus score is the mean of per-pair scores (column j = names[j])."""

    def agg(stats: np.ndarray) -> dict[str, float]:
        means = stats.mean(axis=0) if len(stats) else np.full(len(names), np.nan)
        return {n: float(m) for n, m in zip(names, means)}

    return agg
