"""Logistic-regression probe with AUROC and a bootstrap CI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from eval.stats import bootstrap_ci

__all__ = ["ProbeResult", "logistic_probe"]


@dataclass
class ProbeResult:
    target: str
    auroc: float
    ci_low: float
    ci_high: float
    n_train: int
    n_test: int
    n_test_pos: int


def logistic_probe(
    target: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    C: float = 0.1,
    n_resamples: int = 1000,
    seed: int = 0,
) -> ProbeResult:
    """Fit an L2 logistic regression on standardised features; AUROC on the test rows.

    Args:
        x_train, x_test: (N, D) features. y_train, y_test: (N,) binary targets.
        C: inverse regularisation strength (small: strongly regularised, sensible for D >> N).
    """
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=C, max_iter=2000)
    clf.fit(scaler.transform(x_train), y_train)
    scores = clf.predict_proba(scaler.transform(x_test))[:, 1]
    auroc, lo, hi = bootstrap_ci(roc_auc_score, y_test, scores, n_resamples=n_resamples, seed=seed)
    return ProbeResult(target, auroc, lo, hi, len(y_train), len(y_test), int(np.sum(y_test)))
