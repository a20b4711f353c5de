"""The fixed-C logistic probe behind ``radgen pixel-baseline``: one target, AUROC with a CI.

A thin view of :func:`eval.probes.classify.logistic_probe` for callers that want one AUROC
record per target and a fixed regularisation (no validation split); the full probes choose C on
validation and report AP and macro averages too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.probes.classify import logistic_probe as _logistic_probe

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
    """L2 logistic regression on standardised features with a fixed ``C``; AUROC on the test rows.

    Args:
        x_train, x_test: (N, D) features. y_train, y_test: (N,) binary targets.
        C: inverse regularisation strength (small: strongly regularised, sensible for D >> N).
    """
    empty = np.empty((0, np.asarray(x_train).shape[1]))
    scores, _ = _logistic_probe(target, x_train, y_train, empty, np.empty(0), x_test, y_test, C=C,
                                n_resamples=n_resamples, seed=seed)
    a = next(s for s in scores if s.metric == "auroc")
    nan = float("nan")
    return ProbeResult(target, nan if a.value is None else a.value, nan if a.low is None else a.low,
                       nan if a.high is None else a.high, len(y_train), len(y_test), int(np.sum(y_test)))
