"""``eval.score``: the one entry point for every report metric, its bootstrap CIs and paired comparison;
plus the RadCliQ-v1 building blocks in ``eval.radcliq``.

Java is used sparingly: the full default metric set (METEOR included, one warm JVM) runs once in a
module fixture; every other test picks metric subsets without METEOR.
"""

from __future__ import annotations

import math
import shutil
import threading

import numpy as np
import pytest

from eval.chexpert.observations import CHEXPERT_5, CHEXPERT_14
from eval.metric import MetricOutput, mean_aggregate
from eval.radcliq import RADCLIQ_V1, radcliq_v1, radgraph_combined, sentence_bleu_2
from eval.score import (
    DEFAULT_METRICS,
    METRICS,
    MetricUnavailable,
    ScoreOptions,
    bootstrap_indices,
    compare,
    register,
    score,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")

# Hand-written synthetic findings (not taken from any dataset): each reference combines three of
# them; the hypothesis keeps some, rewords or drops others, so every metric lands strictly
# between 0 and 1 and the resampled values spread out.
_FINDINGS = [
    "The heart size is normal.",
    "Mild cardiomegaly is present.",
    "There is a small right pleural effusion.",
    "No pleural effusion or pneumothorax.",
    "Left lower lobe consolidation concerning for pneumonia.",
    "The lungs are clear.",
    "Mild pulmonary edema is seen.",
    "There is a right apical pneumothorax.",
    "Bibasilar atelectasis is noted.",
    "A 1 cm nodule is seen in the right upper lobe.",
    "Degenerative changes of the thoracic spine.",
]
_REWORDED = {
    "The heart size is normal.": "Normal heart size.",
    "Mild cardiomegaly is present.": "The heart is enlarged.",
    "There is a small right pleural effusion.": "Small right effusion.",
    "The lungs are clear.": "No focal consolidation.",
    "Bibasilar atelectasis is noted.": "Atelectasis at both bases.",
}


def _pairs(n: int = 30) -> tuple[list[str], list[str]]:
    refs, hyps = [], []
    for i in range(n):
        sents = [_FINDINGS[(i + k * 4) % len(_FINDINGS)] for k in range(3)]
        refs.append(" ".join(sents))
        mode = i % 3
        if mode == 0:  # identical
            hyps.append(refs[-1])
        elif mode == 1:  # reworded where we can
            hyps.append(" ".join(_REWORDED.get(s, s) for s in sents))
        else:  # drops one finding, adds an unrelated one
            hyps.append(" ".join([sents[0], _FINDINGS[(i * 7 + 3) % len(_FINDINGS)]]))
    return refs, hyps


REFS, HYPS = _pairs()
JUNK = ["the quick brown fox jumps over the lazy dog"] * len(REFS)
NO_METEOR = ["bleu", "rouge_l", "cider", "chexpert", "radgraph_proxy"]


@pytest.fixture(scope="module")
def full() -> dict:
    """The full default metric set, once, on 30 pairs."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    return score(REFS, HYPS, n_resamples=200, seed=0)


# ------------------------------------------------------------------------------ the full default run
def test_default_run_keys_and_omissions(full):
    s = full["scores"]
    for k in ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d",
              "chexpert_f1_14_micro", "chexpert_f1_14_macro", "chexpert_f1_5_micro", "chexpert_f1_5_macro",
              "chexpert_f1+_14_micro", "radgraph_proxy_simple_f1", "radgraph_proxy_partial_f1",
              "radgraph_proxy_complete_f1"]:
        assert k in s and math.isfinite(s[k]), k
        assert k in full["ci"], k
    for obs in CHEXPERT_14:
        assert f"chexpert_f1/{obs}" in s
    assert full["n_pairs"] == len(REFS)
    # without weights the model-based metrics are omitted, with the reason naming what is missing
    assert set(full["omitted"]) == {"radgraph", "radcliq"}
    assert "radgraph-dir" in full["omitted"]["radgraph"] and "weights" in full["omitted"]["radgraph"]
    why = full["omitted"]["radcliq"]
    assert "RadGraph" in why and "CheXbert" in why and "BERTScore" in why
    assert not any(k.startswith("radgraph_") and not k.startswith("radgraph_proxy") for k in s)
    assert "radcliq_v1" not in s
    # every requested family has a timing; per-observation table has the 14 rows
    for fam in DEFAULT_METRICS:
        assert fam in full["seconds"]
    assert [r["observation"] for r in full["per_observation"]] == list(CHEXPERT_14)
    assert full["info"]["chexpert"]["labeler"] == "rules-v1"
    assert full["bootstrap"]["resamples"] == 200 and full["bootstrap"]["seed"] == 0
    # every score is strictly between the extremes on this mixed data (so the CI checks below bite)
    for k in ["bleu_4", "meteor", "rouge_l", "radgraph_proxy_simple_f1", "chexpert_f1_14_micro"]:
        assert 0 < s[k] < 1, (k, s[k])


def test_default_run_mean_metric_cis_contain_point(full):
    # Mean metrics: the CI is the spread of resampled means, so it lies within the per-pair range;
    # on this non-degenerate data with a fixed seed the 95% interval also covers the full-set mean.
    for k in ["rouge_l", "cider_d", "radgraph_proxy_simple_f1", "radgraph_proxy_partial_f1",
              "radgraph_proxy_complete_f1"]:
        lo, hi = full["ci"][k]
        per = np.asarray(full["per_pair"][k])
        assert per.min() <= lo < hi <= per.max(), k
        assert lo <= full["scores"][k] <= hi, k
        assert full["scores"][k] == pytest.approx(per.mean(), abs=1e-12)
    for k, (lo, hi) in full["ci"].items():
        assert not (lo > hi), k  # NaN-free intervals are ordered


def test_default_run_lexical_equals_direct_call(full):
    from eval.lexical import lexical_metrics

    direct = lexical_metrics(REFS, HYPS, ["bleu", "meteor", "rouge_l", "cider"]).scores()
    for k, v in direct.items():
        assert full["scores"][k] == v, k


# ------------------------------------------------------------------------------ exact values
@needs_java
def test_identical_reports_score_perfectly():
    refs = REFS[:6]
    r = score(refs, refs, metrics=["rouge_l", "chexpert", "radgraph_proxy"], n_resamples=50)
    s = r["scores"]
    assert s["rouge_l"] == pytest.approx(1.0, abs=1e-12)
    assert s["chexpert_f1_14_micro"] == 1.0 and s["chexpert_f1+_14_micro"] == 1.0
    assert s["radgraph_proxy_simple_f1"] == 1.0
    assert r["ci"]["rouge_l"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert r["ci"]["radgraph_proxy_simple_f1"] == [1.0, 1.0]
    # an observation positive in some reference: F1 1; one positive nowhere: F1 0 (sklearn convention)
    table = {row["observation"]: row for row in r["per_observation"]}
    assert table["Pleural Effusion"]["support"] > 0 and s["chexpert_f1/Pleural Effusion"] == 1.0
    assert table["Fracture"]["support"] == 0 and s["chexpert_f1/Fracture"] == 0.0


@needs_java
def test_scores_equal_the_underlying_functions():
    from eval.chexpert.f1 import chexpert_f1
    from eval.chexpert.labeler import RuleLabeler
    from eval.lexical import lexical_metrics
    from eval.radgraph.proxy import radgraph_proxy_reward

    r = score(REFS, HYPS, metrics=NO_METEOR, n_resamples=0)
    lex = lexical_metrics(REFS, HYPS, ["bleu", "rouge_l", "cider"]).scores()
    proxy = radgraph_proxy_reward(REFS, HYPS).scores()
    labels = RuleLabeler()(REFS + HYPS)
    chex = chexpert_f1(labels[:len(REFS)], labels[len(REFS):], "rules-v1").scores()
    expected = {**lex, **chex, **proxy}
    assert r["scores"] == expected  # exact: the wrapper adds, rounds and drops nothing
    assert r["ci"] == {}  # n_resamples=0: no CIs
    assert r["bootstrap"]["resamples"] == 0
    assert set(r["omitted"]) == set()


def test_bootstrap_ci_equals_hand_computed_quantiles():
    # radgraph_proxy needs no Java; its scores are means of per-pair values
    r = score(REFS, HYPS, metrics=["radgraph_proxy"], n_resamples=200, seed=7)
    idx = np.stack(list(bootstrap_indices(len(REFS), 200, 7)))
    assert idx.shape == (200, len(REFS)) and idx.min() >= 0 and idx.max() < len(REFS)
    for k in ["radgraph_proxy_simple_f1", "radgraph_proxy_complete_f1"]:
        per = np.asarray(r["per_pair"][k])
        means = np.array([per[row].mean() for row in idx])
        lo, hi = np.quantile(means, [0.025, 0.975])
        assert r["ci"][k] == pytest.approx([lo, hi], abs=1e-12)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_bootstrap_rows_come_in_bounded_blocks_and_equal_one_draw(n):
    """Drawn block by block (memory bounded), the rows are those of one (R, n) draw, and every
    pass over them repeats them."""
    from eval.score import BootstrapIndices

    one = np.random.default_rng(5).integers(0, n, size=(300, n))
    blocks = BootstrapIndices(n, 300, 5, block_elems=7 * n)  # 7 rows per block, a short last one
    assert len(blocks) == 300 and blocks.block == 7
    assert np.array_equal(np.stack(list(blocks)), one) and np.array_equal(np.stack(list(blocks)), one)


def test_bootstrap_ci_of_ratio_metric_is_aggregate_of_resampled_rows():
    from eval.chexpert.f1 import chexpert_f1, chexpert_f1_aggregate
    from eval.chexpert.labeler import RuleLabeler

    r = score(REFS, HYPS, metrics=["chexpert"], n_resamples=200, seed=3)
    labels = RuleLabeler()(REFS + HYPS)
    stats = chexpert_f1(labels[:len(REFS)], labels[len(REFS):], "x").stats
    vals = np.array([chexpert_f1_aggregate(stats[row])["chexpert_f1_14_micro"]
                     for row in bootstrap_indices(len(REFS), 200, 3)])
    assert r["ci"]["chexpert_f1_14_micro"] == pytest.approx(list(np.quantile(vals, [0.025, 0.975])), abs=1e-12)


def test_seed_controls_the_cis():
    kw = dict(metrics=["radgraph_proxy"], n_resamples=200)
    a = score(REFS, HYPS, seed=1, **kw)
    b = score(REFS, HYPS, seed=1, **kw)
    c = score(REFS, HYPS, seed=2, **kw)
    assert a["ci"] == b["ci"]
    assert a["ci"]["radgraph_proxy_simple_f1"] != c["ci"]["radgraph_proxy_simple_f1"]
    assert a["scores"] == c["scores"]  # the point estimate does not depend on the seed


def test_alpha_widens_the_interval():
    kw = dict(metrics=["radgraph_proxy"], n_resamples=200, seed=0)
    lo95, hi95 = score(REFS, HYPS, alpha=0.05, **kw)["ci"]["radgraph_proxy_simple_f1"]
    lo50, hi50 = score(REFS, HYPS, alpha=0.5, **kw)["ci"]["radgraph_proxy_simple_f1"]
    assert lo95 <= lo50 < hi50 <= hi95 and (hi95 - lo95) > (hi50 - lo50)


# ------------------------------------------------------------------------------ paired comparison
@needs_java
def test_compare_identical_systems_gives_zero_difference():
    c = compare(REFS, HYPS, list(HYPS), metrics=["rouge_l", "chexpert", "radgraph_proxy"], n_resamples=200)
    assert c["n_pairs"] == len(REFS) and c["bootstrap"]["resamples"] == 200
    for k, row in c["comparison"].items():
        assert row["a"] == row["b"] or (math.isnan(row["a"]) and math.isnan(row["b"])), k
        if math.isfinite(row["a"]):
            assert row["diff"] == 0.0 and row["ci"] == [0.0, 0.0], k
            assert row["p_two_sided"] == 1.0, k


@needs_java
def test_compare_good_against_junk():
    c = compare(REFS, REFS, JUNK, metrics=["rouge_l", "bleu", "chexpert", "radgraph_proxy"],
                n_resamples=200, seed=0)
    rows = c["comparison"]
    for k in ["rouge_l", "bleu_1", "chexpert_f1_14_micro", "radgraph_proxy_simple_f1"]:
        row = rows[k]
        assert row["diff"] == row["a"] - row["b"], k  # exactly, not approximately
        assert row["diff"] > 0 and row["ci"][0] > 0 and row["ci"][0] <= row["diff"] <= row["ci"][1], k
        assert row["p_two_sided"] < 0.01, k
    assert rows["rouge_l"]["a"] == pytest.approx(1.0, abs=1e-12)
    assert rows["chexpert_f1_14_micro"]["b"] == 0.0
    for row in rows.values():  # diff == a - b for every key, including per-observation ones
        if math.isfinite(row["a"]) and math.isfinite(row["b"]):
            assert row["diff"] == row["a"] - row["b"]


def test_compare_rejects_unequal_systems():
    with pytest.raises(ValueError, match="system A has 3 hypotheses, system B 2"):
        compare(REFS[:3], HYPS[:3], HYPS[:2], metrics=["radgraph_proxy"])


# ------------------------------------------------------------------------------ registry and errors
@pytest.fixture
def toy_metric():
    name = "toy_length_ratio"

    @register(name)
    def _toy(refs, hyps, opts, cache):
        ratio = np.array([len(h.split()) / len(r.split()) for r, h in zip(refs, hyps)])
        return MetricOutput(stats=ratio[:, None], aggregate=mean_aggregate([name]),
                            info={"metric": "toy"}, per_pair={name: ratio})

    yield name
    METRICS.pop(name, None)


def test_registered_metric_runs_through_score(toy_metric):
    refs = ["a b c d", "a b", "a b c d e"]
    hyps = ["a b", "a b c d", "a b c d e"]
    r = score(refs, hyps, metrics=[toy_metric], n_resamples=100, seed=0)
    assert r["scores"] == {toy_metric: pytest.approx((0.5 + 2.0 + 1.0) / 3)}
    assert r["per_pair"][toy_metric] == [0.5, 2.0, 1.0]
    assert r["info"][toy_metric] == {"metric": "toy"}
    lo, hi = r["ci"][toy_metric]
    assert 0.5 <= lo <= hi <= 2.0
    assert toy_metric in r["seconds"]


def test_registry_is_cleaned_up():
    assert "toy_length_ratio" not in METRICS
    assert set(DEFAULT_METRICS) <= set(METRICS)


def test_unavailable_metric_lands_in_omitted(toy_metric):
    @register("needs_weights_toy")
    def _nope(refs, hyps, opts, cache):
        raise MetricUnavailable("needs toy weights (--toy-weights)")

    try:
        r = score(["a"], ["a"], metrics=[toy_metric, "needs_weights_toy"], n_resamples=0)
    finally:
        METRICS.pop("needs_weights_toy", None)
    assert r["omitted"] == {"needs_weights_toy": "needs toy weights (--toy-weights)"}
    assert list(r["scores"]) == [toy_metric]


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="no_such_metric"):
        score(["a"], ["a"], metrics=["radgraph_proxy", "no_such_metric"])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        score(["a", "b"], ["a"], metrics=["radgraph_proxy"])
    with pytest.raises(ValueError, match="no report pairs"):
        score([], [], metrics=["radgraph_proxy"])
    with pytest.raises(ValueError, match=r"hyps\[1\]"):
        score(["a", "b"], ["a", None], metrics=["radgraph_proxy"])
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        compare(["a", "b"], ["a"], ["b"], metrics=["radgraph_proxy"])


def test_single_string_is_rejected():
    with pytest.raises((TypeError, ValueError)):
        score("no effusion", "no effusion", metrics=["radgraph_proxy"], n_resamples=0)


# ------------------------------------------------------------------------------ custom labeler
class FixedLabeler:
    """Returns a fixed (2N, 14) label matrix: references first, then hypotheses."""

    name = "fixed-test-labeler"
    info = {"source": "hand-made"}

    def __init__(self, ref: np.ndarray, hyp: np.ndarray):
        self.labels = np.vstack([ref, hyp])
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        assert len(texts) == len(self.labels)
        return self.labels


def _labels(rows: list[dict[str, float]]) -> np.ndarray:
    out = np.full((len(rows), 14), np.nan)
    for i, row in enumerate(rows):
        for obs, v in row.items():
            out[i, CHEXPERT_14.index(obs)] = v
    return out


def test_custom_labeler_drives_chexpert_f1():
    ref = _labels([{"Cardiomegaly": 1, "Edema": 1}, {"Pleural Effusion": 1}, {"Pneumothorax": -1}])
    hyp = _labels([{"Cardiomegaly": 1}, {"Pleural Effusion": 1, "Fracture": 1}, {"Pneumothorax": 1}])
    lab = FixedLabeler(ref, hyp)
    refs, hyps = ["r1", "r2", "r3"], ["h1", "h2", "h3"]
    r = score(refs, hyps, metrics=["chexpert"], options=ScoreOptions(labeler=lab, n_resamples=100))
    assert lab.calls == [refs + hyps]  # one call, references then hypotheses
    s = r["scores"]
    # uncertain = negative: TP Cardiomegaly, Effusion; FN Edema; FP Fracture, Pneumothorax
    assert s["chexpert_f1_14_micro"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # uncertain = positive: the Pneumothorax -1 reference now matches -> TP 3, FP 1, FN 1
    assert s["chexpert_f1+_14_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # CheXpert-5 (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion): TP 2, FN 1
    assert set(CHEXPERT_5) >= {"Cardiomegaly", "Edema", "Pleural Effusion"}
    assert s["chexpert_f1_5_micro"] == pytest.approx(4 / 5)
    assert s["chexpert_f1/Edema"] == 0.0 and s["chexpert_f1/Cardiomegaly"] == 1.0
    assert r["info"]["chexpert"]["labeler"] == "fixed-test-labeler"
    assert r["info"]["chexpert"]["labeler_info"] == {"source": "hand-made"}
    assert r["options"]["labeler"] == "fixed-test-labeler"


def test_labeler_is_not_deep_copied():
    class LockedLabeler(FixedLabeler):
        def __init__(self, ref, hyp):
            super().__init__(ref, hyp)
            self.lock = threading.Lock()  # e.g. a labeler that serialises access to a model

    ref = _labels([{"Edema": 1}])
    r = score(["r"], ["h"], metrics=["chexpert"], options=ScoreOptions(labeler=LockedLabeler(ref, ref),
                                                                         n_resamples=0))
    assert r["scores"]["chexpert_f1_14_micro"] == 1.0


@needs_java
def test_per_pair_keys_of_families_do_not_collide(monkeypatch):
    n = 4
    # RadCliQ needs model weights; stand in its output computed from fixed components
    monkeypatch.setitem(METRICS, "radcliq", lambda r, h, o, c: radcliq_v1([0.5] * n, [0.5] * n, [0.5] * n,
                                                                          [0.123] * n))
    res = score(REFS[:n], HYPS[:n], metrics=["bleu", "radcliq"], n_resamples=0)
    from eval.lexical import lexical_metrics

    direct = lexical_metrics(REFS[:n], HYPS[:n], ["bleu"]).outputs["bleu"].per_pair["bleu_2"]
    assert res["per_pair"]["bleu_2"] == pytest.approx(list(direct))


# ------------------------------------------------------------------------------ eval.radcliq
def test_radcliq_v1_formula_by_hand():
    comps = {  # two reports: a perfect one and a poor one
        "radgraph": [1.0, 0.1], "bertscore": [1.0, 0.2], "semb": [1.0, 0.3], "bleu_2": [1.0, 0.0]}
    out = radcliq_v1(comps["radgraph"], comps["bertscore"], comps["semb"], comps["bleu_2"])
    m, sc, w, b = RADCLIQ_V1["mean"], RADCLIQ_V1["scale"], RADCLIQ_V1["weights"], RADCLIQ_V1["intercept"]
    assert RADCLIQ_V1["columns"] == ("radgraph_combined", "bertscore", "semb", "bleu_2")
    expected = []
    for i in range(2):
        x = [comps["radgraph"][i], comps["bertscore"][i], comps["semb"][i], comps["bleu_2"][i]]
        expected.append(sum((x[j] - m[j]) / sc[j] * w[j] for j in range(4)) + b)
    assert list(out.per_pair["radcliq_v1"]) == pytest.approx(expected, rel=1e-12)
    assert out.scores() == {"radcliq_v1": pytest.approx((expected[0] + expected[1]) / 2, rel=1e-12)}
    assert out.stats.shape == (2, 1)
    # lower is better: the perfect report predicts fewer errors than the poor one
    assert expected[0] < expected[1] and out.info["lower_is_better"] is True
    # components are recorded per pair under their column names
    assert list(out.per_pair["radcliq_v1/semb"]) == [1.0, 0.3]
    # the fitted BLEU-2 weight is ~4e-12: BLEU-2 does not move the score
    moved = radcliq_v1([0.5], [0.5], [0.5], [0.0]).scores()["radcliq_v1"] - \
        radcliq_v1([0.5], [0.5], [0.5], [1.0]).scores()["radcliq_v1"]
    assert abs(moved) < 1e-10


def _ann(ents: dict) -> dict:
    return {"text": "", "entities": ents}


def test_radgraph_combined_by_hand():
    heart = {"tokens": "heart", "label": "Anatomy::definitely present", "relations": []}
    ref = _ann({"1": heart,
                "2": {"tokens": "enlarged", "label": "Observation::definitely present",
                      "relations": [["located_at", "1"]]}})
    hyp = _ann({"1": heart,
                "2": {"tokens": "enlarged", "label": "Observation::definitely present",
                      "relations": [["located_at", "1"]]},
                "3": {"tokens": "effusion", "label": "Observation::definitely absent", "relations": []}})
    # entities: ref 2, hyp 3, 2 shared -> P 2/3, R 1, F1 0.8; relations: 1 vs 1 identical -> F1 1
    assert radgraph_combined(ref, hyp) == pytest.approx((0.8 + 1.0) / 2)
    assert radgraph_combined(hyp, ref) == pytest.approx(0.9)  # symmetric
    # the relation's label must match too: 'suggestive_of' instead of 'located_at' -> relation F1 0
    hyp_rel = _ann({**hyp["entities"], "2": {**hyp["entities"]["2"], "relations": [["suggestive_of", "1"]]}})
    assert radgraph_combined(ref, hyp_rel) == pytest.approx(0.8 / 2)
    # the same entity text with another label is a different entity
    hyp_lab = _ann({"1": heart, "2": {**ref["entities"]["2"], "label": "Observation::uncertain"}})
    # entities 1 of 2 shared -> F1 0.5; relation source differs -> F1 0
    assert radgraph_combined(ref, hyp_lab) == pytest.approx(0.25)
    # bare entity dicts work like the package format; a relation target may be an int id
    bare = {"1": heart, "2": {**ref["entities"]["2"], "relations": [["located_at", 1]]}}
    assert radgraph_combined(ref, bare) == pytest.approx(1.0)
    # no relations on either side: relation F1 is 0 (as the reference compute_f1), entities 1
    no_rel = _ann({"1": heart})
    assert radgraph_combined(no_rel, no_rel) == pytest.approx(0.5)
    assert radgraph_combined(_ann({}), _ann({})) == 0.0


def test_sentence_bleu_2_by_hand():
    # 1-grams: 3 of 4 match; 2-grams: (the heart), (heart is) of 3 match; equal lengths: BP 1
    assert sentence_bleu_2("the heart is normal", "the heart is large") == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    # shorter hypothesis: precisions 1, BP = exp(1 - 4/2)
    assert sentence_bleu_2("the heart is normal", "The HEART") == pytest.approx(math.exp(-1))
    # longer hypothesis: no brevity penalty; 1-grams 4/5, 2-grams 3/4 (clipped counts)
    assert sentence_bleu_2("the heart is normal", "the heart is normal normal") == \
        pytest.approx(math.sqrt(4 / 5 * 3 / 4))
    assert sentence_bleu_2("heart normal", "normal heart") == 0.0  # no 2-gram matches
    assert sentence_bleu_2("heart normal", "") == 0.0 and sentence_bleu_2("", "heart") == 0.0
    assert sentence_bleu_2("the heart is normal", "the heart is normal") == pytest.approx(1.0)


def test_model_backed_metrics_wiring_with_stand_in_models(monkeypatch):
    """RadGraph-F1, CheXbert F1 and RadCliQ-v1 as score() wires them, with stand-in models (no weights here)."""
    import eval.radcliq as radcliq_mod
    import eval.radgraph.model as rg_model
    import eval.score as score_mod
    from eval.radcliq import radgraph_combined, sentence_bleu_2
    from eval.radgraph.reward import radgraph_reward

    refs = ["Left effusion.", "Heart is enlarged."]
    hyps = ["Left effusion.", "Clear lungs."]

    def ann(text: str) -> dict:  # one OBS-DP entity per word, each word located_at the next
        words = text.lower().rstrip(".").split()
        ents = {str(i): {"tokens": w, "label": "OBS-DP", "start_ix": i, "end_ix": i,
                         "relations": [["located_at", str(i + 1)]] if i + 1 < len(words) else []}
                for i, w in enumerate(words)}
        return {"text": text, "entities": ents}

    class FakeAnnotator:
        model_type, package_version = "radgraph", "stand-in"

        def __init__(self, **kw):
            pass

        def __call__(self, texts):
            return [ann(t) for t in texts]

    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # refs then hyps

    class FakeCheXbert:
        name = "chexbert"
        embed_calls = 0

        def label_and_embed(self, texts):
            return _labels([{"Pleural Effusion": 1}, {"Cardiomegaly": 1}, {"Pleural Effusion": 1}, {}]), emb

        def embed(self, texts):
            FakeCheXbert.embed_calls += 1
            return emb

    monkeypatch.setattr(rg_model, "RadGraphAnnotator", FakeAnnotator)
    monkeypatch.setattr(score_mod, "_chexbert", lambda opts, cache: cache.setdefault("chexbert", FakeCheXbert()))
    monkeypatch.setattr(radcliq_mod, "bertscore_f1", lambda r, h, model, device: np.array([0.9, 0.1]))
    res = score(refs, hyps, metrics=["chexpert", "radgraph", "radcliq"], n_resamples=0,
                chexbert="chexbert.pth", radgraph_dir="/models/radgraph", bertscore_model="/models/distilroberta")
    assert res["omitted"] == {}
    assert res["info"]["chexpert"]["labeler"] == "chexbert"
    assert res["scores"]["chexpert_f1_14_micro"] == pytest.approx(2 / 3)  # TP effusion; FN cardiomegaly
    want_rg = radgraph_reward([ann(t) for t in refs], [ann(t) for t in hyps]).scores()
    assert {k: res["scores"][k] for k in want_rg} == pytest.approx(want_rg)
    assert res["info"]["radgraph"]["model_type"] == "radgraph"
    semb = [1.0, 1 / np.sqrt(2)]
    want = radcliq_v1([radgraph_combined(ann(r), ann(h)) for r, h in zip(refs, hyps)], [0.9, 0.1], semb,
                      [sentence_bleu_2(r, h) for r, h in zip(refs, hyps)]).scores()["radcliq_v1"]
    assert res["scores"]["radcliq_v1"] == pytest.approx(want)
    assert FakeCheXbert.embed_calls == 0  # embeddings reused from the labelling pass
