"""Bootstrap confidence intervals."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_delta_ci"]


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


def paired_delta_ci(
    metric: Callable[..., float],
    a: Sequence[np.ndarray],
    others: Sequence[Sequence[np.ndarray]],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``(delta, low, high)`` of ``metric(*a) - mean_k metric(*others[k])``, bootstrapped *paired*.

    Every array has one row per test item, in the same order for ``a`` and each of ``others``
    (one system and k comparators scored on the same items). Each resample draws one set of rows
    for all of them, so the interval is that of the difference on the same items, narrower than
    comparing two separate intervals when the systems' errors move together. Resamples on which
    the metric is undefined are skipped, as in :func:`bootstrap_ci`.
    """
    k = len(a)
    if not others or any(len(o) != k for o in others):
        raise ValueError(f"paired_delta_ci: every comparator needs the same {k} arrays as the system")
    arrays = [np.asarray(x) for x in a] + [np.asarray(x) for o in others for x in o]
    if len({len(x) for x in arrays}) != 1:
        raise ValueError("paired_delta_ci: all arrays must have one row per test item, in the same order")

    def delta(*arrs: np.ndarray) -> float:
        values = [metric(*arrs[i:i + k]) for i in range(0, len(arrs), k)]
        return float(values[0] - np.mean(values[1:]))

    return bootstrap_ci(delta, *arrays, n_resamples=n_resamples, seed=seed, alpha=alpha)

