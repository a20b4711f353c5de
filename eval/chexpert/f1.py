"""Clinical (CheXpert) F1 between the labels of reference and generated reports.

Inputs are (N, 14) label matrices in ``CHEXPERT_14`` column order with the CheXpert convention
(1 positive, 0 negative, -1 uncertain, NaN not mentioned), one row per (reference, hypothesis) pair,
as produced by any report labeler (CheXbert, the CheXpert rule labeler, ...).

Binarisation. A label counts as *positive* under two variants:

* uncertain-as-negative (key prefix ``chexpert_f1``): positive iff label == 1;
* uncertain-as-positive (key prefix ``chexpert_f1+``): positive iff label is 1 or -1.

Blank (NaN) and 0 are negative in both. The "+" variant matches f1chexbert's ``rrg`` mode (used by
the RRG / ReXrank scorers); the plain variant is the common "positive = 1" reading.

Score keys (``aggregate`` output), for V in {``chexpert_f1``, ``chexpert_f1+``}:

* ``V_14_micro``, ``V_14_macro``: all 14 observations (No Finding included);
* ``V_5_micro``, ``V_5_macro``: the five competition observations ``CHEXPERT_5``;
* ``V/<observation>``: that observation's F1; precision and recall are under
  ``chexpert_precision/<obs>`` / ``chexpert_recall/<obs>`` (and ``chexpert_precision+/<obs>``,
  ``chexpert_recall+/<obs>`` for the uncertain-as-positive variant).

Conventions (the same as sklearn's ``f1_score`` / ``classification_report`` on multilabel indicator
matrices with ``zero_division=0``, which the usual CheXbert-F1 implementations call): per
observation F1 = 2TP / (2TP + FP + FN), and 0 when the observation is positive in neither the
references nor the hypotheses; precision TP/(TP+FP) and recall TP/(TP+FN) are 0 when undefined.
Micro F1 pools TP/FP/FN over the observations and pairs; macro F1 is the unweighted mean of the
per-observation F1 (observations absent from both sides therefore pull it down). An empty set of
pairs gives NaN.

``stats`` holds per-pair TP/FP/FN for every variant and observation, so a bootstrap resample is
``aggregate(stats[idx])``; ``per_observation_table(stats)`` gives a printable/plottable table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14
from eval.metric import MetricOutput

__all__ = [
    "COUNTS",
    "VARIANTS",
    "binarise",
    "chexpert_f1",
    "chexpert_f1_aggregate",
    "check_label_matrix",
    "f1_from_counts",
    "per_observation_table",
    "stat_columns",
]

# Score-key prefix -> how uncertain (-1) is read.
VARIANTS: dict[str, str] = {"chexpert_f1": "uncertain_as_negative", "chexpert_f1+": "uncertain_as_positive"}
COUNTS = ("tp", "fp", "fn")
_SUFFIX = {"chexpert_f1": "", "chexpert_f1+": "+"}
_IDX_5 = [CHEXPERT_14.index(o) for o in CHEXPERT_5]


def stat_columns() -> list[str]:
    """Names of the ``stats`` columns: ``<variant>/<observation>/<tp|fp|fn>``, variant-major."""
    return [f"{v}/{o}/{c}" for v in VARIANTS for o in CHEXPERT_14 for c in COUNTS]


def check_label_matrix(labels: object, name: str) -> np.ndarray:
    """-> (N, 14) float array; raises ValueError naming ``name`` for a bad shape or value."""
    try:
        arr = np.asarray(labels, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read as a numeric (N, 14) label matrix: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] != len(CHEXPERT_14):
        raise ValueError(f"{name}: expected shape (N, 14) in CHEXPERT_14 order, got {arr.shape}")
    bad = ~(np.isnan(arr) | np.isin(arr, (1.0, 0.0, -1.0)))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{name}: labels must be 1, 0, -1 or NaN; row {r}, column {c} "
                         f"({CHEXPERT_14[c]}) is {arr[r, c]!r} ({int(bad.sum())} bad cells)")
    return arr


def binarise(labels: np.ndarray, uncertain_as_positive: bool) -> np.ndarray:
    """Label matrix -> bool "positive" matrix (NaN and 0 negative; -1 per the variant)."""
    pos = labels == 1.0
    return pos | (labels == -1.0) if uncertain_as_positive else pos


def _pair_counts(ref_pos: np.ndarray, hyp_pos: np.ndarray) -> np.ndarray:
    """(N, 14) bools -> (N, 14, 3) TP/FP/FN per pair and observation."""
    return np.stack([ref_pos & hyp_pos, ~ref_pos & hyp_pos, ref_pos & ~hyp_pos], axis=-1).astype(float)


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Elementwise 2TP/(2TP+FP+FN), 0 where nothing is positive on either side."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(den, dtype=float), where=den > 0)


def _totals(stats: np.ndarray) -> np.ndarray:
    """(M, k) stats -> (n_variants, 14, 3) summed counts."""
    stats = np.asarray(stats, dtype=float)
    width = len(VARIANTS) * len(CHEXPERT_14) * len(COUNTS)
    if stats.ndim != 2 or stats.shape[1] != width:
        raise ValueError(f"stats: expected shape (M, {width}) from chexpert_f1, got {stats.shape}")
    return stats.sum(axis=0).reshape(len(VARIANTS), len(CHEXPERT_14), len(COUNTS))


def chexpert_f1_aggregate(stats: np.ndarray) -> dict[str, float]:
    """Rows of ``chexpert_f1(...).stats`` -> every score key listed in the module docstring."""
    empty = len(stats) == 0
    totals = _totals(stats)
    out: dict[str, float] = {}
    for (prefix, _), counts in zip(VARIANTS.items(), totals):
        tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
        f1 = f1_from_counts(tp, fp, fn)
        for tag, idx in (("14", slice(None)), ("5", _IDX_5)):
            micro = f1_from_counts(tp[idx].sum(), fp[idx].sum(), fn[idx].sum())
            out[f"{prefix}_{tag}_micro"] = float("nan") if empty else float(micro)
            out[f"{prefix}_{tag}_macro"] = float("nan") if empty else float(f1[idx].mean())
        prec, rec = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        sfx = _SUFFIX[prefix]
        for j, obs in enumerate(CHEXPERT_14):
            out[f"{prefix}/{obs}"] = float("nan") if empty else float(f1[j])
            out[f"chexpert_precision{sfx}/{obs}"] = float("nan") if empty else float(prec[j])
            out[f"chexpert_recall{sfx}/{obs}"] = float("nan") if empty else float(rec[j])
    return out


def per_observation_table(stats: np.ndarray, variant: str = "chexpert_f1") -> list[dict]:
    """One dict per observation (CHEXPERT_14 order): observation, support (reference positives),
    predicted (hypothesis positives), tp, fp, fn, precision, recall, f1, in_chexpert_5.

    ``variant`` is a key of ``VARIANTS``. Works on any subset of rows (e.g. a bootstrap resample).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    counts = _totals(stats)[list(VARIANTS).index(variant)]
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    prec, rec, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), f1_from_counts(tp, fp, fn)
    return [
        {"observation": obs, "support": int(tp[j] + fn[j]), "predicted": int(tp[j] + fp[j]),
         "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]),
         "precision": float(prec[j]), "recall": float(rec[j]), "f1": float(f1[j]),
         "in_chexpert_5": obs in CHEXPERT_5}
        for j, obs in enumerate(CHEXPERT_14)
    ]


def chexpert_f1(ref_labels: object, hyp_labels: object, labeler_name: str) -> MetricOutput:
    """Clinical F1 of hypothesis labels against reference labels, both (N, 14) in CHEXPERT_14 order.

    ``labeler_name`` (e.g. "chexbert") is recorded in ``info``: scores from different labelers
    are not comparable.
    """
    ref = check_label_matrix(ref_labels, "ref_labels")
    hyp = check_label_matrix(hyp_labels, "hyp_labels")
    if ref.shape != hyp.shape:
        raise ValueError(f"ref_labels {ref.shape} and hyp_labels {hyp.shape} must have the same shape")
    if not isinstance(labeler_name, str) or not labeler_name:
        raise ValueError(f"labeler_name must be a non-empty string, got {labeler_name!r}")
    n = len(ref)
    per_variant = []
    per_pair: dict[str, np.ndarray] = {}
    for prefix, mode in VARIANTS.items():
        plus = mode == "uncertain_as_positive"
        counts = _pair_counts(binarise(ref, plus), binarise(hyp, plus))  # (N, 14, 3)
        per_variant.append(counts.reshape(n, len(CHEXPERT_14) * len(COUNTS)))
        sfx = _SUFFIX[prefix]
        for c, name in enumerate(COUNTS):  # per-report error counts over all 14 observations
            per_pair[f"chexpert_{name}{sfx}_14"] = counts[:, :, c].sum(axis=1)
    stats = np.concatenate(per_variant, axis=1)
    agg: Callable[[np.ndarray], dict[str, float]] = chexpert_f1_aggregate
    info = {
        "metric": "chexpert_f1",
        "labeler": labeler_name,
        "observations": list(CHEXPERT_14),
        "observations_5": list(CHEXPERT_5),
        "variants": dict(VARIANTS),
        "positive": "label == 1 (chexpert_f1) or label in {1, -1} (chexpert_f1+); blank and 0 negative",
        "macro": "unweighted mean of per-observation F1; F1 = 0 when an observation is positive "
                 "in neither reference nor hypothesis (sklearn zero_division=0)",
        "micro": "F1 of TP/FP/FN pooled over observations and pairs",
        "stat_columns": stat_columns(),
        "implementation": "radgen eval.chexpert.f1",
    }
    return MetricOutput(stats=stats, aggregate=agg, info=info, per_pair=per_pair)
