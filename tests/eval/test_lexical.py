"""Lexical metrics: equality with direct pycocoevalcap calls, bootstrap aggregates, no-Java path.

Java is slow to start (PTB ~0.5 s, METEOR ~6-8 s), so the module-scoped fixtures run each JVM
once and many tests read their results.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from eval import lexical
from eval.lexical import (
    BLEU_COLUMNS,
    FALLBACK_TOKENIZER,
    METEOR_COLUMNS,
    bleu_aggregate,
    lexical_metrics,
    meteor_aggregate,
    ptb_tokenize,
    python_tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")

# ------------------------------------------------------------------ synthetic report-like text
_FINDINGS = [
    ["The heart is normal in size.", "Heart size is within normal limits.", "Normal cardiac silhouette.",
     "The heart is mildly enlarged.", "Moderate cardiomegaly, unchanged.", "Cardiomediastinal silhouette is stable."],
    ["The lungs are clear.", "No focal consolidation.", "Lungs are clear bilaterally.",
     "Patchy right lower lobe opacity, likely atelectasis.", "Left basilar airspace disease concerning for pneumonia.",
     "Streaky bibasilar opacities, likely scarring."],
    ["No pleural effusion or pneumothorax.", "There is no pneumothorax.", "Small left pleural effusion.",
     "Trace bilateral pleural effusions.", "No large effusion is seen.", "Blunting of the right costophrenic angle."],
    ["No acute osseous abnormality.", "Degenerative changes of the thoracic spine.", "Osseous structures are intact.",
     "Old healed right rib fractures.", "Mild dextroscoliosis of the thoracic spine."],
    ["A {n} mm nodule projects over the {side} upper lobe.", "Calcified granuloma in the {side} mid lung.",
     "Right IJ catheter tip in the SVC.", "Sternotomy wires and mediastinal clips are noted.",
     "Pulmonary vascularity is within normal limits.", "Hyperexpanded lungs consistent with COPD."],
]
_IMPRESSIONS = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                "Cardiomegaly without acute disease.", "Findings concerning for early pneumonia.",
                "Stable chest, no interval change.", "Low lung volumes; otherwise no acute findings."]


def _sentence(rng: np.random.Generator, group: int) -> str:
    s = _FINDINGS[group][rng.integers(len(_FINDINGS[group]))]
    return s.format(n=int(rng.integers(3, 15)), side=("right", "left")[rng.integers(2)])


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` (reference, hypothesis) report pairs: the hypothesis keeps, swaps, drops, reorders
    or adds sentences of the reference, the way a generator's output differs from the truth."""
    rng = np.random.default_rng(seed)
    refs, hyps = [], []
    for _ in range(n):
        groups = sorted(rng.choice(len(_FINDINGS), size=int(rng.integers(2, 6)), replace=False))
        ref = [_sentence(rng, g) for g in groups]
        hyp = []
        for g, s in zip(groups, ref):
            u = rng.random()
            if u < 0.45:
                hyp.append(s)
            elif u < 0.8:
                hyp.append(_sentence(rng, g))
            elif u < 0.9:
                hyp.append(s.lower().rstrip("."))
        if rng.random() < 0.3:
            hyp.append(_sentence(rng, int(rng.integers(len(_FINDINGS)))))
        if rng.random() < 0.2:
            rng.shuffle(hyp)
        imp = _IMPRESSIONS[rng.integers(len(_IMPRESSIONS))]
        refs.append(" ".join(ref) + " IMPRESSION: " + imp)
        hyps.append(" ".join(hyp) + (" Impression: " + _IMPRESSIONS[rng.integers(len(_IMPRESSIONS))]
                                     if rng.random() < 0.7 else ""))
    return refs, hyps


# 20 hand-picked pairs covering the edge cases, then synthetic ones: identical, disjoint,
# repeated n-grams (clipping), numbers and hyphens, XXXX masks, much shorter / longer
# hypotheses (brevity penalty), clitics, one empty and one punctuation-only hypothesis.
_EDGE = [
    ("The heart is normal in size. The lungs are clear.", "The heart is normal in size. The lungs are clear."),
    ("No pneumothorax.", "Large right pleural effusion with compressive atelectasis."),
    ("Clear lungs.", "clear clear clear lungs lungs lungs."),
    ("A 3.5-cm right upper lobe mass, XXXX.", "3.5 cm mass in the right upper lobe (XXXX)."),
    ("Heart size is normal. There is no focal airspace disease, effusion or pneumothorax. Bones are intact.",
     "Normal heart."),
    ("Normal chest.",
     "Normal chest. Heart size normal, lungs clear, no effusion, no pneumothorax, no acute bony finding."),
    ("There's no change; it doesn't look acute.", "There is no change and it does not look acute."),
    ("Lungs are clear.", ""),
    ("Stable cardiomegaly.", "..."),
]


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str]]:
    refs, hyps = synthetic_pairs(11, seed=3)
    return [r for r, _ in _EDGE] + refs, [h for _, h in _EDGE] + hyps


def _d(texts):
    return {i: [t] for i, t in enumerate(texts)}


@pytest.fixture(scope="module")
def ours(pairs):
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    return lexical_metrics(*pairs)


@pytest.fixture(scope="module")
def direct(pairs):
    """Everything computed the way pycocoevalcap's own COCOEvalCap does it."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, hyps = pairs
    n = len(refs)
    # The same pycocoevalcap Meteor() object lexical_metrics drives (one JVM for both: each
    # start costs 6-8 s; the jar keeps no state between lines). Its JVM loads while PTB runs.
    meteor = lexical.meteor_scorer()
    assert isinstance(meteor, Meteor)
    tok = PTBTokenizer().tokenize({**{i: [{"caption": r}] for i, r in enumerate(refs)},
                                   **{n + i: [{"caption": h}] for i, h in enumerate(hyps)}})
    gts = {i: tok[i] for i in range(n)}
    res = {i: tok[n + i] for i in range(n)}
    out = {"gts": gts, "res": res, "meteor_scorer": meteor}
    out["bleu"] = Bleu(4).compute_score(gts, res, verbose=0)
    out["rouge"] = Rouge().compute_score(gts, res)
    out["cider"] = Cider().compute_score(gts, res)
    out["meteor"] = meteor.compute_score(gts, res)
    return out


# ------------------------------------------------------------------------ Must-show: equality
@needs_java
def test_tokenisation_matches_pycocoevalcap(pairs, direct):
    refs, hyps = pairs
    n = len(refs)
    # PTB ends lines at \r, U+2028, form feed ...; unhandled, every later text would shift.
    breaks = ["Lungs\rclear.", "Heart\u2028normal", "No\x0ceffusion.", "Last one."]
    toks = ptb_tokenize(refs + hyps + breaks)
    assert toks[:n] == [direct["gts"][i][0] for i in range(n)]
    assert toks[n:2 * n] == [direct["res"][i][0] for i in range(n)]
    assert toks[2 * n:] == ["lungs clear", "heart normal", "no effusion", "last one"]


@needs_java
def test_corpus_scores_equal_direct_pycocoevalcap(ours, direct):
    got = ours.scores()
    bleu, _ = direct["bleu"]
    for k in range(4):
        assert got[f"bleu_{k + 1}"] == bleu[k]  # exact
    assert got["rouge_l"] == float(direct["rouge"][0])
    assert got["cider_d"] == float(direct["cider"][0])
    assert got["meteor"] == pytest.approx(direct["meteor"][0], abs=1e-12)
    assert ours.outputs["meteor"].info["java_corpus_score"] == direct["meteor"][0]
    assert ours.omitted == {}
    assert set(got) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"}
    # The values are real scores of this data, not degenerate ones.
    assert 0.2 < got["bleu_1"] < 0.95 and 0 < got["bleu_4"] < got["bleu_1"]
    assert 0.1 < got["meteor"] < 0.9 and 0.1 < got["rouge_l"] < 0.95 and got["cider_d"] > 0.3


@needs_java
def test_per_pair_scores_equal_direct(ours, direct):
    _, bleu_pp = direct["bleu"]
    for k in range(4):
        np.testing.assert_allclose(ours.outputs["bleu"].per_pair[f"bleu_{k + 1}"], bleu_pp[k], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.outputs["rouge_l"].per_pair["rouge_l"], direct["rouge"][1])
    np.testing.assert_array_equal(ours.outputs["cider"].per_pair["cider_d"], direct["cider"][1])
    np.testing.assert_array_equal(ours.outputs["meteor"].per_pair["meteor"], direct["meteor"][1])
    # Python re-computation of each segment from its statistics agrees with the jar.
    met = ours.outputs["meteor"]
    recomputed = [meteor_aggregate(met.stats[i:i + 1])["meteor"] for i in range(len(met.stats))]
    np.testing.assert_allclose(recomputed, direct["meteor"][1], rtol=0, atol=1e-12)


@needs_java
def test_empty_hypotheses_scored_zero(pairs, ours):
    _, hyps = pairs
    empty = [i for i, h in enumerate(hyps) if not h.strip(" .")]
    assert len(empty) == 2  # "" and "..."
    for out in ours.outputs.values():
        assert len(out.stats) == len(hyps)
        for name, values in out.per_pair.items():
            assert np.all(values[empty] == 0.0), name
    bleu = ours.outputs["bleu"].stats
    assert np.all(bleu[empty][:, BLEU_COLUMNS.index("hyp_len")] == 0)


# ---------------------------------------------------------------------- bootstrap aggregates
@needs_java
def test_stats_shapes_and_info(ours, pairs):
    n = len(pairs[0])
    assert ours.outputs["bleu"].stats.shape == (n, len(BLEU_COLUMNS))
    assert ours.outputs["meteor"].stats.shape == (n, len(METEOR_COLUMNS)) == (n, 23)
    assert ours.outputs["rouge_l"].stats.shape == ours.outputs["cider"].stats.shape == (n, 1)
    assert "CIDEr-D" in ours.outputs["cider"].info["implementation"]
    assert "fixed" in ours.outputs["cider"].info["aggregate"]
    for fam, out in ours.outputs.items():
        assert out.info["seconds"] >= 0 and "PTB" in out.info["tokenizer"], fam
    assert set(ours.info["seconds"]) >= {"tokenize", "bleu", "meteor", "rouge_l", "cider", "total"}


@needs_java
def test_bleu_aggregate_on_subsets_equals_pycocoevalcap(ours, direct):
    from pycocoevalcap.bleu.bleu import Bleu

    stats = ours.outputs["bleu"].stats
    full = bleu_aggregate(stats)
    for k in range(4):
        assert abs(full[f"bleu_{k + 1}"] - direct["bleu"][0][k]) <= 1e-12
    rng = np.random.default_rng(0)
    for idx in (np.arange(5), rng.integers(0, len(stats), len(stats)), np.array([7, 8, 7])):
        want, _ = Bleu(4).compute_score({j: direct["gts"][i] for j, i in enumerate(idx)},
                                        {j: direct["res"][i] for j, i in enumerate(idx)}, verbose=0)
        got = bleu_aggregate(stats[idx])
        for k in range(4):
            assert abs(got[f"bleu_{k + 1}"] - want[k]) <= 1e-12, (idx, k)


@needs_java
def test_meteor_aggregate_on_subsets_equals_the_jar(ours, direct):
    stats = ours.outputs["meteor"].stats
    rng = np.random.default_rng(1)
    # Includes the perfect-match pair 0, whose chunk the jar leaves out of the corpus sum.
    for idx in (np.arange(6), rng.choice(len(stats), 12, replace=False), np.array([0, 0, 3])):
        want, _ = direct["meteor_scorer"].compute_score({j: direct["gts"][i] for j, i in enumerate(idx)},
                                                        {j: direct["res"][i] for j, i in enumerate(idx)})
        assert abs(meteor_aggregate(stats[idx])["meteor"] - want) <= 1e-12, idx
    # The corpus score is not the mean of segment scores.
    info = ours.outputs["meteor"].info
    assert info["mean_of_segment_scores"] != pytest.approx(info["java_corpus_score"], abs=1e-6)


@needs_java
def test_mean_families_resample_as_mean(ours):
    idx = np.array([1, 1, 4, 9, 15])
    for fam, name in (("rouge_l", "rouge_l"), ("cider", "cider_d")):
        out = ours.outputs[fam]
        assert out.aggregate(out.stats[idx])[name] == pytest.approx(out.per_pair[name][idx].mean(), abs=1e-15)


def test_bleu_aggregate_hand_computed():
    # hyp "a b c d" vs ref "a b c e f": matches 3/4, 2/3, 1/2, 0/1; BP exp(1 - 5/4).
    stats = np.array([[3, 2, 1, 0, 4, 3, 2, 1, 4, 5]], dtype=float)
    got = bleu_aggregate(stats)
    bp = np.exp(1 - 5 / 4)
    assert got["bleu_1"] == pytest.approx(0.75 * bp, rel=1e-8)
    assert got["bleu_2"] == pytest.approx((0.75 * 2 / 3) ** 0.5 * bp, rel=1e-8)
    assert got["bleu_4"] == pytest.approx(0.0, abs=1e-3)  # only the 1e-15 smoothing is left
    assert all(np.isnan(v) for v in bleu_aggregate(np.empty((0, 10))).values())


# --------------------------------------------------------------------------- input handling
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="pair up"):
        lexical_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        lexical_metrics(["ok", "  "], ["a", "b"])
    with pytest.raises(ValueError, match="unknown"):
        lexical_metrics(["a"], ["a"], metrics=["bleu", "spice"])
    with pytest.raises(TypeError, match=r"hyps\[1\]"):
        lexical_metrics(["a", "b"], ["a", None])
    with pytest.raises(TypeError, match="one string"):
        lexical_metrics("abc", "abd")


# ------------------------------------------------------------------------------ without Java
def test_python_tokenizer():
    assert python_tokenize("The 3.5-cm mass, right/left; XXXX. Don't (stable)! Patient's 50%, cannot") == \
        "the 3.5-cm mass right/left xxxx do n't -lrb- stable -rrb- patient 's 50 % can not"
    assert python_tokenize("...") == ""


def test_without_java_meteor_omitted_and_fallback_named(monkeypatch, pairs):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    refs, hyps = pairs
    res = lexical_metrics(refs, hyps)
    assert set(res.outputs) == {"bleu", "rouge_l", "cider"}
    scores = res.scores()
    assert set(scores) == {"bleu_1_pytok", "bleu_2_pytok", "bleu_3_pytok", "bleu_4_pytok",
                           "rouge_l_pytok", "cider_d_pytok"}
    assert "Java not found" in res.omitted["meteor"]
    assert set(res.omitted) == {"meteor", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    assert res.info["tokenizer"] == FALLBACK_TOKENIZER
    assert all(o.info["tokenizer"] == FALLBACK_TOKENIZER for o in res.outputs.values())
    # Same scorers, other tokens: BLEU equals pycocoevalcap on the Python-tokenised text.
    from pycocoevalcap.bleu.bleu import Bleu

    want, _ = Bleu(4).compute_score(_d([python_tokenize(r) for r in refs]),
                                    _d([python_tokenize(h) for h in hyps]), verbose=0)
    assert scores["bleu_4_pytok"] == want[3]
    assert lexical_metrics(refs, hyps, python_fallback=False).outputs == {}


# ------------------------------------------------------------------------------- larger input
@needs_java
def test_many_pairs_stream_through_one_jvm(ours):
    """300 synthetic pairs on the JVM warmed by ``ours``: more text than a pipe buffer holds
    (64 KiB), which would deadlock a write-all-then-read driver; timings go to the info dict."""
    refs, hyps = synthetic_pairs(300, seed=11)
    assert sum(map(len, refs + hyps)) > 65536
    t = time.perf_counter()
    res = lexical_metrics(refs, hyps)
    wall = time.perf_counter() - t
    secs = res.info["seconds"]
    print(f"\n{len(refs)} pairs (warm METEOR JVM): {wall:.2f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
    assert len(res.outputs["meteor"].stats) == len(refs)
    assert res.scores()["meteor"] == pytest.approx(res.outputs["meteor"].info["java_corpus_score"], abs=1e-12)
    assert secs["total"] <= wall
    met = res.outputs["meteor"].info
    print(f"METEOR corpus {met['java_corpus_score']:.4f} vs mean of segments {met['mean_of_segment_scores']:.4f}")


def test_chunked_cider_equals_pycocoevalcap_exactly():
    """CIDEr-D in chunks (bounded memory) with the corpus-wide IDF: the library's per-pair scores."""
    import random

    from pycocoevalcap.cider.cider import Cider

    from eval.lexical import _as_dict, cider_d_scores

    rng = random.Random(0)
    words = "the heart is normal in size lungs are clear no pleural effusion small left apical pneumothorax".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(0, 18))) for _ in range(700)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 18))) for _ in range(700)]
    direct = Cider().compute_score(_as_dict(refs), _as_dict(hyps))[1]
    assert np.array_equal(np.asarray(cider_d_scores(refs, hyps, chunk=128)), np.asarray(direct))
