"""Ridge-regression probe (e.g. age from frozen features): MAE and R² with bootstrap CIs."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from eval.probes.result import ProbeScore, finite_or_none
from eval.stats import bootstrap_ci

__all__ = ["ALPHA_GRID", "ridge_probe"]


def _mae(y, p) -> float:
    return float(np.mean(np.abs(np.asarray(y) - p)))


def _r2(y, p) -> float:
    y = np.asarray(y, float)
    ss = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum((y - p) ** 2) / ss) if ss > 0 else float("nan")

ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # L2 strength, searched on validation (MAE)


def ridge_probe(target: str, x_train, y_train, x_val, y_val, x_test, y_test, *, alphas=ALPHA_GRID,
                alpha: float | None = None, n_resamples: int = 1000, seed: int = 0):
    """Standardised ridge regression; alpha chosen by validation MAE unless given.

    x_*: (N, D); y_*: (N,) floats. Returns ``([mae, r2] scores, test predictions)``.
    """
    with warnings.catch_warnings():  # tiny alphas on collinear features: ill-conditioned, still solved
        warnings.simplefilter("ignore", LinAlgWarning)
        return _ridge_probe(target, x_train, y_train, x_val, y_val, x_test, y_test, alphas, alpha,
                            n_resamples, seed)


def _ridge_probe(target, x_train, y_train, x_val, y_val, x_test, y_test, alphas, alpha, n_resamples, seed):
    scaler = StandardScaler().fit(x_train)
    xt, xs = scaler.transform(x_train), scaler.transform(x_test)
    val_mae: dict[float, float] = {}
    if alpha is None:
        if len(y_val):
            xv = scaler.transform(x_val)
            for a in alphas:
                val_mae[a] = _mae(y_val, Ridge(alpha=a).fit(xt, y_train).predict(xv))
            alpha = min(alphas, key=lambda a: val_mae[a])
        else:
            alpha = alphas[len(alphas) // 2]
    pred = Ridge(alpha=alpha).fit(xt, y_train).predict(xs)
    extra = {"alpha": float(alpha), "alpha_chosen_on": "validation" if val_mae else "fixed"}
    out = []
    for metric, fn in (("mae", _mae), ("r2", _r2)):
        v, lo, hi = bootstrap_ci(fn, np.asarray(y_test, float), pred, n_resamples=n_resamples, seed=seed)
        out.append(ProbeScore("ridge", target, metric, finite_or_none(v), finite_or_none(lo),
                              finite_or_none(hi), len(y_train), len(y_test), extra=dict(extra)))
    return out, pred
