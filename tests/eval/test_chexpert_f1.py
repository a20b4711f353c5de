"""CheXpert clinical F1: hand-computed cases, sklearn equivalence, bootstrap-subset consistency."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import classification_report, f1_score, precision_recall_fscore_support

from eval.chexpert.f1 import (
    VARIANTS,
    binarise,
    chexpert_f1,
    chexpert_f1_aggregate,
    per_observation_table,
    stat_columns,
)
from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14
from eval.metric import MetricOutput

NAN = float("nan")


def row(**labels: float) -> list[float]:
    """A 14-label row, NaN except the named observations (underscores stand for spaces)."""
    out = [NAN] * 14
    for key, value in labels.items():
        out[CHEXPERT_14.index(key.replace("_", " "))] = value
    return out


# Four pairs whose scores are worked out by hand in the tests below.
REF = [
    row(Cardiomegaly=1, Edema=-1, Pleural_Effusion=0),
    row(Cardiomegaly=1, Atelectasis=1),
    row(No_Finding=1),
    row(Edema=1, Pneumothorax=-1),
]
HYP = [
    row(Cardiomegaly=1, Edema=1, Pleural_Effusion=1),
    row(Cardiomegaly=0, Atelectasis=-1),
    row(No_Finding=1, Fracture=1),
    row(Edema=-1, Pneumothorax=-1),
]


def test_hand_computed_uncertain_as_negative():
    s = chexpert_f1(REF, HYP, "test").scores()
    # Positive = 1. Cardiomegaly TP1 FN1 (F1 2/3); No Finding TP1 (F1 1); Edema FP1 (h0) FN1 (r3);
    # Pleural Effusion FP1; Atelectasis FN1 (hyp -1 is negative); Fracture FP1; Pneumothorax is
    # -1 on both sides, so positive on neither: F1 0 by the zero-division convention.
    # Totals TP 2, FP 3, FN 3.
    assert s["chexpert_f1_14_micro"] == pytest.approx(4 / 10)
    assert s["chexpert_f1_14_macro"] == pytest.approx((2 / 3 + 1) / 14)
    # F1-5: Cardiomegaly TP1 FN1, Edema FP1 FN1, Pleural Effusion FP1, Atelectasis FN1.
    assert s["chexpert_f1_5_micro"] == pytest.approx(2 / 7)
    assert s["chexpert_f1_5_macro"] == pytest.approx((2 / 3) / 5)
    assert s["chexpert_f1/Cardiomegaly"] == pytest.approx(2 / 3)
    assert s["chexpert_precision/Cardiomegaly"] == 1.0
    assert s["chexpert_recall/Cardiomegaly"] == 0.5
    assert s["chexpert_f1/Edema"] == 0.0
    assert s["chexpert_f1/Pneumothorax"] == 0.0
    assert s["chexpert_precision/Pneumothorax"] == 0.0 and s["chexpert_recall/Pneumothorax"] == 0.0


def test_hand_computed_uncertain_as_positive():
    s = chexpert_f1(REF, HYP, "test").scores()
    # Positive = 1 or -1. Cardiomegaly TP1 FN1; Edema TP2; Atelectasis TP1; No Finding TP1;
    # Pneumothorax TP1; Pleural Effusion FP1; Fracture FP1. Totals TP 6, FP 2, FN 1.
    assert s["chexpert_f1+_14_micro"] == pytest.approx(12 / 15)
    assert s["chexpert_f1+_14_macro"] == pytest.approx((2 / 3 + 4) / 14)
    # F1-5: Cardiomegaly TP1 FN1, Edema TP2, Atelectasis TP1, Pleural Effusion FP1: TP4 FP1 FN1.
    assert s["chexpert_f1+_5_micro"] == pytest.approx(8 / 10)
    assert s["chexpert_f1+_5_macro"] == pytest.approx((2 / 3 + 1 + 1) / 5)
    assert s["chexpert_f1+/Pneumothorax"] == 1.0
    assert s["chexpert_precision+/Pleural Effusion"] == 0.0
    assert s["chexpert_recall+/Edema"] == 1.0


def test_output_shape_and_info():
    out = chexpert_f1(REF, HYP, "chexbert")
    assert isinstance(out, MetricOutput)
    assert out.stats.shape == (4, len(stat_columns())) == (4, 2 * 14 * 3)
    assert out.info["labeler"] == "chexbert" and out.info["variants"] == VARIANTS
    # Per-pair counts over the 14 observations (uncertain as negative): pair 0 has TP1 FP2 FN0.
    assert out.per_pair["chexpert_tp_14"].tolist() == [1, 0, 1, 0]
    assert out.per_pair["chexpert_fp_14"].tolist() == [2, 0, 1, 0]
    assert out.per_pair["chexpert_fn_14"].tolist() == [0, 2, 0, 1]
    assert out.per_pair["chexpert_tp+_14"].tolist() == [2, 1, 1, 2]
    keys = set(out.scores())
    for v in VARIANTS:
        assert {f"{v}_14_micro", f"{v}_14_macro", f"{v}_5_micro", f"{v}_5_macro"} <= keys
        assert {f"{v}/{o}" for o in CHEXPERT_14} <= keys


def test_per_observation_table():
    out = chexpert_f1(REF, HYP, "test")
    table = per_observation_table(out.stats)
    assert [r["observation"] for r in table] == list(CHEXPERT_14)
    card = table[CHEXPERT_14.index("Cardiomegaly")]
    assert card == {"observation": "Cardiomegaly", "support": 2, "predicted": 1, "tp": 1, "fp": 0, "fn": 1,
                    "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "in_chexpert_5": True}
    plus = {r["observation"]: r for r in per_observation_table(out.stats, "chexpert_f1+")}
    assert plus["Edema"]["tp"] == 2 and plus["Edema"]["f1"] == 1.0
    # The table and the score keys agree.
    s = out.scores()
    assert all(s[f"chexpert_f1/{r['observation']}"] == r["f1"] for r in table)
    with pytest.raises(ValueError, match="variant"):
        per_observation_table(out.stats, "f1")


def _random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.choice([1.0, 0.0, -1.0, NAN], size=(n, 14), p=[0.15, 0.2, 0.1, 0.55])
    x[:, CHEXPERT_14.index("Fracture")] = NAN  # an observation positive on neither side
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    ref, hyp = _random_labels(rng, 60), _random_labels(rng, 60)
    s = chexpert_f1(ref, hyp, "random").scores()
    idx5 = [CHEXPERT_14.index(o) for o in CHEXPERT_5]
    for prefix, plus in (("chexpert_f1", False), ("chexpert_f1+", True)):
        yt, yp = binarise(ref, plus).astype(int), binarise(hyp, plus).astype(int)
        for tag, cols in (("14", slice(None)), ("5", idx5)):
            for avg in ("micro", "macro"):
                want = f1_score(yt[:, cols], yp[:, cols], average=avg, zero_division=0)
                assert s[f"{prefix}_{tag}_{avg}"] == pytest.approx(want, abs=1e-12)
        p, r, f, _ = precision_recall_fscore_support(yt, yp, average=None, zero_division=0)
        sfx = "+" if plus else ""
        for j, obs in enumerate(CHEXPERT_14):
            assert s[f"{prefix}/{obs}"] == pytest.approx(f[j], abs=1e-12)
            assert s[f"chexpert_precision{sfx}/{obs}"] == pytest.approx(p[j], abs=1e-12)
            assert s[f"chexpert_recall{sfx}/{obs}"] == pytest.approx(r[j], abs=1e-12)
        assert s[f"{prefix}/Fracture"] == 0.0
        # classification_report with its default zero_division ("warn", scored as 0), as
        # f1chexbert calls it, gives the same macro average.
        with pytest.warns(Warning):
            rep = classification_report(yt, yp, output_dict=True)
        assert s[f"{prefix}_14_macro"] == pytest.approx(rep["macro avg"]["f1-score"], abs=1e-12)
        assert s[f"{prefix}_14_micro"] == pytest.approx(rep["micro avg"]["f1-score"], abs=1e-12)


def test_aggregate_on_subset_equals_recomputation():
    rng = np.random.default_rng(5)
    ref, hyp = _random_labels(rng, 40), _random_labels(rng, 40)
    out = chexpert_f1(ref, hyp, "random")
    for _ in range(5):
        idx = rng.integers(0, 40, 40)  # a bootstrap resample, with repeats
        assert out.aggregate(out.stats[idx]) == pytest.approx(chexpert_f1(ref[idx], hyp[idx], "random").scores())
    sub = np.arange(7)
    assert chexpert_f1_aggregate(out.stats[sub]) == pytest.approx(chexpert_f1(ref[sub], hyp[sub], "r").scores())


def test_empty_input_gives_nan():
    empty = np.zeros((0, 14))
    out = chexpert_f1(empty, empty, "test")
    assert out.stats.shape == (0, 84)
    assert all(np.isnan(v) for v in out.scores().values())


def test_accepts_lists_with_none():
    ref = [[None] * 13 + [1], [1] + [None] * 13]
    hyp = [[None] * 13 + [1], [0] + [None] * 13]
    s = chexpert_f1(ref, hyp, "test").scores()
    assert s["chexpert_f1/Support Devices"] == 1.0 and s["chexpert_f1/No Finding"] == 0.0
    assert s["chexpert_f1_14_micro"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("ref, hyp, match", [
    (np.zeros((2, 13)), np.zeros((2, 13)), r"ref_labels: expected shape \(N, 14\)"),
    (np.full((2, 14), 2.0), np.zeros((2, 14)), r"ref_labels: labels must be 1, 0, -1 or NaN; row 0, column 0"),
    (np.zeros((2, 14)), [["x"] * 14] * 2, "hyp_labels: cannot read"),
    (np.zeros((2, 14)), np.zeros((3, 14)), "same shape"),
])
def test_bad_input_is_named(ref, hyp, match):
    with pytest.raises(ValueError, match=match):
        chexpert_f1(ref, hyp, "test")


def test_labeler_name_required():
    with pytest.raises(ValueError, match="labeler_name"):
        chexpert_f1(REF, HYP, "")
