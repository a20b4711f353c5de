"""Bootstrap CIs, the label convention and the logistic probe."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14, parse_label
from eval.probes.linear import logistic_probe
from eval.stats import bootstrap_ci, paired_delta_ci


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


def test_paired_delta_ci_draws_the_same_rows_for_every_system():
    """A system that beats its comparators by 0.1 on every row: the paired interval is [0.1, 0.1]
    although the systems' own intervals overlap; the point is the metric's difference of means."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    d, lo, hi = paired_delta_ci(np.mean, (x + 0.1,), [(x,), (x,)], n_resamples=200)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    _, a_lo, a_hi = bootstrap_ci(np.mean, x + 0.1, n_resamples=200)
    _, b_lo, b_hi = bootstrap_ci(np.mean, x, n_resamples=200)
    assert a_lo < b_hi  # unpaired, the two intervals overlap
    y = np.r_[np.zeros(100), np.ones(100)]
    d, lo, hi = paired_delta_ci(roc_auc_score, (y, y + rng.normal(0, 0.5, 200)),
                                [(y, rng.normal(size=200)), (y, rng.normal(size=200))], n_resamples=200)
    assert 0 < lo <= d <= hi
    with pytest.raises(ValueError):
        paired_delta_ci(np.mean, (x,), [(x[:10],)])

