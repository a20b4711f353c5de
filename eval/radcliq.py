"""RadCliQ-v1 (Yu et al., "Evaluating progress in automatic chest X-ray radiology report generation",
Patterns 2023): a linear model fitted to radiologists' error counts over four per-report metrics.

Per report: ``x = [radgraph_combined, bertscore, semb, bleu_2]`` is standardised with the fitted
scaler and ``radcliq = (x - mean) / scale · w + b``; the corpus score is the mean. **Lower is
better** (it predicts the number of clinically significant errors, up to an affine map).

Components, as in the reference implementation (rajpurkarlab/CXR-Report-Metric):
* ``radgraph_combined``: mean of entity F1 and relation F1 over RadGraph-model annotations
  (entities as (tokens, label), relations as (source entity, target entity, relation));
* ``bertscore``: BERTScore F1 with distilroberta-base, layer 5, baseline-rescaled, no idf;
* ``semb``: cosine similarity of the CheXbert CLS embeddings of the two reports;
* ``bleu_2``: per-report BLEU-2 (its fitted weight is 4e-12, so it does not move the score).

All three model components need weights the user supplies (RadGraph, distilroberta-base,
CheXbert); without them RadCliQ-v1 is omitted, never approximated.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from eval.metric import MetricOutput, mean_aggregate
from eval.radgraph.reward import set_f1

__all__ = ["RADCLIQ_V1", "radcliq_v1", "radgraph_combined", "sentence_bleu_2", "bertscore_f1"]

# Fitted RadCliQ-v1 parameters (the published radcliq-v1.pkl / normalizer), feature order as COLUMNS.
RADCLIQ_V1 = {
    "columns": ("radgraph_combined", "bertscore", "semb", "bleu_2"),
    "mean": np.array([0.53792312, 0.61757256, 0.76479421, 0.44738335]),
    "scale": np.array([0.30282584, 0.22430938, 0.25394391, 0.29892717]),
    "weights": np.array([-3.77083683e-01, -3.70300100e-01, -2.52616218e-01, 4.31504841e-12]),
    "intercept": 2.46655256e-10,
}


def radcliq_v1(radgraph: Sequence[float], bertscore: Sequence[float], semb: Sequence[float],
               bleu_2: Sequence[float]) -> MetricOutput:
    """Per-report RadCliQ-v1 from its four per-report components; corpus score ``radcliq_v1`` = mean."""
    x = np.column_stack([np.asarray(v, dtype=np.float64) for v in (radgraph, bertscore, semb, bleu_2)])
    z = (x - RADCLIQ_V1["mean"]) / RADCLIQ_V1["scale"]
    per = z @ RADCLIQ_V1["weights"] + RADCLIQ_V1["intercept"]
    return MetricOutput(stats=per[:, None], aggregate=mean_aggregate(["radcliq_v1"]),
                        info={"metric": "RadCliQ-v1", "lower_is_better": True,
                              "components": list(RADCLIQ_V1["columns"])},
                        per_pair={"radcliq_v1": per,
                                  **{f"radcliq_v1/{c}": x[:, j] for j, c in enumerate(RADCLIQ_V1["columns"])}})


def _entities(ann: dict) -> dict:
    return ann.get("entities", ann)


def radgraph_combined(ref_ann: dict, hyp_ann: dict) -> float:
    """(entity F1 + relation F1) / 2 of two RadGraph annotations (RadCliQ's RadGraph component)."""
    def ents(a: dict) -> set:
        return {(e["tokens"], e["label"]) for e in _entities(a).values()}

    def rels(a: dict) -> set:
        es = _entities(a)
        out = set()
        for e in es.values():
            for rel, tgt in e.get("relations", []):
                t = es.get(str(tgt), es.get(tgt))
                if t is not None:
                    out.add(((e["tokens"], e["label"]), (t["tokens"], t["label"]), rel))
        return out

    def f1(a: set, b: set) -> float:  # 0 when either is empty, as RadGraph-F1
        return set_f1(a, b) if a and b else 0.0

    return (f1(ents(ref_ann), ents(hyp_ann)) + f1(rels(ref_ann), rels(hyp_ann))) / 2


def _bleu_tokens(text: str) -> list[str]:
    # the reference implementation's tokenisation: lower-case, full stops split off, split on " "
    return text.lower().replace(".", " .").split(" ")


def sentence_bleu_2(ref: str, hyp: str) -> float:
    """Per-report BLEU-2 (geometric mean of 1-/2-gram precision, brevity penalty) on RadCliQ's tokens."""
    r, h = _bleu_tokens(ref), _bleu_tokens(hyp)
    if not h or not r:
        return 0.0
    logs = []
    for n in (1, 2):
        hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        total = sum(hc.values())
        match = sum(min(c, rc[g]) for g, c in hc.items())
        if total == 0 or match == 0:
            return 0.0
        logs.append(math.log(match / total))
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(sum(logs) / 2)


def bertscore_f1(refs: Sequence[str], hyps: Sequence[str], model_dir: str | Path,
                 device: str | None = None) -> np.ndarray:
    """BERTScore F1 per pair with a local distilroberta-base folder (needs the ``bert_score`` package);
    ``device`` None or "auto": CUDA when available."""
    from encoder.inference import resolve_device

    try:
        import bert_score
    except ImportError as e:
        raise RuntimeError("RadCliQ-v1 needs BERTScore: pip install bert_score") from e
    baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "distilroberta-base.tsv"
    scorer = bert_score.BERTScorer(model_type=str(model_dir), num_layers=5, lang="en", idf=False,
                                   rescale_with_baseline=True, baseline_path=str(baseline),
                                   device=str(resolve_device(device)))
    _, _, f = scorer.score(list(hyps), list(refs))
    return f.numpy().astype(np.float64)
