"""Lexical report metrics — BLEU-1..4, METEOR, ROUGE-L, CIDEr-D — computed with pycocoevalcap 1.2.

One call tokenises references and hypotheses together with pycocoevalcap's Stanford PTB tokenizer
(one JVM), scores BLEU / ROUGE-L / CIDEr-D with pycocoevalcap's Python scorers and METEOR with
pycocoevalcap's own ``Meteor()`` (the METEOR 1.5 jar; one JVM for all pairs, kept warm across
calls because it takes ~6-8 s to load). Every family returns a :class:`~eval.metric.MetricOutput`, so bootstrap resamples are
``out.aggregate(out.stats[idx])``:

* BLEU stores per-pair clipped n-gram matches, n-gram totals, hypothesis length and the
  "closest" reference length, and its aggregate repeats ``BleuScorer.compute_score`` (smoothing
  constants and brevity penalty included), so any subset scores exactly as pycocoevalcap would.
* METEOR stores the 23 per-segment statistics that the jar prints for ``SCORE`` and its aggregate
  repeats what the jar does for ``EVAL`` (sum statistics, drop the chunk count of perfect
  segments, then the Meteor 1.5 formula); the jar's own corpus score is checked against it.
* ROUGE-L and CIDEr-D are means of per-pair scores in pycocoevalcap, so they store those.

Empty hypotheses need no workaround: PTB keeps their (empty) lines and all four pycocoevalcap 1.2
scorers give them 0, so they are scored, not dropped. What this module does change, and why:

* PTB's lexer treats ``\\r``, ``\\x0b``, ``\\x0c``, ``\\x85``, U+2028 and U+2029 as line ends, and
  the wrapper only replaces ``\\n``; such a character silently shifts every later line onto the
  wrong pair. They are replaced by spaces, and a sentinel line checks the alignment.
* A ``|||`` inside a reference would split it into two references for METEOR; it is removed
  (pycocoevalcap removes it from hypotheses only).

Without Java, the PTB tokenizer and METEOR cannot run: METEOR is omitted and the others are
computed on a Python tokenizer under suffixed names (``bleu_4_pytok`` ...), never the official ones.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import re
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from eval.metric import MetricOutput

__all__ = [
    "FAMILIES",
    "LexicalResult",
    "lexical_metrics",
    "ptb_tokenize",
    "python_tokenize",
    "bleu_aggregate",
    "meteor_aggregate",
    "close_meteor",
    "meteor_scorer",
]

FAMILIES = ("bleu", "meteor", "rouge_l", "cider")
_SCORE_NAMES = {
    "bleu": ["bleu_1", "bleu_2", "bleu_3", "bleu_4"],
    "meteor": ["meteor"],
    "rouge_l": ["rouge_l"],
    "cider": ["cider_d"],
}
FALLBACK_SUFFIX = "_pytok"
FALLBACK_TOKENIZER = "python-fallback (not PTB)"

# Characters the PTB lexer ends a line on (beyond "\n", which the wrapper already replaces).
_PTB_LINE_BREAKS = re.compile("[\r\x0b\x0c\x85\u2028\u2029]")
_SENTINEL = "lexicalalignmentsentinel"


# ----------------------------------------------------------------------------------- tokenisers
def _check_text(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected str")
    return out


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Lower-cased PTB tokens joined by spaces, punctuation removed — pycocoevalcap's PTBTokenizer.

    All texts go through one Java call. Line-break characters the PTB lexer honours are replaced
    by spaces first (see module docstring); a sentinel line verifies that output lines still
    line up with inputs.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = _check_text("texts", texts)
    if shutil.which("java") is None:
        raise RuntimeError("Java not found on PATH; the PTB tokenizer is a Java program")
    batch = {i: [{"caption": _PTB_LINE_BREAKS.sub(" ", t)}] for i, t in enumerate(texts)}
    batch[len(texts)] = [{"caption": _SENTINEL}]
    out = PTBTokenizer().tokenize(batch)
    if out.get(len(texts)) != [_SENTINEL] or len(out) != len(batch):
        raise RuntimeError(
            f"PTBTokenizer output does not line up with its {len(texts)} inputs "
            f"({len(out)} keys back, sentinel {out.get(len(texts))!r}); is Java working?"
        )
    return [out[i][0] for i in range(len(texts))]


_FALLBACK_TOKEN = re.compile(r"[a-z0-9]+(?:['.:/-][a-z0-9]+)*|[()\[\]{}%&#$=<>+]")
_FALLBACK_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_FALLBACK_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'m|'d)$")


def python_tokenize(text: str) -> str:
    """Fallback when Java is missing: a rough imitation of pycocoevalcap's lower-cased PTB output.

    Like PTB it splits clitics ("can't" -> "ca n't", "patient's" -> "patient 's") and "cannot",
    turns brackets into -lrb- ... (which pycocoevalcap fails to remove after lower-casing) and
    keeps % & # $ = < > + as tokens. Unlike PTB it drops every other symbol, keeps no
    abbreviation periods ("dr." -> "dr"), leaves "16.2/24.7" and "3.5cm" whole and does no
    Unicode normalisation, so its scores are labelled and never reported as the PTB ones.
    """
    out = []
    for tok in _FALLBACK_TOKEN.findall(text.lower()):
        if tok in _FALLBACK_BRACKETS:
            out.append(_FALLBACK_BRACKETS[tok])
        elif tok == "cannot":
            out += ["can", "not"]
        elif m := _FALLBACK_CLITIC.match(tok):
            out += [m.group(1), m.group(2)]
        else:
            out.append(tok)
    return " ".join(out)


# ----------------------------------------------------------------------------------------- BLEU
_BLEU_N = 4
_BLEU_TINY = 1e-15  # pycocoevalcap BleuScorer: keeps a zero-match ratio at ~0, not 0/0
_BLEU_SMALL = 1e-9
BLEU_COLUMNS = [f"correct_{k}" for k in range(1, 5)] + [f"guess_{k}" for k in range(1, 5)] + [
    "hyp_len",
    "ref_len_closest",
]


def _bleu_pair_stats(ref: str, hyp: str) -> list[float]:
    """One row of BLEU sufficient statistics, using pycocoevalcap's own n-gram cooking."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    comps = cook_test(hyp, cook_refs([ref], n=_BLEU_N), n=_BLEU_N)
    testlen = comps["testlen"]
    # "closest" reference length, as BleuScorer.compute_score(option="closest") picks it.
    reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]
    return [*comps["correct"], *comps["guess"], testlen, reflen]


def _bleu_from_totals(total: np.ndarray) -> dict[str, float]:
    # Same operations in the same order as BleuScorer.compute_score, so results are bit-identical.
    correct = [float(x) for x in total[0:4]]
    guess = [float(x) for x in total[4:8]]
    testlen, reflen = float(total[8]), float(total[9])
    scores, bleu = [], 1.0
    for k in range(_BLEU_N):
        bleu *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return {f"bleu_{k + 1}": s for k, s in enumerate(scores)}


def bleu_aggregate(stats: np.ndarray) -> dict[str, float]:
    """Corpus BLEU-1..4 of the rows in ``stats`` (columns ``BLEU_COLUMNS``), as pycocoevalcap."""
    stats = np.asarray(stats, dtype=np.float64)
    if len(stats) == 0:
        return {name: float("nan") for name in _SCORE_NAMES["bleu"]}
    # Counts are integers < 2**53, so float64 sums are exact and order does not matter.
    return _bleu_from_totals(stats.sum(axis=0))


def _bleu_output(refs: list[str], hyps: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    stats = np.array([_bleu_pair_stats(r, h) for r, h in zip(refs, hyps)], dtype=np.float64)
    rows = [_bleu_from_totals(row) for row in stats]  # sentence BLEU = the per-image list
    per_pair = {n: np.array([r[n] for r in rows]) for n in _SCORE_NAMES["bleu"]}
    return stats, per_pair


# --------------------------------------------------------------------------------------- METEOR
# METEOR 1.5 "-l en -norm" defaults (task "Ranking"), as the jar reports them in its Eval ID
# meteor-1.5-wo-en-norm-0.85_0.2_0.6_0.75-ex_st_sy_pa-1.0_0.6_0.8_0.6.
_MET_ALPHA, _MET_BETA, _MET_GAMMA, _MET_DELTA = 0.85, 0.2, 0.6, 0.75
_MET_WEIGHTS = (1.0, 0.6, 0.8, 0.6)  # exact, stem, synonym, paraphrase
METEOR_COLUMNS = ["test_len", "ref_len", "test_function_words", "ref_function_words"] + [
    f"{side}_{kind}_stage{s}"
    for s in range(1, 5)
    for kind, side in (("content", "test"), ("content", "ref"), ("function", "test"), ("function", "ref"))
] + ["chunks", "test_word_matches", "ref_word_matches"]
_MET_K = len(METEOR_COLUMNS)  # 23 numbers per SCORE line


def _div(a: float, b: float) -> float:
    """IEEE division as Java does it (x/0 = ±inf, 0/0 = NaN) instead of raising."""
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _meteor_total_matches(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stages = stats[:, 4:20].reshape(len(stats), 4, 4)  # per stage: test_c, ref_c, test_f, ref_f
    return stages[:, :, 0].sum(1) + stages[:, :, 2].sum(1), stages[:, :, 1].sum(1) + stages[:, :, 3].sum(1)


def _meteor_score(t: np.ndarray, test_matches: float, ref_matches: float) -> float:
    """MeteorScorer.computeMetrics on one (summed) statistics vector, same operation order."""
    tl, rl, tfw, rfw = (float(x) for x in t[0:4])
    st = [[float(x) for x in t[4 + 4 * s: 8 + 4 * s]] for s in range(4)]
    chunks, twm_words, rwm_words = float(t[20]), float(t[21]), float(t[22])
    d = _MET_DELTA
    test_wlen = d * (tl - tfw) + (1.0 - d) * tfw
    ref_wlen = d * (rl - rfw) + (1.0 - d) * rfw
    twm = rwm = 0.0
    for s in range(4):
        twm += st[s][0] * _MET_WEIGHTS[s] * d
    for s in range(4):
        rwm += st[s][1] * _MET_WEIGHTS[s] * d
    for s in range(4):
        twm += st[s][2] * _MET_WEIGHTS[s] * (1.0 - d)
    for s in range(4):
        rwm += st[s][3] * _MET_WEIGHTS[s] * (1.0 - d)
    precision, recall = _div(twm, test_wlen), _div(rwm, ref_wlen)
    fmean = _div(1.0, _div(1.0 - _MET_ALPHA, precision) + _div(_MET_ALPHA, recall))
    if test_matches == tl and ref_matches == rl and chunks == 1:
        frag = 0.0
    else:
        frag = _div(chunks, (twm_words + rwm_words) / 2.0)
    penalty = _MET_GAMMA * (math.nan if math.isnan(frag) else math.pow(frag, _MET_BETA))
    score = fmean * (1.0 - penalty)
    return 0.0 if math.isnan(score) else max(score, 0.0)


def meteor_aggregate(stats: np.ndarray) -> dict[str, float]:
    """Corpus METEOR of the rows in ``stats`` (columns ``METEOR_COLUMNS``), as the jar's EVAL.

    EVAL sums the segment statistics, except that a perfect segment (all words matched in one
    chunk) adds no chunk, then applies the Meteor formula to the sums.
    """
    stats = np.asarray(stats, dtype=np.float64)
    if len(stats) == 0:
        return {"meteor": float("nan")}
    tm, rm = _meteor_total_matches(stats)
    perfect = (tm == stats[:, 0]) & (rm == stats[:, 1]) & (stats[:, 20] == 1)
    total = stats.sum(axis=0)
    total[20] = stats[~perfect, 20].sum()
    return {"meteor": _meteor_score(total, float(tm.sum()), float(rm.sum()))}


class _MeteorProcess:
    """pycocoevalcap's own ``Meteor()`` (its JVM and command line), fed all pairs in one stream.

    ``Meteor.compute_score`` waits for each SCORE answer before sending the next line and keeps
    no statistics; this sends the same lines from a writer thread, keeps the statistics, then
    sends the same EVAL line. The jar is stateless between lines, so one JVM serves every call.
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self.scorer = Meteor()  # Popen returns at once; the jar then loads its tables (~6-8 s)
        self.proc = self.scorer.meteor_p

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _fail(self, what: str) -> RuntimeError:
        tail = ""
        if not self.alive():  # reading stderr of a live process could block
            tail = self.proc.stderr.read()[-2000:].decode(errors="replace")
        return RuntimeError(f"METEOR jar failed while {what} (exit {self.proc.poll()}): {tail}")

    def _readline(self, what: str) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise self._fail(what)
        return line.decode().strip()

    def score(self, refs: list[str], hyps: list[str]) -> tuple[np.ndarray, list[float], float]:
        """Per-segment statistics, the jar's segment scores and its corpus score."""
        with self.scorer.lock:
            return self._score(refs, hyps)

    def _score(self, refs: list[str], hyps: list[str]) -> tuple[np.ndarray, list[float], float]:
        lines = []
        for ref, hyp in zip(refs, hyps):
            # Meteor._stat's line format; "|||" is also stripped from the reference.
            hyp = hyp.replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", ref.replace("|||", ""), hyp)))
        payload = "".join(line + "\n" for line in lines).encode()
        # Written from a thread while this one reads: the jar answers line by line, so writing
        # everything first could fill both pipes and deadlock.
        errors: list[BaseException] = []

        def write() -> None:
            try:
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
            except BaseException as e:  # broken pipe: reported after the reader stops
                errors.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        raw = [self._readline(f"scoring pair {i}") for i in range(len(lines))]
        writer.join()
        if errors:
            raise self._fail("receiving SCORE lines") from errors[0]
        stats = np.empty((len(raw), _MET_K))
        for i, line in enumerate(raw):
            try:
                values = [float(x) for x in line.split()]
            except ValueError:
                values = []
            if len(values) != _MET_K:
                raise RuntimeError(f"METEOR answered {line!r} for pair {i}; expected {_MET_K} numbers")
            stats[i] = values
        self.proc.stdin.write(("EVAL" + "".join(" ||| " + x for x in raw) + "\n").encode())
        self.proc.stdin.flush()
        seg = [float(self._readline("evaluating")) for _ in raw]
        corpus = float(self._readline("evaluating"))
        return stats, seg, corpus

    def close(self) -> None:
        with self.scorer.lock:
            if self.alive():
                self.proc.stdin.close()
                self.proc.kill()
            self.proc.wait()


_METEOR: _MeteorProcess | None = None
_METEOR_LOCK = threading.Lock()


def _meteor_process() -> _MeteorProcess:
    global _METEOR
    if _METEOR is None or not _METEOR.alive():
        _METEOR = _MeteorProcess()
    return _METEOR


def meteor_scorer():
    """The warm pycocoevalcap ``Meteor()`` that ``lexical_metrics`` uses (started if needed).

    Its ``compute_score`` may be called directly, e.g. to compare with this module.
    """
    if shutil.which("java") is None:
        raise RuntimeError("Java not found on PATH; METEOR 1.5 is a Java program")
    with _METEOR_LOCK:
        return _meteor_process().scorer


def _close_meteor_locked() -> None:
    global _METEOR
    if _METEOR is not None:
        _METEOR.close()
        _METEOR = None


def close_meteor() -> None:
    """Stop the warm METEOR JVM (about 1 GB resident); the next call starts a new one."""
    with _METEOR_LOCK:
        _close_meteor_locked()


atexit.register(close_meteor)


# --------------------------------------------------------------------------------- top level
@dataclass
class LexicalResult:
    """One MetricOutput per family, the score names left out and why, and run information."""

    outputs: dict[str, MetricOutput]
    omitted: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.outputs.values():
            out.update(o.scores())
        return out


def _mean_aggregate_1d(name: str):
    # np.mean over a contiguous 1-D column: the same pairwise summation as pycocoevalcap's
    # np.mean(np.array(scores)), so the full-set value is bit-identical.
    def agg(stats: np.ndarray) -> dict[str, float]:
        col = np.ascontiguousarray(np.asarray(stats, dtype=np.float64)[:, 0])
        return {name: float(np.mean(col)) if len(col) else float("nan")}

    return agg


def _renamed(agg, suffix: str):
    if not suffix:
        return agg
    return lambda stats: {k + suffix: v for k, v in agg(stats).items()}


def lexical_metrics(
    refs: Sequence[str],
    hyps: Sequence[str],
    metrics: Sequence[str] = FAMILIES,
    *,
    python_fallback: bool = True,
    keep_meteor_warm: bool = True,
) -> LexicalResult:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of ``hyps`` against ``refs`` (one reference each).

    ``metrics`` picks families from ``FAMILIES``. With Java: PTB tokenisation (one JVM for both
    sides) and pycocoevalcap scorers; METEOR runs in one JVM for all pairs, kept warm between
    calls unless ``keep_meteor_warm`` is False (see ``close_meteor``). Without Java: METEOR is
    omitted and, if ``python_fallback``, the others are scored on ``python_tokenize`` under
    ``<name>_pytok`` names. Empty hypotheses are scored (0); empty references are an error.
    """
    t_start = time.perf_counter()
    refs, hyps = _check_text("refs", refs), _check_text("hyps", hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"refs has {len(refs)} texts but hyps has {len(hyps)}; they must pair up")
    if not refs:
        raise ValueError("refs and hyps are empty; need at least one pair")
    families = list(dict.fromkeys("cider" if m == "cider_d" else m for m in metrics))
    unknown = [m for m in families if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown lexical metric(s) {unknown}; choose from {FAMILIES}")
    empty = [i for i, r in enumerate(refs) if not r.strip()]
    if empty:
        raise ValueError(f"refs{empty[:10]} are empty; an empty reference has no defined score")

    java = shutil.which("java")
    omitted: dict[str, str] = {}
    seconds: dict[str, float] = {}
    suffix = ""
    if java is None:
        tokenizer, suffix = FALLBACK_TOKENIZER, FALLBACK_SUFFIX
        if "meteor" in families:
            omitted["meteor"] = "Java not found on PATH (METEOR 1.5 is a Java program)"
            families.remove("meteor")
        for name in (nm for fam in families for nm in _SCORE_NAMES[fam]):
            omitted[name] = "Java not found on PATH, so no PTB tokenizer; " + (
                f"reported as {name}{suffix} on a Python tokenizer" if python_fallback else "not computed"
            )
        if not python_fallback:
            families = []
    else:
        tokenizer = (
            "PTBTokenizer (Stanford CoreNLP 3.4.1 via pycocoevalcap 1.2), lower-cased, punctuation "
            "removed; its list misses the lower-cased bracket tokens -lrb- -rrb- ..., which stay as words"
        )

    with contextlib.ExitStack() as stack:
        meteor = None
        if java is not None and "meteor" in families:
            stack.enter_context(_METEOR_LOCK)
            meteor = _meteor_process()  # the JVM loads its tables while PTB runs
        t = time.perf_counter()
        toks = ptb_tokenize(refs + hyps) if java is not None else [python_tokenize(x) for x in refs + hyps]
        seconds["tokenize"] = time.perf_counter() - t
        n = len(refs)
        rt, ht = toks[:n], toks[n:]
        empty = [i for i, r in enumerate(rt) if not r]
        if empty:
            raise ValueError(f"refs{empty[:10]} have no tokens after tokenisation (punctuation only?)")
        base_info = {"tokenizer": tokenizer, "tokenize_seconds": seconds["tokenize"], "n_pairs": n}

        meteor_result: dict = {}
        thread = None
        if meteor is not None:
            # Scored in a thread (it mostly waits on the JVM) while the Python scorers run here.
            thread = threading.Thread(target=_run_meteor, args=(meteor, rt, ht, meteor_result), daemon=True)
            thread.start()
        try:
            outputs = _python_families(rt, ht, families, suffix, base_info, seconds)
        finally:
            if thread is not None:
                thread.join()
                if "error" in meteor_result or not keep_meteor_warm:
                    _close_meteor_locked()
        if thread is not None:
            if "error" in meteor_result:
                raise meteor_result["error"]
            seconds["meteor"] = meteor_result["seconds"]
            outputs["meteor"] = _meteor_output(*meteor_result["value"], base_info, seconds["meteor"])

    seconds["total"] = time.perf_counter() - t_start
    ordered = {f: outputs[f] for f in FAMILIES if f in outputs}
    return LexicalResult(outputs=ordered, omitted=omitted, info={"tokenizer": tokenizer, "seconds": seconds})


def _run_meteor(meteor: _MeteorProcess, refs: list[str], hyps: list[str], result: dict) -> None:
    t0 = time.perf_counter()
    try:
        result["value"] = meteor.score(refs, hyps)
    except BaseException as e:  # re-raised in the caller's thread
        result["error"] = e
    result["seconds"] = time.perf_counter() - t0


def _as_dict(texts: list[str]) -> dict[int, list[str]]:
    return {i: [t] for i, t in enumerate(texts)}


class _CorpusSized(list):
    """A chunk of cooked references whose ``len`` is the corpus size: pycocoevalcap's
    ``compute_cider`` takes the IDF denominator log(N) from ``len(crefs)``."""

    def __init__(self, items, total: int):
        super().__init__(items)
        self.total = total

    def __len__(self) -> int:
        return self.total


def cider_d_scores(refs: list[str], hyps: list[str], chunk: int = 2048) -> list[float]:
    """Per-pair CIDEr-D of tokenised texts, equal to ``Cider().compute_score``'s per-pair list.

    pycocoevalcap keeps every pair's n-gram counts until it scores (about 9 KiB per pair); here
    the document frequencies are counted over all references first (as its compute_doc_freq
    does for one reference per pair), then its own ``compute_cider`` scores ``chunk`` pairs at a
    time against them, so memory stays bounded and the arithmetic is the library's."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer, precook

    df: defaultdict = defaultdict(float)
    for r in refs:
        for ngram in precook(r):  # the keys are unique: a set, as compute_doc_freq takes
            df[ngram] += 1
    scores: list[float] = []
    for s in range(0, len(refs), chunk):
        scorer = CiderScorer(n=4, sigma=6.0)
        for h, r in zip(hyps[s:s + chunk], refs[s:s + chunk]):
            scorer += (h, [r])
        scorer.document_frequency = df
        scorer.crefs = _CorpusSized(scorer.crefs, len(refs))
        scores += scorer.compute_cider()
    return scores


def _mean_output(name: str, scores, base_info: dict, secs: float, **info) -> MetricOutput:
    col = np.asarray(scores, dtype=np.float64)
    return MetricOutput(
        stats=col[:, None].copy(),
        aggregate=_mean_aggregate_1d(name),
        per_pair={name: col},
        info={**base_info, **info, "seconds": secs},
    )


def _python_families(
    rt: list[str], ht: list[str], families: list[str], suffix: str, base_info: dict, seconds: dict
) -> dict[str, MetricOutput]:
    """BLEU, ROUGE-L and CIDEr-D on tokenised text (pycocoevalcap's Python scorers)."""
    outputs: dict[str, MetricOutput] = {}
    if "bleu" in families:
        t = time.perf_counter()
        stats, per_pair = _bleu_output(rt, ht)
        seconds["bleu"] = time.perf_counter() - t
        outputs["bleu"] = MetricOutput(
            stats=stats,
            aggregate=_renamed(bleu_aggregate, suffix),
            per_pair={k + suffix: v for k, v in per_pair.items()},
            info={
                **base_info,
                "implementation": "pycocoevalcap 1.2 BleuScorer n-gram counts, option='closest'",
                "stats_columns": BLEU_COLUMNS,
                "aggregate": "corpus BLEU from summed clipped matches and totals with BleuScorer's "
                "smoothing (1e-15 / 1e-9) and brevity penalty; equals Bleu(4).compute_score",
                "per_pair": "sentence BLEU as in BleuScorer's per-image list",
                "seconds": seconds["bleu"],
            },
        )
    from pycocoevalcap.rouge.rouge import Rouge

    def rouge(r, h):
        return Rouge().compute_score(_as_dict(r), _as_dict(h))[1]

    # family -> (score name, per-pair scorer, info); both score as the mean of per-pair values
    mean_families = {
        "rouge_l": ("rouge_l", rouge, {
            "implementation": "pycocoevalcap 1.2 Rouge: LCS F-measure, beta=1.2",
            "aggregate": "mean of per-pair scores (as pycocoevalcap)"}),
        "cider": ("cider_d", cider_d_scores, {
            "implementation": "pycocoevalcap 1.2 CiderScorer, which is CIDEr-D (n=4, sigma=6, clipped counts, "
                              "Gaussian length penalty, x10), run in chunks with the corpus-wide IDF",
            "aggregate": "mean of per-pair scores (as pycocoevalcap); IDF comes from the references of "
                         "this call and stays fixed when rows are resampled"}),
    }
    for family, (name, scorer, info) in mean_families.items():
        if family not in families:
            continue
        t = time.perf_counter()
        scores = scorer(rt, ht)
        seconds[family] = time.perf_counter() - t
        outputs[family] = _mean_output(name + suffix, scores, base_info, seconds[family], **info)
    return outputs


def _meteor_output(
    stats: np.ndarray, seg: list[float], corpus: float, base_info: dict, secs: float
) -> MetricOutput:
    agg = meteor_aggregate(stats)["meteor"]
    if abs(agg - corpus) > 1e-9:
        raise RuntimeError(
            f"METEOR recomputed from segment statistics ({agg!r}) differs from the jar's corpus score "
            f"({corpus!r}); this jar is not the METEOR 1.5 whose EVAL this module replicates"
        )
    seg_arr = np.array(seg)
    return MetricOutput(
        stats=stats,
        aggregate=meteor_aggregate,
        per_pair={"meteor": seg_arr},
        info={
            **base_info,
            "implementation": "METEOR 1.5 jar from pycocoevalcap 1.2, '-l en -norm' (task Ranking: "
            "alpha 0.85, beta 0.2, gamma 0.6, delta 0.75; module weights exact 1.0, stem 0.6, "
            "synonym 0.8, paraphrase 0.6)",
            "stats_columns": METEOR_COLUMNS,
            "aggregate": "the jar's EVAL recomputed from per-segment statistics (not the mean of "
            "segment scores)",
            "java_corpus_score": corpus,
            "mean_of_segment_scores": float(seg_arr.mean()),
            "seconds": secs,
            "seconds_note": "wall time of the METEOR thread, overlapping BLEU/ROUGE-L/CIDEr-D; "
            "includes JVM start-up (~6-8 s) on a process's first call",
        },
    )
