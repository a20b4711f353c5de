"""Bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the metric on the data and its percentile bootstrap interval.

    Rows are resampled jointly across ``arrays``; resamples on which the metric is undefined
    (it raises ``ValueError`` or returns NaN, e.g. AUROC of a one-class resample) are skipped.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    point = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = float(metric(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if np.isfinite(value):
            stats.append(value)
    if not stats:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
