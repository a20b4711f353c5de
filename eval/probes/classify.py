"""Classification probes on frozen features: logistic regression (C chosen on validation), a
cosine kNN, and macro averages — all with 95% bootstrap CIs on the test rows.

Labels arrive as floats: 1 positive, 0 negative, NaN = not used for this target (an uncertain
label dropped by :func:`binary_labels`). Every function is arrays in, :class:`ProbeScore` out.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from scipy.stats import rankdata
from sklearn.preprocessing import StandardScaler

from eval.probes.result import ProbeScore, finite_or_none
from eval.stats import bootstrap_ci

__all__ = ["C_GRID", "NEWTON_MAX_FEATURES", "UNCERTAIN_RULES", "auroc", "average_precision", "binary_labels",
           "fit_logistic", "logistic_probe", "logistic_solver", "knn_scores", "knn_probe", "macro_auroc", "macro_score"]

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength, searched on validation
# What an uncertain (-1) CheXpert label becomes: dropped for that target (default), or counted as
# positive ("U-Ones") or negative ("U-Zeros"), the policies of Irvin et al. 2019.
UNCERTAIN_RULES = ("ignore", "positive", "negative")


def binary_labels(values, uncertain: str = "ignore") -> np.ndarray:
    """CheXpert-style labels (1, 0, -1, blank/None) -> float (N,): 1, 0 or NaN (dropped).

    Blank means "not mentioned" and counts as negative, as CheXpert-trained classifiers do.
    """
    if uncertain not in UNCERTAIN_RULES:
        raise ValueError(f"uncertain rule {uncertain!r}: choose one of {', '.join(UNCERTAIN_RULES)}")
    out = np.zeros(len(values), dtype=float)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
            continue
        v = float(v)
        if v == 1:
            out[i] = 1.0
        elif v == -1:
            out[i] = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    return out


def auroc(y, s) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count half), equal to sklearn's
    ``roc_auc_score`` without its input validation: the bootstrap calls it ~10^5 times."""
    y = np.asarray(y, bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y, s) -> float:
    """Average precision as sklearn defines it (sum over distinct thresholds of recall steps
    times precision), without input validation."""
    y = np.asarray(y, float)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(s), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # end of each tie group
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


NEWTON_MAX_FEATURES = 1024  # above this a Newton step's d x d Hessian costs more than L-BFGS's iterations


def logistic_solver(n_features: int) -> str:
    """The scikit-learn solver for an L2 logistic probe on ``n_features`` standardised features.

    Both solvers reach the same (strictly convex) optimum; they differ in cost. On probe-sized
    features (a few hundred, correlated: CLS next to mean patch token) L-BFGS needs hundreds of
    iterations at large C, Newton-Cholesky five or six (on the ``--full`` demo's 384-wide
    ``cls+mean`` features about 10x faster over the C grid; where L-BFGS had stopped short,
    macro AUROC moves by up to 0.003).
    """
    return "newton-cholesky" if n_features <= NEWTON_MAX_FEATURES else "lbfgs"


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None = None,
                 y_val: np.ndarray | None = None, Cs=C_GRID, C: float | None = None):
    """Standardised L2 logistic regression; ``C`` picked by validation AUROC unless given.

    Returns ``(predict, C, val_auroc)``: ``predict(x) -> (N,)`` positive-class scores, the C used,
    and ``{C: validation AUROC}`` (empty when C was fixed). Without usable validation rows (both
    classes) the middle of the grid is used.
    """
    scaler = StandardScaler().fit(x_train)
    xt = scaler.transform(x_train)
    solver = logistic_solver(xt.shape[1])

    def fit(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at tiny C on separable data
            return LogisticRegression(C=c, max_iter=3000, solver=solver).fit(xt, y_train)

    val_auroc: dict[float, float] = {}
    if C is None:
        if x_val is not None and len(y_val) and 0 < np.sum(y_val) < len(y_val):
            xv = scaler.transform(x_val)
            for c in Cs:
                val_auroc[c] = float(auroc(y_val, fit(c).decision_function(xv)))
            C = max(Cs, key=lambda c: (val_auroc[c], -abs(np.log10(c) + 2)))  # ties: nearer 1e-2
        else:
            C = Cs[len(Cs) // 2]
    model = fit(C)
    return (lambda x: model.decision_function(scaler.transform(x))), float(C), val_auroc


def _scores(probe, target, y_test, s, n_train, n_resamples, seed, extra) -> list[ProbeScore]:
    out = []
    for metric, fn in (("auroc", auroc), ("ap", average_precision)):
        v, lo, hi = bootstrap_ci(fn, y_test, s, n_resamples=n_resamples, seed=seed)
        out.append(ProbeScore(probe, target, metric, finite_or_none(v), finite_or_none(lo),
                              finite_or_none(hi), n_train, len(y_test), int(np.sum(y_test)), extra=dict(extra)))
    return out


def logistic_probe(target: str, x_train, y_train, x_val, y_val, x_test, y_test, *, Cs=C_GRID,
                   C: float | None = None, n_resamples: int = 1000, seed: int = 0):
    """AUROC and AP of a logistic probe on the test rows; ``(scores, test_predictions)``.

    x_*: (N, D) features; y_*: (N,) in {0, 1} (NaN rows already removed). ``C`` fixes the
    regularisation; by default it is chosen on the validation rows from ``Cs``.
    """
    predict, c, val = fit_logistic(x_train, y_train, x_val, y_val, Cs=Cs, C=C)
    s = predict(x_test)
    how = "validation" if val else ("fixed" if C is not None else "default (validation unusable)")
    extra = {"C": c, "C_chosen_on": how}
    return _scores("logistic", target, y_test, s, len(y_train), n_resamples, seed, extra), s


def knn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
    """Cosine kNN vote (DINO's weighted kNN): ``sum_j exp(sim_j / T) y_j / sum_j exp(sim_j / T)``
    over the ``k`` most similar training rows. (N_test,) scores in [0, 1]."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(x_test) @ unit(x_train).T  # (N_test, N_train)
    k = min(k, sim.shape[1])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sim, idx, axis=1)
    w = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
    return (w * np.asarray(y_train, float)[idx]).sum(1) / w.sum(1)


def knn_probe(target: str, x_train, y_train, x_test, y_test, *, k: int = 20, temperature: float = 0.07,
              n_resamples: int = 1000, seed: int = 0):
    """AUROC and AP of the cosine kNN probe; ``(scores, test_predictions)``."""
    s = knn_scores(x_train, y_train, x_test, k=k, temperature=temperature)
    extra = {"k": k, "temperature": temperature}
    return _scores("knn", target, y_test, s, len(y_train), n_resamples, seed, extra), s


def macro_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mean AUROC over columns of ``y`` / ``s`` (N, T), each over its non-NaN rows; columns
    without both classes in these rows are left out. NaN if none is left."""
    vals = []
    for t in range(y.shape[1]):
        ok = ~np.isnan(y[:, t])
        yt = y[ok, t]
        if 0 < yt.sum() < len(yt):
            vals.append(auroc(yt, s[ok, t]))
    return float(np.mean(vals)) if vals else float("nan")


def macro_score(probe: str, y: np.ndarray, s: np.ndarray, n_train: int, n_resamples: int = 1000,
                seed: int = 0, targets: list[str] | None = None) -> ProbeScore:
    """Macro AUROC over targets with a CI from resampling the test *images* (all targets jointly)."""
    v, lo, hi = bootstrap_ci(macro_auroc, y, s, n_resamples=n_resamples, seed=seed)
    return ProbeScore(probe, "macro", "auroc", finite_or_none(v), finite_or_none(lo), finite_or_none(hi),
                      n_train, int(y.shape[0]), extra={"targets": list(targets or [])})
