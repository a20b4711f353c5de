"""RadGraph-F1 reward (hand-computed), the real-model path (without weights) and the rule-based proxy."""

from __future__ import annotations

import csv
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from eval.radgraph import (
    RadGraphAnnotator,
    RadGraphUnavailable,
    entity_set,
    extract_proxy_graph,
    radgraph_f1,
    radgraph_proxy_reward,
    radgraph_reward,
    set_f1,
)
from eval.radgraph.proxy import _extract_frozen

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def ent(tokens: str, label: str, *relations: tuple[str, str], ix: int = 0) -> dict:
    return {"tokens": tokens, "label": label, "start_ix": ix, "end_ix": ix, "relations": [list(r) for r in relations]}


# Reference: "Small left pleural effusion. No pneumothorax."
REF1 = {"entities": {
    "1": ent("small", "OBS-DP", ("modify", "4")),
    "2": ent("left", "ANAT-DP", ("modify", "3")),
    "3": ent("pleural", "ANAT-DP"),
    "4": ent("effusion", "OBS-DP", ("located_at", "3")),
    "5": ent("pneumothorax", "OBS-DA"),
}}
# Hypothesis: "Large left pleural effusion ... pneumothorax ... effusion" with different relations.
HYP1 = {"entities": {
    "1": ent("large", "OBS-DP", ("modify", "4")),
    "2": ent("left", "ANAT-DP"),
    "3": ent("pleural", "ANAT-DP"),
    "4": ent("effusion", "OBS-DP", ("located_at", "3"), ("located_at", "2")),
    "5": ent("pneumothorax", "OBS-DP"),
    "6": ent("effusion", "OBS-DP"),  # same (tokens, label) as 4: counts once in 'simple'
}}
# Pair 2 differs only in case: "Heart ... Enlarged" vs "heart ... mild enlarged".
REF2 = {"entities": {"1": ent("Heart", "ANAT-DP"), "2": ent("Enlarged", "OBS-DP", ("located_at", "1"))}}
HYP2 = {"entities": {
    "1": ent("heart", "ANAT-DP"),
    "2": ent("mild", "OBS-DP", ("modify", "3")),
    "3": ent("enlarged", "OBS-DP", ("located_at", "1")),
}}


# ---------------------------------------------------------------------------------------- reward
def test_set_f1():
    assert set_f1({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert set_f1({1}, {2}) == 0.0
    assert set_f1(set(), set()) == 0.0 and set_f1({1}, set()) == 0.0


def test_entity_set_shapes_follow_the_package():
    assert entity_set(HYP1, "simple") == {("large", "OBS-DP"), ("left", "ANAT-DP"), ("pleural", "ANAT-DP"),
                                          ("effusion", "OBS-DP"), ("pneumothorax", "OBS-DP")}
    # partial: a relation-less entity is a 2-tuple, one with relations gets a True flag.
    assert entity_set(HYP1, "partial") == {("large", "OBS-DP", True), ("left", "ANAT-DP"), ("pleural", "ANAT-DP"),
                                           ("effusion", "OBS-DP", True), ("effusion", "OBS-DP"),
                                           ("pneumothorax", "OBS-DP")}
    # complete: one 4-tuple per relation, the bare pair only for entities without relations.
    assert entity_set(HYP1, "complete") == {
        ("large", "OBS-DP", "modify", "effusion"), ("left", "ANAT-DP"), ("pleural", "ANAT-DP"),
        ("effusion", "OBS-DP", "located_at", "pleural"), ("effusion", "OBS-DP", "located_at", "left"),
        ("pneumothorax", "OBS-DP"), ("effusion", "OBS-DP")}


def test_reward_hand_computed():
    out = radgraph_reward([REF1, REF2], [HYP1, HYP2])
    # Pair 1, simple: ref 5 pairs, hyp 5 distinct pairs (duplicate effusion once); shared left, pleural,
    #   effusion = 3 -> P = R = 3/5 -> F1 = 0.6.
    # partial: hyp {large+T, left, pleural, effusion+T, effusion, pneumothorax} (6),
    #   ref {small+T, left+T, pleural, effusion+T, pneumothorax(DA)} (5); shared pleural, effusion+T = 2
    #   -> P = 2/6, R = 2/5 -> F1 = 2(1/3)(2/5) / (1/3 + 2/5) = (4/15)/(11/15) = 4/11.
    # complete: hyp {large-modify-effusion, left, pleural, effusion-loc-pleural, effusion-loc-left,
    #   pneumothorax, effusion} (7), ref {small-modify-effusion, left-modify-pleural, pleural,
    #   effusion-loc-pleural, pneumothorax(DA)} (5); shared pleural, effusion-loc-pleural = 2
    #   -> P = 2/7, R = 2/5 -> F1 = (8/35)/(24/35) = 1/3.
    # Pair 2 (lowercase): ref {heart, enlarged}, hyp {heart, mild, enlarged} at every level, shared 2
    #   -> P = 2/3, R = 1 -> F1 = 0.8.
    np.testing.assert_allclose(out.stats, [[0.6, 4 / 11, 1 / 3], [0.8, 0.8, 0.8]])
    assert out.scores() == pytest.approx({"radgraph_simple_f1": 0.7, "radgraph_partial_f1": (4 / 11 + 0.8) / 2,
                                          "radgraph_complete_f1": (1 / 3 + 0.8) / 2})
    assert out.aggregate(out.stats[[1, 1]]) == pytest.approx({k: 0.8 for k in out.scores()})
    assert out.info["lowercase"] is True and set(out.info["levels"]) == {"simple", "partial", "complete"}
    np.testing.assert_allclose(out.per_pair["radgraph_partial_f1"], [4 / 11, 0.8])


def test_lowercase_off_reproduces_package_case_rules():
    out = radgraph_reward([REF2], [HYP2], lowercase=False)
    # simple/partial compare as written: "Heart" != "heart", "Enlarged" != "enlarged" -> nothing shared.
    # complete: relation tuples are lower-cased by the package, so ("enlarged", loc, "heart") matches,
    #   the bare ("Heart") vs ("heart") does not: shared 1, P = 1/3, R = 1/2 -> F1 = (1/3)/(5/6) = 0.4.
    np.testing.assert_allclose(out.stats, [[0.0, 0.0, 0.4]])
    assert out.info["lowercase"] is False


def test_duplicates_count_once():
    a = {"entities": {"1": ent("effusion", "OBS-DP"), "2": ent("effusion", "OBS-DP"), "3": ent("lung", "ANAT-DP")}}
    b = {"entities": {"1": ent("effusion", "OBS-DP"), "2": ent("heart", "ANAT-DP")}}
    # sets {effusion, lung} vs {effusion, heart}: P = R = 1/2 -> 0.5 (a list-based count would give 2/3 vs 1/2).
    np.testing.assert_allclose(radgraph_reward([a], [b]).stats, [[0.5, 0.5, 0.5]])
    np.testing.assert_allclose(radgraph_reward([a], [a]).stats, [[1.0, 1.0, 1.0]])


def test_empty_reports_score_zero():
    empty = {"entities": {}}
    out = radgraph_reward([empty, empty, REF1], [empty, HYP1, empty])
    np.testing.assert_array_equal(out.stats, np.zeros((3, 3)))


def test_reward_input_errors():
    with pytest.raises(ValueError, match="2 reference and 1 hypothesis"):
        radgraph_reward([REF1, REF1], [HYP1])
    bad = {"entities": {"1": ent("effusion", "OBS-DP", ("located_at", "9"))}}
    with pytest.raises(ValueError, match=r"report 0: .*unknown entity id '9'"):
        radgraph_reward([REF1], [bad])
    with pytest.raises(ValueError, match="level must be one of"):
        entity_set(REF1, "full")
    assert radgraph_reward([REF1], [HYP1], prefix="x").scores().keys() == {"x_simple_f1", "x_partial_f1",
                                                                          "x_complete_f1"}


# ------------------------------------------------------------------------------------ real model
def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "radgraph", None)  # makes `import radgraph` raise ImportError
    monkeypatch.setitem(sys.modules, "radgraph.radgraph", None)
    with pytest.raises(RadGraphUnavailable, match="'radgraph' package, which is not installed"):
        RadGraphAnnotator("radgraph")(["No pneumothorax."])
    with pytest.raises(ValueError, match="model_type must be one of"):
        RadGraphAnnotator("radgraph-xxl")


def _fake_package(monkeypatch, cache_dir: Path, output: dict | None = None) -> list:
    """A stand-in `radgraph` package (no torch, no weights) that records what it was asked."""
    calls: list = []

    class FakeRadGraph:
        def __init__(self, model_type, model_cache_dir, **kw):
            calls.append(("init", model_type, model_cache_dir))

        def __call__(self, texts):
            calls.append(("call", list(texts)))
            return output

    pkg, sub = types.ModuleType("radgraph"), types.ModuleType("radgraph.radgraph")
    sub.CACHE_DIR, sub.version, sub.RadGraph = str(cache_dir), "0.1.18", FakeRadGraph
    pkg.radgraph = sub
    monkeypatch.setitem(sys.modules, "radgraph", pkg)
    monkeypatch.setitem(sys.modules, "radgraph.radgraph", sub)
    return calls


def test_missing_weights_message(monkeypatch, tmp_path):
    calls = _fake_package(monkeypatch, tmp_path)
    want = f"weights for model_type='radgraph-xl' not found at {tmp_path / 'radgraph-xl'}"
    with pytest.raises(RadGraphUnavailable, match=want.replace("(", r"\(")) as e:
        RadGraphAnnotator("radgraph-xl")(["No pneumothorax."])
    assert "config.json, weights.th, vocabulary" in str(e.value)
    assert calls == []  # the package was never asked to build (it would download)


def test_real_model_path_with_fake_package(monkeypatch, tmp_path):
    (tmp_path / "radgraph").mkdir()
    for f in ("config.json", "weights.th"):
        (tmp_path / "radgraph" / f).write_text("{}")
    (tmp_path / "radgraph" / "vocabulary").mkdir()
    # Package-format output for [hyp0, ref0] (the empty hyp1/ref1 pair is not sent to the model).
    output = {"0": {"text": "h", "entities": HYP2["entities"]}, "1": {"text": "r", "entities": REF2["entities"]}}
    calls = _fake_package(monkeypatch, tmp_path, output)
    out = radgraph_f1(["Heart Enlarged", ""], ["heart mild enlarged", "Normal."], model_type="radgraph")
    assert calls == [("init", "radgraph", str(tmp_path)), ("call", ["heart mild enlarged", "Heart Enlarged"])]
    np.testing.assert_allclose(out.stats, [[0.8, 0.8, 0.8], [0.0, 0.0, 0.0]])
    assert set(out.scores()) == {"radgraph_simple_f1", "radgraph_partial_f1", "radgraph_complete_f1"}
    assert out.info["model_type"] == "radgraph" and out.info["radgraph_version"] == "0.1.18"


# ----------------------------------------------------------------------------------------- proxy
def _view(text: str) -> dict:
    """tokens -> (label, sorted (relation, target tokens)) for readable assertions."""
    ents = extract_proxy_graph(text)["entities"]
    return {e["tokens"]: (e["label"], sorted((r[0], ents[r[1]]["tokens"]) for r in e["relations"]))
            for e in ents.values()}


def test_proxy_entities_and_relations():
    assert _view("Small left pleural effusion.") == {
        "Small": ("OBS-DP", [("modify", "effusion")]),
        "left": ("ANAT-DP", [("modify", "pleural")]),
        "pleural": ("ANAT-DP", []),
        "effusion": ("OBS-DP", [("located_at", "pleural")]),
    }
    assert _view("Patchy opacity in the right lower lobe may represent pneumonia.") == {
        "Patchy": ("OBS-DP", [("modify", "opacity")]),
        "opacity": ("OBS-DP", [("located_at", "lobe"), ("suggestive_of", "pneumonia")]),
        "right": ("ANAT-DP", [("modify", "lobe")]),
        "lower": ("ANAT-DP", [("modify", "lobe")]),
        "lobe": ("ANAT-DP", []),
        "pneumonia": ("OBS-U", []),
    }
    assert _view("The heart is mildly enlarged.") == {
        "heart": ("ANAT-DP", []), "mildly": ("OBS-DP", [("modify", "enlarged")]),
        "enlarged": ("OBS-DP", [("located_at", "heart")])}
    g = extract_proxy_graph("No pneumothorax.")
    assert g["text"] == "No pneumothorax." and g["entities"] == {
        "1": {"tokens": "pneumothorax", "label": "OBS-DA", "start_ix": 1, "end_ix": 1, "relations": []}}


@pytest.mark.parametrize("text, token, label", [
    ("No focal consolidation, pleural effusion, or pneumothorax.", "pneumothorax", "OBS-DA"),
    ("No focal consolidation, pleural effusion, or pneumothorax.", "focal", "OBS-DA"),
    ("Pneumothorax is not seen.", "Pneumothorax", "OBS-DA"),
    ("Atelectasis cannot be excluded.", "Atelectasis", "OBS-U"),
    ("Possible small effusion.", "effusion", "OBS-U"),
    ("Basilar opacity likely atelectasis, no pneumothorax.", "pneumothorax", "OBS-DA"),
    ("Basilar opacity likely atelectasis, no pneumothorax.", "atelectasis", "OBS-U"),
    ("There is no effusion but there is mild cardiomegaly.", "cardiomegaly", "OBS-DP"),
    ("No pneumothorax, and the lungs are clear.", "clear", "OBS-DP"),
])
def test_proxy_assertion_labels(text, token, label):
    assert _view(text)[token][0] == label


def test_proxy_negated_vs_affirmed():
    pos, neg = "There is a right pleural effusion.", "There is no right pleural effusion."
    assert _view(pos)["effusion"][0] == "OBS-DP" and _view(neg)["effusion"][0] == "OBS-DA"
    # Shared: right, pleural (anatomy) of 3 entities each -> simple F1 = 2/3.
    assert radgraph_proxy_reward([pos], [neg]).stats[0, 0] == pytest.approx(2 / 3)


def test_proxy_reward_identical_and_unrelated():
    texts = ["Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
             "Moderate cardiomegaly with mild pulmonary edema. Small bilateral pleural effusions."]
    same = radgraph_proxy_reward(texts, texts)
    np.testing.assert_array_equal(same.stats, np.ones((2, 3)))
    assert set(same.scores()) == {"radgraph_proxy_simple_f1", "radgraph_proxy_partial_f1",
                                  "radgraph_proxy_complete_f1"}
    assert "NOT RadGraph-F1" in same.info["metric"] and "rule-based" in same.info["annotator"]
    unrelated = radgraph_proxy_reward(texts, ["Degenerative changes of the thoracic spine.",
                                              "Left upper lobe nodule, suspicious for malignancy."])
    assert unrelated.stats.max() < 0.2
    assert radgraph_proxy_reward([""], [""]).stats.tolist() == [[0.0, 0.0, 0.0]]


def test_proxy_speed_1000_pairs():
    rng = random.Random(0)
    sentences = [
        "The {a} is {n}.", "No {o} or {o}.", "There is {m} {o} in the {s} {a}.", "{m} {o} is again seen.",
        "Possible {o} at the {s} base.", "The {a} appears {n} without {o}.", "{o} may represent {o}.",
        "Stable {m} {o}, no {o}.", "Degenerative changes of the thoracic spine.",
    ]
    fill = {"a": ["heart", "mediastinum", "lung", "hilum", "trachea"], "n": ["normal", "clear", "enlarged"],
            "o": ["effusion", "pneumothorax", "opacity", "edema", "atelectasis", "consolidation", "nodule"],
            "m": ["mild", "small", "patchy", "large", "minimal"], "s": ["left", "right", "bilateral"]}

    def report() -> str:
        words: list[str] = []
        while len(words) < 50:
            s = rng.choice(sentences)
            while "{" in s:
                i = s.index("{")
                s = s[:i] + rng.choice(fill[s[i + 1]]) + s[i + 3:]
            words += s.split()
        return " ".join(words)

    refs, hyps = [report() for _ in range(1000)], [report() for _ in range(1000)]
    _extract_frozen.cache_clear()
    t0 = time.perf_counter()
    out = radgraph_proxy_reward(refs, hyps)
    elapsed = time.perf_counter() - t0
    assert out.stats.shape == (1000, 3) and elapsed < 5.0, elapsed


def test_proxy_on_real_reports_pairs_beat_shuffled():
    path = SHARED / "reports" / "iu_xray_dev.csv"
    if not path.is_file():
        pytest.skip(f"real reports not found at {path}")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["findings"].strip() and r["impression"].strip()]
    findings, impressions = [r["findings"] for r in rows], [r["impression"] for r in rows]
    paired = radgraph_proxy_reward(findings, impressions).scores()
    shuffled = radgraph_proxy_reward(findings, list(np.random.default_rng(0).permutation(impressions))).scores()
    # A report's impression shares more graph with its own findings than with another report's.
    for k in paired:
        assert paired[k] > 2 * shuffled[k], (k, paired[k], shuffled[k])
