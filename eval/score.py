"""One entry point for every report metric: ``score(refs, hyps, metrics=[...]) -> dict``.

Metrics are registered by family name (``@register("bleu")``); each returns a
:class:`~eval.metric.MetricOutput` or raises :class:`MetricUnavailable` with the reason, which
lands in ``result["omitted"]`` (e.g. RadGraph-F1 without the model weights). Every score gets a
percentile bootstrap CI over report pairs, computed as ``aggregate(stats[idx])`` with the *same*
resampled indices for every metric; :func:`compare` does the paired version for two systems.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from eval.metric import MetricOutput

__all__ = ["ScoreOptions", "MetricUnavailable", "METRICS", "DEFAULT_METRICS", "register", "score",
           "compare", "compute_outputs", "summarise", "bootstrap_indices"]


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (missing weights, package or Java); the message says why."""


@dataclass
class ScoreOptions:
    """What the metrics need beyond the texts. Paths are local: nothing is downloaded."""

    chexbert: str | None = None  # chexbert.pth: CheXbert labels instead of the rule labeler
    radgraph_dir: str | None = None  # folder holding the RadGraph model weights
    radgraph_model_type: str = "radgraph"  # radgraph | radgraph-xl
    radgraph_lowercase: bool = True
    bertscore_model: str | None = None  # local distilroberta-base folder (RadCliQ-v1)
    device: str = "auto"  # CheXbert, RadGraph and BERTScore models: auto (CUDA when available) | cpu | cuda[:N]
    n_resamples: int = 1000
    seed: int = 0
    alpha: float = 0.05
    labeler: Callable | None = None  # any texts -> (N, 14) labeler object (overrides chexbert)

    def record(self) -> dict:
        """JSON-able options; the labeler object is recorded by name, never copied."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "labeler"}
        d["labeler"] = getattr(self.labeler, "name", type(self.labeler).__name__) if self.labeler else None
        return d


MetricFn = Callable[[list[str], list[str], ScoreOptions, dict], MetricOutput]
METRICS: dict[str, MetricFn] = {}
DEFAULT_METRICS = ("bleu", "meteor", "rouge_l", "cider", "chexpert", "radgraph", "radgraph_proxy", "radcliq")
LEXICAL = ("bleu", "meteor", "rouge_l", "cider")


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Add a metric family: ``fn(refs, hyps, options, cache) -> MetricOutput``."""
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------------ families
def _lexical(refs: list[str], hyps: list[str], opts: ScoreOptions, cache: dict, family: str) -> MetricOutput:
    if "lexical" not in cache:  # all requested lexical families in one call: Java starts once
        from eval.lexical import lexical_metrics

        cache["lexical"] = lexical_metrics(refs, hyps, cache["requested_lexical"])
    res = cache["lexical"]
    if family not in res.outputs:
        raise MetricUnavailable(res.omitted.get(family) or "; ".join(sorted(set(res.omitted.values()))))
    return res.outputs[family]


for _fam in LEXICAL:
    register(_fam)(lambda r, h, o, c, _f=_fam: _lexical(r, h, o, c, _f))


def _chexbert(opts: ScoreOptions, cache: dict):
    if "chexbert" not in cache:
        if not opts.chexbert:
            raise MetricUnavailable("needs the CheXbert checkpoint (chexbert.pth; --chexbert PATH)")
        from eval.chexpert.chexbert import CheXbertLabeler

        cache["chexbert"] = CheXbertLabeler(opts.chexbert, device=opts.device)
    return cache["chexbert"]


@register("chexpert")
def _chexpert(refs, hyps, opts: ScoreOptions, cache: dict) -> MetricOutput:
    from eval.chexpert.f1 import chexpert_f1

    texts = list(refs) + list(hyps)
    if opts.labeler is not None:
        labeler = opts.labeler
        labels = labeler(texts)
    elif opts.chexbert:
        labeler = _chexbert(opts, cache)
        labels, cache["chexbert_emb"] = labeler.label_and_embed(texts)  # RadCliQ reuses the embeddings
    else:
        from eval.chexpert.labeler import RuleLabeler

        labeler = RuleLabeler()
        labels = labeler(texts)
    labels = np.asarray(labels, dtype=np.float64)
    out = chexpert_f1(labels[:len(refs)], labels[len(refs):], labeler.name)
    out.info["labeler_info"] = getattr(labeler, "info", {})
    return out


def _radgraph_annotations(refs, hyps, opts: ScoreOptions, cache: dict):
    if "radgraph_ann" not in cache:
        if not opts.radgraph_dir:
            raise MetricUnavailable("needs the radgraph package and its model weights (--radgraph-dir DIR); "
                                    "the offline rule-based proxy is reported as radgraph_proxy_*")
        from eval.radgraph.model import RadGraphAnnotator, RadGraphUnavailable

        try:
            ann = RadGraphAnnotator(model_type=opts.radgraph_model_type, model_cache_dir=opts.radgraph_dir,
                                    device=opts.device)
            cache["radgraph_annotator"] = ann
            both = ann(list(refs) + list(hyps))
        except RadGraphUnavailable as e:
            raise MetricUnavailable(str(e)) from e
        cache["radgraph_ann"] = (both[:len(refs)], both[len(refs):])
    return cache["radgraph_ann"]


@register("radgraph")
def _radgraph(refs, hyps, opts: ScoreOptions, cache: dict) -> MetricOutput:
    from eval.radgraph.reward import radgraph_reward

    ref_ann, hyp_ann = _radgraph_annotations(refs, hyps, opts, cache)
    ann = cache["radgraph_annotator"]
    return radgraph_reward(ref_ann, hyp_ann, lowercase=opts.radgraph_lowercase, prefix="radgraph",
                           info={"annotator": "radgraph package model", "model_type": ann.model_type,
                                 "radgraph_version": ann.package_version})


@register("radgraph_proxy")
def _radgraph_proxy(refs, hyps, opts: ScoreOptions, cache: dict) -> MetricOutput:
    from eval.radgraph.proxy import radgraph_proxy_reward

    return radgraph_proxy_reward(refs, hyps, lowercase=opts.radgraph_lowercase)


@register("radcliq")
def _radcliq(refs, hyps, opts: ScoreOptions, cache: dict) -> MetricOutput:
    from eval.radcliq import bertscore_f1, radcliq_v1, radgraph_combined, sentence_bleu_2

    missing = [what for what, ok in (("RadGraph model weights (--radgraph-dir)", opts.radgraph_dir),
                                     ("CheXbert checkpoint (--chexbert)", opts.chexbert),
                                     ("distilroberta-base folder for BERTScore (--bertscore-model)",
                                      opts.bertscore_model)) if not ok]
    if missing:
        raise MetricUnavailable("RadCliQ-v1 needs " + ", ".join(missing))
    ref_ann, hyp_ann = _radgraph_annotations(refs, hyps, opts, cache)
    rg = [radgraph_combined(a, b) for a, b in zip(ref_ann, hyp_ann)]
    emb = cache["chexbert_emb"] if "chexbert_emb" in cache else _chexbert(opts, cache).embed(list(refs) + list(hyps))
    a, b = emb[:len(refs)], emb[len(refs):]
    semb = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    bs = bertscore_f1(refs, hyps, opts.bertscore_model, device=opts.device)
    bleu = [sentence_bleu_2(r, h) for r, h in zip(refs, hyps)]
    return radcliq_v1(rg, bs, semb, bleu)


# ------------------------------------------------------------------------------------ scoring
def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(refs, str) or isinstance(hyps, str):  # would otherwise score one "report" per character
        raise TypeError("refs and hyps must be sequences of reports, not a single string (wrap it in a list)")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references and {len(hyps)} hypotheses; they must pair up")
    if not refs:
        raise ValueError("no report pairs to score")
    for name, texts in (("refs", refs), ("hyps", hyps)):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{name}{bad[:5]} are not strings (use '' for an empty report)")
    return list(refs), list(hyps)


def compute_outputs(refs: Sequence[str], hyps: Sequence[str], metrics: Sequence[str] | None = None,
                    options: ScoreOptions | None = None) -> tuple[dict[str, MetricOutput], dict[str, str], dict[str, float]]:
    """Run the metric families: ``(outputs, omitted {family: reason}, seconds {family: s})``."""
    refs, hyps = _check_pairs(refs, hyps)
    opts = options or ScoreOptions()
    metrics = list(dict.fromkeys(metrics or DEFAULT_METRICS))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(METRICS)}")
    cache: dict = {"requested_lexical": [m for m in metrics if m in LEXICAL]}
    outputs: dict[str, MetricOutput] = {}
    omitted: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for m in metrics:
        t = time.perf_counter()
        try:
            outputs[m] = METRICS[m](refs, hyps, opts, cache)
        except MetricUnavailable as e:
            omitted[m] = str(e)
        seconds[m] = time.perf_counter() - t
    if "lexical" in cache:  # one call ran every lexical family: use its own per-family timings
        lex = cache["lexical"].info["seconds"]
        for fam in cache["requested_lexical"]:
            seconds[fam] = lex.get(fam, 0.0)
        seconds["lexical_tokenize"] = lex.get("tokenize", 0.0)
        omitted.update({k: v for k, v in cache["lexical"].omitted.items() if k not in outputs})
    return outputs, omitted, seconds


class BootstrapIndices:
    """R resamples of n report-pair indices, shared by every metric (and both systems in
    :func:`compare`); iterating yields one (n,) row at a time.

    The rows are drawn in blocks of at most ``block_elems`` numbers from one generator, so memory
    stays bounded (an (R, n) matrix is 800 MB at R = 1,000, n = 100,000) and each iteration
    repeats the same rows. numpy's Generator gives the same rows block by block as in one
    (R, n) call (tested)."""

    def __init__(self, n: int, n_resamples: int, seed: int, block_elems: int = 1 << 22):
        self.n, self.n_resamples, self.seed = int(n), int(n_resamples), seed
        self.block = max(1, block_elems // max(1, self.n))

    def __len__(self) -> int:
        return self.n_resamples

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.n_resamples, self.block):
            yield from rng.integers(0, self.n, size=(min(self.block, self.n_resamples - start), self.n))


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> BootstrapIndices:
    """The resamples of :func:`summarise` and :func:`compare` (see :class:`BootstrapIndices`)."""
    return BootstrapIndices(n, n_resamples, seed)


def _resampled(out: MetricOutput, idx: np.ndarray) -> dict[str, np.ndarray]:
    rows = [out.aggregate(out.stats[i]) for i in idx]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]} if rows else {}


def _interval(values: np.ndarray, alpha: float) -> list[float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def _options(options: ScoreOptions | None, option_kw: dict) -> ScoreOptions:
    if options is not None and option_kw:
        raise TypeError(f"pass options=ScoreOptions(...) or keyword options {sorted(option_kw)}, not both")
    return options or ScoreOptions(**option_kw)


def score(refs: Sequence[str], hyps: Sequence[str], metrics: Sequence[str] | None = None,
          options: ScoreOptions | None = None, **option_kw) -> dict:
    """Score hypotheses against references (one reference per hypothesis, same order).

    Returns ``{"n_pairs", "scores": {name: value}, "ci": {name: [low, high]}, "info": {family: ...},
    "omitted": {family: reason}, "seconds": {family: s}, "bootstrap": {...}, "per_pair": {...},
    "options": {...}}``, plus ``"per_observation"`` (P/R/F1 of the 14 observations) and
    ``"per_finding"`` (:mod:`eval.chexpert.per_finding`) when CheXpert F1 is scored. ``metrics``
    defaults to :data:`DEFAULT_METRICS`; keyword arguments set :class:`ScoreOptions` fields (e.g.
    ``n_resamples=0`` for no CIs, ``chexbert="chexbert.pth"``).
    """
    opts = _options(options, option_kw)
    return summarise(compute_outputs(refs, hyps, metrics, opts), len(refs), opts)


def summarise(computed: tuple[dict[str, MetricOutput], dict[str, str], dict[str, float]], n: int,
              opts: ScoreOptions) -> dict:
    """The :func:`score` dict from :func:`compute_outputs`' result: scores, bootstrap CIs, provenance."""
    outputs, omitted, seconds = computed
    seconds = dict(seconds)
    result: dict = {"n_pairs": n, "scores": {}, "ci": {}, "info": {}, "omitted": omitted,
                    "seconds": seconds, "per_pair": {}, "options": opts.record(),
                    "bootstrap": {"resamples": opts.n_resamples, "seed": opts.seed, "alpha": opts.alpha,
                                  "method": "percentile bootstrap over report pairs; the same resamples "
                                            "for every metric"}}
    idx = bootstrap_indices(n, opts.n_resamples, opts.seed) if opts.n_resamples > 0 else None
    t = time.perf_counter()
    for fam, out in outputs.items():
        result["scores"].update(out.scores())
        result["info"][fam] = out.info
        clash = set(out.per_pair) & set(result["per_pair"])
        if clash:  # a silent overwrite would put one metric's values under another's column
            raise ValueError(f"metric family {fam!r} reuses per-pair names {sorted(clash)}")
        result["per_pair"].update({k: np.asarray(v).tolist() for k, v in out.per_pair.items()})
        if idx is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for k, vals in _resampled(out, idx).items():
                    result["ci"][k] = _interval(vals, opts.alpha)
    seconds["bootstrap"] = time.perf_counter() - t
    if "chexpert" in outputs:
        from eval.chexpert.f1 import per_observation_table

        result["per_observation"] = per_observation_table(outputs["chexpert"].stats)
        result["per_finding"] = _per_finding(outputs["chexpert"])
    return result


def _per_finding(out: MetricOutput) -> dict:
    """Per-finding P/R and the false-alarm rate on No-Finding films (:mod:`eval.chexpert.per_finding`)."""
    from eval.chexpert.per_finding import per_finding_from_stats

    return {"labeler": out.info.get("labeler"), **per_finding_from_stats(out.stats)}


def compare(refs: Sequence[str], hyps_a: Sequence[str], hyps_b: Sequence[str],
            metrics: Sequence[str] | None = None, options: ScoreOptions | None = None,
            computed_a: tuple | None = None, **option_kw) -> dict:
    """Paired bootstrap comparison of systems A and B on the same studies.

    For every score: A, B, ``diff = A - B``, its percentile CI from resampling the *pairs* (each
    resample scores both systems on the same reports) and ``p_two_sided`` = 2 · min(share of
    resampled diffs <= 0, share >= 0), capped at 1. ``computed_a``: system A's
    :func:`compute_outputs` result when already at hand (it is not recomputed). With CheXpert F1 on
    both sides, ``"per_finding": {"a": ..., "b": ...}`` holds each system's per-finding summary.
    """
    opts = _options(options, option_kw)
    if len(hyps_a) != len(hyps_b):
        raise ValueError(f"system A has {len(hyps_a)} hypotheses, system B {len(hyps_b)}")
    out_a, omitted, sec_a = computed_a or compute_outputs(refs, hyps_a, metrics, opts)
    omitted = dict(omitted)
    out_b, omitted_b, sec_b = compute_outputs(refs, hyps_b, metrics, opts)
    omitted.update(omitted_b)
    idx = bootstrap_indices(len(refs), max(opts.n_resamples, 1), opts.seed)
    rows: dict[str, dict] = {}
    for fam in out_a:
        if fam not in out_b:
            continue
        sa, sb = out_a[fam].scores(), out_b[fam].scores()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ra, rb = _resampled(out_a[fam], idx), _resampled(out_b[fam], idx)
        for k in sa:
            d = ra[k] - rb[k]
            d = d[np.isfinite(d)]
            p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) if len(d) else float("nan")
            rows[k] = {"a": sa[k], "b": sb[k], "diff": sa[k] - sb[k], "ci": _interval(d, opts.alpha),
                       "p_two_sided": float(p)}
    result = {"n_pairs": len(refs), "comparison": rows, "omitted": omitted,
              "seconds": {"a": sec_a, "b": sec_b}, "options": opts.record(),
              "bootstrap": {"resamples": len(idx), "seed": opts.seed, "alpha": opts.alpha,
                            "method": "paired percentile bootstrap over report pairs"}}
    if "chexpert" in out_a and "chexpert" in out_b:
        result["per_finding"] = {"a": _per_finding(out_a["chexpert"]), "b": _per_finding(out_b["chexpert"])}
    return result
