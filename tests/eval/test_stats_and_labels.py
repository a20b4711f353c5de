"""Bootstrap CIs, the label convention and the logistic probe."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14, parse_label
from eval.probes.linear import logistic_probe
from eval.stats import bootstrap_ci


def test_observations():
    assert len(CHEXPERT_14) == 14 and set(CHEXPERT_5) <= set(CHEXPERT_14)


@pytest.mark.parametrize("raw, want", [("1", 1), ("1.0", 1), (0, 0), (-1.0, -1), ("", None),
                                       (None, None), (float("nan"), None), (" -1 ", -1)])
def test_parse_label(raw, want):
    assert parse_label(raw) == want


@pytest.mark.parametrize("raw", ["2", "yes", 0.5, True])
def test_parse_label_rejects(raw):
    with pytest.raises(ValueError):
        parse_label(raw)


def test_bootstrap_ci_of_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, 400)
    point, lo, hi = bootstrap_ci(np.mean, x, n_resamples=500, seed=1)
    assert point == pytest.approx(x.mean())
    se = x.std() / np.sqrt(len(x))
    # Percentile interval close to the normal-theory +-1.96 SE interval.
    assert lo == pytest.approx(point - 1.96 * se, abs=0.35 * se)
    assert hi == pytest.approx(point + 1.96 * se, abs=0.35 * se)


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 19 + [1])
    s = np.linspace(0, 1, 20)
    point, lo, hi = bootstrap_ci(roc_auc_score, y, s, n_resamples=200, seed=0)
    assert point == 1.0 and lo <= hi <= 1.0


def test_logistic_probe_separable_vs_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] > 0).astype(float)
    good = logistic_probe("x0", x[:200], y[:200], x[200:], y[200:], n_resamples=100)
    assert good.auroc > 0.95 and good.ci_low <= good.auroc <= good.ci_high
    noise = logistic_probe("noise", rng.normal(size=(200, 5)), y[:200], rng.normal(size=(100, 5)),
                           y[200:], n_resamples=100)
    assert 0.3 < noise.auroc < 0.7
