"""What a reader checks first: per-finding precision/recall and the false-alarm rate on normal films.

Inputs are the reference and hypothesis label matrices of :mod:`eval.chexpert.f1`: ``(N, 14)`` in
``CHEXPERT_14`` column order, 1 positive, 0 negative, -1 uncertain, NaN not mentioned; row i of
both is the same film. The primary reading is uncertain-as-negative (``chexpert_f1``): a finding
is *named* iff its label is 1; ``chexpert_f1+`` also counts -1.

Per finding (:data:`FINDINGS_6`: the five CheXpert-5 findings and Support Devices), over all N films:

* ``support``: films whose reference names it (TP + FN); ``predicted``: films whose hypothesis
  names it (TP + FP);
* ``precision`` = TP / predicted, ``recall`` = TP / support, ``f1`` = 2TP / (2TP + FP + FN);
  each is ``None`` when its denominator is 0 (the system never names the finding, the reference
  never does, or neither), where ``chexpert_f1/<obs>`` and ``per_observation.csv`` write 0.

False alarms, over the films whose *reference* is No Finding (reference "No Finding" positive):

* ``any``: the share of them whose hypothesis names at least one of :data:`FALSE_ALARM_FINDINGS`,
  the 12 observations other than No Finding and Support Devices (a device is not a finding, and
  the CheXpert "No Finding" label allows devices);
* ``rate[obs]``: for each of those 12, the share of them whose hypothesis names it; ``max`` is
  the largest and ``max_finding`` its name (the first in ``CHEXPERT_14`` order on a tie; ``None``
  when no finding is named on any of them), ``max_findings`` every finding at that rate (``[]``
  when none is named); ``named[obs]`` and ``n_any`` are the film counts behind the rates. Every
  rate is ``None`` when there is no such film.

Everything is returned as plain dicts of ints, floats, strings and ``None`` (JSON-ready).
:func:`per_finding_from_stats` gives the same result from the per-pair TP/FP/FN ``stats`` of
:func:`eval.chexpert.f1.chexpert_f1` (which the scorer keeps instead of the label matrices).
"""

from __future__ import annotations

import numpy as np

from eval.chexpert.f1 import COUNTS, VARIANTS, binarise, check_label_matrix
from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES

__all__ = ["FINDINGS_6", "FALSE_ALARM_FINDINGS", "per_finding", "false_alarms", "per_finding_summary",
           "per_finding_from_stats", "positives_from_stats"]

FINDINGS_6: tuple[str, ...] = (*CHEXPERT_5, SUPPORT_DEVICES)
FALSE_ALARM_FINDINGS: tuple[str, ...] = tuple(o for o in CHEXPERT_14 if o not in (NO_FINDING, SUPPORT_DEVICES))
_NF = CHEXPERT_14.index(NO_FINDING)


def _share(num: int, den: int) -> float | None:
    return num / den if den else None


def _check_positives(ref_pos: np.ndarray, hyp_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref_pos, hyp_pos = np.asarray(ref_pos, dtype=bool), np.asarray(hyp_pos, dtype=bool)
    if ref_pos.shape != hyp_pos.shape or ref_pos.ndim != 2 or ref_pos.shape[1] != len(CHEXPERT_14):
        raise ValueError(f"expected two (N, 14) matrices of the same shape, got {ref_pos.shape} and {hyp_pos.shape}")
    return ref_pos, hyp_pos


def _per_finding(ref_pos: np.ndarray, hyp_pos: np.ndarray, findings) -> list[dict]:
    rows = []
    for obs in findings:
        j = CHEXPERT_14.index(obs)
        r, h = ref_pos[:, j], hyp_pos[:, j]
        tp, fp, fn = int((r & h).sum()), int((~r & h).sum()), int((r & ~h).sum())
        rows.append({"finding": obs, "support": tp + fn, "predicted": tp + fp, "tp": tp, "fp": fp, "fn": fn,
                     "precision": _share(tp, tp + fp), "recall": _share(tp, tp + fn),
                     "f1": _share(2 * tp, 2 * tp + fp + fn)})
    return rows


def _false_alarms(ref_pos: np.ndarray, hyp_pos: np.ndarray) -> dict:
    normal = ref_pos[:, _NF]  # (N,) reference is No Finding
    cols = [CHEXPERT_14.index(o) for o in FALSE_ALARM_FINDINGS]
    named = hyp_pos[normal][:, cols]  # (n_no_finding, 12)
    n = int(normal.sum())
    counts = {o: int(c) for o, c in zip(FALSE_ALARM_FINDINGS, named.sum(axis=0))}
    n_any = int(named.any(axis=1).sum())
    top = max(FALSE_ALARM_FINDINGS, key=lambda o: counts[o])  # first on a tie
    tied = [o for o in FALSE_ALARM_FINDINGS if counts[o] and counts[o] == counts[top]]
    return {"n_no_finding": n, "n_any": n_any, "any": _share(n_any, n),
            "named": counts, "rate": {o: _share(c, n) for o, c in counts.items()},
            "max_finding": top if counts[top] else None, "max": _share(counts[top], n), "max_findings": tied,
            "counted": list(FALSE_ALARM_FINDINGS)}


def _summary(ref_pos: np.ndarray, hyp_pos: np.ndarray, variant: str, findings) -> dict:
    ref_pos, hyp_pos = _check_positives(ref_pos, hyp_pos)
    return {"variant": variant,
            "positive": "label == 1" if variant == "chexpert_f1" else "label == 1 or label == -1",
            "n_films": int(len(ref_pos)),
            "findings": _per_finding(ref_pos, hyp_pos, findings),
            "false_alarm": _false_alarms(ref_pos, hyp_pos)}


def _positives(ref_labels, hyp_labels, variant: str) -> tuple[np.ndarray, np.ndarray]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    ref = check_label_matrix(ref_labels, "ref_labels")
    hyp = check_label_matrix(hyp_labels, "hyp_labels")
    if ref.shape != hyp.shape:
        raise ValueError(f"ref_labels {ref.shape} and hyp_labels {hyp.shape} must have the same shape")
    plus = VARIANTS[variant] == "uncertain_as_positive"
    return binarise(ref, plus), binarise(hyp, plus)


def per_finding(ref_labels, hyp_labels, findings=FINDINGS_6, variant: str = "chexpert_f1") -> list[dict]:
    """(N, 14) reference and hypothesis labels -> one dict per finding (in ``findings`` order):
    ``finding, support, predicted, tp, fp, fn, precision, recall, f1`` (see the module docstring)."""
    return _per_finding(*_positives(ref_labels, hyp_labels, variant), findings)


def false_alarms(ref_labels, hyp_labels, variant: str = "chexpert_f1") -> dict:
    """(N, 14) reference and hypothesis labels -> ``{n_no_finding, n_any, any, named {obs: films},
    rate {obs: share}, max_finding, max, max_findings, counted}`` over the films whose reference is
    No Finding (the 12 ``counted`` findings are :data:`FALSE_ALARM_FINDINGS`)."""
    return _false_alarms(*_positives(ref_labels, hyp_labels, variant))


def per_finding_summary(ref_labels, hyp_labels, variant: str = "chexpert_f1", findings=FINDINGS_6) -> dict:
    """Both of the above: ``{variant, positive, n_films, findings: [...], false_alarm: {...}}``."""
    return _summary(*_positives(ref_labels, hyp_labels, variant), variant, findings)


def positives_from_stats(stats, variant: str = "chexpert_f1") -> tuple[np.ndarray, np.ndarray]:
    """(N, 84) per-pair stats of ``chexpert_f1`` -> (reference, hypothesis) (N, 14) bool "named"
    matrices of ``variant``: reference named = TP + FN, hypothesis named = TP + FP."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    stats = np.asarray(stats, dtype=float)
    width = len(VARIANTS) * len(CHEXPERT_14) * len(COUNTS)
    if stats.ndim != 2 or stats.shape[1] != width:
        raise ValueError(f"stats: expected shape (N, {width}) from chexpert_f1, got {stats.shape}")
    c = stats.reshape(len(stats), len(VARIANTS), len(CHEXPERT_14), len(COUNTS))[:, list(VARIANTS).index(variant)]
    tp, fp, fn = c[..., 0] > 0, c[..., 1] > 0, c[..., 2] > 0
    return tp | fn, tp | fp


def per_finding_from_stats(stats, variant: str = "chexpert_f1", findings=FINDINGS_6) -> dict:
    """:func:`per_finding_summary` from ``chexpert_f1(...).stats`` instead of the label matrices."""
    return _summary(*positives_from_stats(stats, variant), variant, findings)
