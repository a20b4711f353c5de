"""Per-finding precision/recall and the false-alarm rate (eval.chexpert.per_finding), checked against
counts done by hand on a small label matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.chexpert.f1 import chexpert_f1
from eval.chexpert.observations import CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES
from eval.chexpert.per_finding import (
    FALSE_ALARM_FINDINGS,
    FINDINGS_6,
    false_alarms,
    per_finding,
    per_finding_from_stats,
    per_finding_summary,
)

NF, SD = NO_FINDING, SUPPORT_DEVICES
CARD, LO, EDEMA, CONS, ATEL, PE = ("Cardiomegaly", "Lung Opacity", "Edema", "Consolidation", "Atelectasis",
                                   "Pleural Effusion")


def _row(**labels: float) -> list[float]:
    """One (14,) label row: the given observations (by name, spaces as in CHEXPERT_14), NaN elsewhere."""
    row = [math.nan] * len(CHEXPERT_14)
    for name, v in labels.items():
        row[CHEXPERT_14.index(name)] = v
    return row


def _m(*rows: dict) -> np.ndarray:
    return np.array([_row(**r) for r in rows])


# Nine films: (reference labels, hypothesis labels). Films 1-5 are No Finding in the reference.
REF = _m(
    {NF: 1},                  # 1 normal
    {NF: 1, SD: 1},           # 2 normal with a device
    {NF: 1},                  # 3 normal
    {NF: 1},                  # 4 normal
    {NF: 1},                  # 5 normal
    {CARD: 1, PE: 1},         # 6
    {PE: 1, ATEL: 1},         # 7
    {EDEMA: 1, SD: 1},        # 8
    {LO: 1, CONS: -1},        # 9 consolidation uncertain in the reference
)
HYP = _m(
    {CARD: 1},                # 1 false alarm: Cardiomegaly
    {NF: 1, SD: 1},           # 2 the device only: not a false alarm
    {CARD: 1},                # 3 false alarm: Cardiomegaly
    {LO: 1, PE: 1},           # 4 false alarm: Lung Opacity and Pleural Effusion
    {ATEL: -1},               # 5 uncertain Atelectasis: not named under uncertain-as-negative
    {CARD: 1},                # 6 Cardiomegaly TP, Pleural Effusion FN
    {PE: 1, EDEMA: 1},        # 7 Pleural Effusion TP, Atelectasis FN, Edema FP
    {EDEMA: 0, SD: 1, CARD: 1},  # 8 Edema FN, Support Devices TP, Cardiomegaly FP
    {CONS: 1},                # 9 Consolidation named; the reference's -1 is negative -> FP
)


def _by_finding(rows: list[dict]) -> dict[str, dict]:
    return {r["finding"]: r for r in rows}


def test_per_finding_counts_by_hand():
    rows = per_finding(REF, HYP)
    assert [r["finding"] for r in rows] == list(FINDINGS_6)
    got = _by_finding(rows)
    # Atelectasis: reference names it on film 7 -> support 1; no hypothesis has a 1 (film 5 is -1)
    #   -> predicted 0, TP 0, FN 1: precision undefined, recall 0/1 = 0, F1 = 0/(0+0+1) = 0
    assert got[ATEL] == {"finding": ATEL, "support": 1, "predicted": 0, "tp": 0, "fp": 0, "fn": 1,
                        "precision": None, "recall": 0.0, "f1": 0.0}
    # Cardiomegaly: reference film 6 -> support 1; hypotheses 1, 3, 6, 8 -> predicted 4;
    #   TP 1 (film 6), FP 3 (films 1, 3, 8): precision 1/4, recall 1/1, F1 = 2·1/(2·1+3+0) = 0.4
    assert (got[CARD]["support"], got[CARD]["predicted"], got[CARD]["tp"], got[CARD]["fp"]) == (1, 4, 1, 3)
    assert got[CARD]["precision"] == pytest.approx(0.25)
    assert got[CARD]["recall"] == 1.0 and got[CARD]["f1"] == pytest.approx(0.4)
    # Consolidation: the reference's only mention is -1 (film 9) -> support 0; hypothesis film 9 -> FP 1:
    #   precision 0/1 = 0, recall undefined, F1 = 0/(0+1+0) = 0
    assert (got[CONS]["support"], got[CONS]["predicted"]) == (0, 1)
    assert got[CONS]["precision"] == 0.0 and got[CONS]["recall"] is None and got[CONS]["f1"] == 0.0
    # Edema: reference film 8 (hypothesis there says 0 -> FN); hypothesis film 7 (FP): P 0/1, R 0/1
    assert (got[EDEMA]["tp"], got[EDEMA]["fp"], got[EDEMA]["fn"]) == (0, 1, 1)
    assert got[EDEMA]["precision"] == 0.0 and got[EDEMA]["recall"] == 0.0
    # Pleural Effusion: reference films 6, 7 -> support 2; hypothesis films 4, 7 -> predicted 2;
    #   TP 1 (7), FP 1 (4), FN 1 (6): precision 1/2, recall 1/2, F1 = 2/(2+1+1) = 0.5
    assert (got[PE]["support"], got[PE]["predicted"], got[PE]["tp"]) == (2, 2, 1)
    assert got[PE]["precision"] == 0.5 and got[PE]["recall"] == 0.5 and got[PE]["f1"] == 0.5
    # Support Devices: films 2 and 8 on both sides: precision 2/2, recall 2/2
    assert (got[SD]["support"], got[SD]["predicted"], got[SD]["precision"], got[SD]["recall"]) == (2, 2, 1.0, 1.0)


def test_false_alarms_by_hand():
    fa = false_alarms(REF, HYP)
    # No-Finding reference films: 1-5 -> 5. A finding named on films 1, 3 (Cardiomegaly) and 4 (Lung
    # Opacity, Pleural Effusion); film 2 names only a device, film 5 only an uncertain finding.
    assert fa["n_no_finding"] == 5
    assert fa["n_any"] == 3 and fa["any"] == pytest.approx(3 / 5)
    assert fa["named"][CARD] == 2 and fa["rate"][CARD] == pytest.approx(2 / 5)
    assert fa["rate"][LO] == pytest.approx(1 / 5) and fa["rate"][PE] == pytest.approx(1 / 5)
    assert fa["rate"][ATEL] == 0.0
    # the largest single-finding rate: Cardiomegaly, 2/5
    assert fa["max_finding"] == CARD and fa["max"] == pytest.approx(2 / 5) and fa["max_findings"] == [CARD]
    assert fa["counted"] == list(FALSE_ALARM_FINDINGS)
    assert NF not in fa["rate"] and SD not in fa["rate"] and len(fa["rate"]) == 12


def test_uncertain_as_positive_variant():
    s = per_finding_summary(REF, HYP, variant="chexpert_f1+")
    fa = s["false_alarm"]
    # film 5's uncertain Atelectasis now counts: 4 of the 5 No-Finding films, Atelectasis 1/5
    assert fa["n_any"] == 4 and fa["any"] == pytest.approx(4 / 5) and fa["rate"][ATEL] == pytest.approx(1 / 5)
    got = _by_finding(s["findings"])
    # Consolidation: the reference's -1 on film 9 is now positive and so is the hypothesis -> TP 1
    cons = got[CONS]
    assert (cons["support"], cons["predicted"], cons["precision"], cons["recall"]) == (1, 1, 1.0, 1.0)
    # Atelectasis: reference film 7, hypothesis film 5 -> TP 0, FP 1, FN 1
    assert (got[ATEL]["precision"], got[ATEL]["recall"]) == (0.0, 0.0)
    assert s["positive"] == "label == 1 or label == -1"


def test_ties_and_no_finding_free_sets():
    # two No-Finding films, one naming Edema, the other Fracture: a tie at 1/2, the first in CHEXPERT_14 order
    fa = false_alarms(_m({NF: 1}, {NF: 1}), _m({EDEMA: 1}, {"Fracture": 1}))
    assert fa["any"] == 1.0 and fa["max"] == 0.5
    assert fa["max_finding"] == EDEMA and fa["max_findings"] == [EDEMA, "Fracture"]
    # nothing named on the normal film: max 0, no name
    fa = false_alarms(_m({NF: 1}), _m({NF: 1, SD: 1}))
    assert (fa["n_any"], fa["any"], fa["max"], fa["max_finding"], fa["max_findings"]) == (0, 0.0, 0.0, None, [])
    # no No-Finding reference film: every rate undefined
    fa = false_alarms(_m({CARD: 1}), _m({CARD: 1}))
    assert fa["n_no_finding"] == 0 and fa["any"] is None and fa["max"] is None and fa["rate"][CARD] is None


@pytest.mark.parametrize("variant", ["chexpert_f1", "chexpert_f1+"])
def test_from_stats_equals_from_labels(variant):
    """What the scorer computes from chexpert_f1's per-pair counts is what the label matrices give."""
    stats = chexpert_f1(REF, HYP, "hand").stats
    assert per_finding_from_stats(stats, variant) == per_finding_summary(REF, HYP, variant)
    # and on a subset of rows (e.g. one bootstrap resample)
    idx = np.array([0, 0, 3, 5, 8])
    assert per_finding_from_stats(stats[idx], variant) == per_finding_summary(REF[idx], HYP[idx], variant)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shape"):
        per_finding(REF[:, :13], HYP[:, :13])
    with pytest.raises(ValueError, match="same shape"):
        false_alarms(REF, HYP[:3])
    with pytest.raises(ValueError, match="variant"):
        per_finding(REF, HYP, variant="chexpert_f2")
    with pytest.raises(ValueError, match="stats"):
        per_finding_from_stats(np.zeros((3, 5)))
