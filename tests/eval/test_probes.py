"""Probe mechanics on constructed data: what a probe must find when the signal is there, and not
find when it is not."""

from __future__ import annotations

import numpy as np
import pytest

from eval.probes.classify import (auroc, average_precision, binary_labels, fit_logistic, knn_probe, logistic_probe, macro_auroc,
                                  macro_score)
from eval.probes.regress import ridge_probe
from eval.probes.segment import dice_iou, pixel_auroc, position_features, segmentation_probe


def _split(x, y, n_train, n_val):
    return (x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val],
            x[n_train + n_val:], y[n_train + n_val:])


def test_binary_labels_rules():
    vals = [1, 0, -1, None, "", 1.0, -1.0]
    assert np.array_equal(binary_labels(vals, "positive"), [1, 0, 1, 0, 0, 1, 1])
    assert np.array_equal(binary_labels(vals, "negative"), [1, 0, 0, 0, 0, 1, 0])
    ign = binary_labels(vals, "ignore")
    assert np.isnan(ign[2]) and np.isnan(ign[6]) and ign[3] == 0
    with pytest.raises(ValueError, match="uncertain rule"):
        binary_labels(vals, "maybe")


def test_separable_features_give_auroc_one_and_shuffled_labels_half():
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.4).astype(float)
    x = rng.normal(size=(600, 8))
    x[:, 0] += 4 * y
    scores, _ = logistic_probe("t", *_split(x, y, 300, 100), n_resamples=100)
    auroc = next(s for s in scores if s.metric == "auroc")
    assert auroc.value > 0.99 and auroc.low <= auroc.value <= auroc.high
    assert auroc.extra["C_chosen_on"] == "validation"
    shuffled = rng.permutation(y)
    scores, _ = logistic_probe("t", *_split(x, shuffled, 300, 100), n_resamples=100)
    a = next(s for s in scores if s.metric == "auroc")
    assert abs(a.value - 0.5) < 0.1 and a.low < 0.5 < a.high
    k, _ = knn_probe("t", x[:400], y[:400], x[400:], y[400:], n_resamples=100)
    assert next(s for s in k if s.metric == "auroc").value > 0.97


def test_regularisation_picked_on_validation_where_a_fixed_one_fails():
    """A nuisance variable shared by two features: only a weakly regularised fit learns to
    subtract it. The validation split must pick a large C, and beat a fixed strong one on test."""
    rng = np.random.default_rng(1)
    n = 900
    y = (rng.random(n) < 0.5).astype(float)
    nuisance = 3 * rng.normal(size=n)
    x = np.stack([y + nuisance, nuisance + 0.05 * rng.normal(size=n), rng.normal(size=n)], 1)
    parts = _split(x, y, 400, 200)
    _, c, val = fit_logistic(parts[0], parts[1], parts[2], parts[3])
    assert c >= 1.0 and val[c] > val[1e-4] + 0.2
    chosen, _ = logistic_probe("t", *parts, n_resamples=50)
    fixed, _ = logistic_probe("t", *parts, C=1e-4, n_resamples=50)
    a_chosen = next(s for s in chosen if s.metric == "auroc").value
    a_fixed = next(s for s in fixed if s.metric == "auroc").value
    assert a_chosen > 0.95 and a_chosen > a_fixed + 0.2, (c, a_chosen, a_fixed)
    assert fixed[0].extra == {"C": 1e-4, "C_chosen_on": "fixed"}


def test_probe_solver_reaches_the_lbfgs_optimum_on_correlated_features():
    """CLS next to a mean patch token: correlated columns, where L-BFGS is slow at large C. The
    probe's solver must land on the same L2 optimum (scores equal up to solver tolerance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from eval.probes.classify import NEWTON_MAX_FEATURES, logistic_solver

    rng = np.random.default_rng(3)
    n, d = 600, 48
    base = rng.normal(size=(n, d))
    x = np.concatenate([base, base + 0.1 * rng.normal(size=(n, d))], 1)  # (N, 2d), near-duplicate halves
    y = (base[:, 0] + 0.5 * base[:, 1] + rng.normal(size=n) > 0).astype(float)
    assert logistic_solver(x.shape[1]) == "newton-cholesky"
    assert logistic_solver(NEWTON_MAX_FEATURES + 1) == "lbfgs"
    predict, _, _ = fit_logistic(x[:400], y[:400], C=10.0)
    xs = StandardScaler().fit(x[:400])
    ref = LogisticRegression(C=10.0, tol=1e-10, max_iter=100_000).fit(xs.transform(x[:400]), y[:400])
    np.testing.assert_allclose(predict(x[400:]), ref.decision_function(xs.transform(x[400:])), atol=1e-3)


def test_macro_auroc_skips_missing_labels_and_one_class_columns():
    y = np.array([[1, 0, np.nan], [0, 1, 1], [1, 1, 1], [0, 0, 1]], float)
    s = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.2], [0.8, 0.7, 0.3], [0.2, 0.3, 0.4]])
    assert macro_auroc(y, s) == pytest.approx(1.0)  # third column has one class: left out
    m = macro_score("logistic", y, s, n_train=10, n_resamples=50)
    assert m.target == "macro" and m.value == pytest.approx(1.0)


def test_ridge_recovers_a_linear_target_and_not_a_shuffled_one():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 6))
    age = 50 + 10 * x[:, 0] - 5 * x[:, 1] + rng.normal(0, 1, 500)
    scores, pred = ridge_probe("age", *_split(x, age, 300, 100), n_resamples=100)
    by = {s.metric: s for s in scores}
    assert by["r2"].value > 0.95 and by["mae"].value < 1.5 and pred.shape == (100,)
    scores, _ = ridge_probe("age", *_split(x, rng.permutation(age), 300, 100), n_resamples=100)
    assert {s.metric: s for s in scores}["r2"].value < 0.1


def _blobs(n, rng, size=32, grid=16):
    """Label maps with a left and a right rectangle at random places, aligned to the patch grid;
    features = the label one-hot at the patch grid (informative) or noise."""
    small = np.zeros((n, grid, grid), np.int64)
    for i in range(n):
        for lab, c0 in ((1, rng.integers(1, 4)), (2, rng.integers(9, 12))):
            r0, h, w = rng.integers(1, 8), rng.integers(4, 8), rng.integers(3, 5)
            small[i, r0:r0 + h, c0:c0 + w] = lab
    masks = small.repeat(size // grid, 1).repeat(size // grid, 2)
    onehot = np.stack([(small == k) for k in range(3)], 1).astype(np.float32)
    return masks, onehot


def test_segmentation_probe_dice_near_one_with_informative_tokens_and_low_with_noise():
    rng = np.random.default_rng(3)
    masks, feats = _blobs(120, rng)
    names = {1: "left_disc", 2: "right_disc"}
    parts = (feats[:80], masks[:80], feats[80:100], masks[80:100], feats[100:], masks[100:])
    scores, pred, per_image = segmentation_probe(*parts, names, epochs=40, n_resamples=100)
    dice = {s.target: s.value for s in scores if s.metric == "dice"}
    assert min(dice.values()) > 0.95, dice
    assert min(s.value for s in scores if s.metric == "pixel_auroc") > 0.97
    assert pred.shape == masks[100:].shape
    assert per_image[("left_disc", "dice")].shape == (20,)
    assert np.nanmean(per_image[("left_disc", "dice")]) == pytest.approx(dice["left_disc"])
    noise = rng.normal(size=feats.shape).astype(np.float32)
    parts = (noise[:80], masks[:80], noise[80:100], masks[80:100], noise[100:], masks[100:])
    scores, _, _ = segmentation_probe(*parts, names, epochs=10, n_resamples=100)
    assert max(s.value for s in scores if s.metric == "dice") < 0.6
    # noise tokens rank a structure's pixels no better than chance, up to what its 1x1 head's
    # bias learns (no position: the same probability everywhere within each patch pattern)
    assert max(s.value for s in scores if s.metric == "pixel_auroc") < 0.65


def test_pixel_auroc_is_threshold_free_where_argmax_dice_is_not():
    true = np.zeros((2, 4, 4), int)
    true[:, :1] = 1  # a small structure: the top row
    prob = np.full((2, 4, 4), 0.2)
    prob[:, :1] = 0.3  # ranked first everywhere, but below 0.5 (a background softmax of 0.7 wins argmax)
    prob[1, 0, 0] = 0.1  # one of its pixels ranked last in image 1
    a = pixel_auroc(prob, true, 1)
    assert a[0] == 1.0 and a[1] == pytest.approx(1 - 12 / (4 * 12))
    pred = (prob > 0.5).astype(int)  # what argmax over {background, structure} would do
    assert np.nansum(dice_iou(pred, true, 1)[0]) == 0.0
    assert np.isnan(pixel_auroc(prob, np.ones_like(true), 1)).all()  # all structure: nothing to rank


def test_dice_iou_exact_and_position_features():
    t = np.zeros((2, 4, 4), int)
    t[0, :2] = 1
    p = t.copy()
    p[0, 0] = 0  # half of the structure missed
    d, i = dice_iou(p, t, 1)
    assert d[0] == pytest.approx(2 * 4 / (4 + 8)) and i[0] == pytest.approx(4 / 8)
    assert np.isnan(d[1]) and np.isnan(i[1])  # absent from both: not scored
    f = position_features(np.ones((3, 5, 5)))
    assert f.shape == (3, 3, 5, 5) and f[0, 1, 0, 0] == -1 and f[0, 2, -1, 0] == 1


def test_fast_auroc_and_ap_equal_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(4)
    for _ in range(20):
        y = (rng.random(60) < 0.3).astype(int)
        s = np.round(rng.normal(size=60) + y, 1)  # rounded: many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))
