"""Offline, rule-based stand-in for the RadGraph annotator — a proxy, NOT RadGraph-F1.

The real RadGraph-F1 needs the RadGraph model (``eval.radgraph.model``). Where that is unavailable,
this module builds RadGraph-*style* graphs with hand-written rules and scores them with the same
reward (``eval.radgraph.reward``), reported as ``radgraph_proxy_*_f1``. Numbers from it are not
comparable with published RadGraph-F1.

Conventions follow the RadGraph schema (Jain et al. 2021) at one-token granularity:
* entities are single tokens: anatomy ``ANAT-DP``; observations ``OBS-DP`` (present),
  ``OBS-DA`` (negated) or ``OBS-U`` (uncertain);
* ``modify``: a modifier token -> the head it qualifies ("mild" -> "cardiomegaly", "left" -> "lobe");
* ``located_at``: an observation head -> the anatomy in its phrase ("pleural effusion", "opacity in
  the right lower lobe"), or for a predicate adjective the nearest anatomy in the clause ("lungs are clear");
* ``suggestive_of``: observation -> observation across "suggestive of", "consistent with", "may represent"...
* negation / uncertainty: cue phrases scoped forward ("no", "possible") or backward ("is not seen",
  "cannot be excluded") up to the clause edge or the next cue; where both apply, uncertainty wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from eval.metric import MetricOutput
from eval.radgraph.reward import radgraph_reward

__all__ = ["extract_proxy_graph", "radgraph_proxy_reward", "tokenize", "PROXY_VERSION"]

PROXY_VERSION = "1"

# ----------------------------------------------------------------------------------------- lexicons
# Anatomy: organs, regions and their location words. Consecutive anatomy tokens form one phrase
# whose last token is the head ("right lower lobe" -> right, lower modify lobe).
_ANATOMY = """
lung lobe lobar heart mediastinum mediastinal hilum hila hilar perihilar pleura pleural diaphragm
hemidiaphragm spine angle apex apices apical biapical base basilar bibasilar basal silhouette contour
vasculature vascular bronchovascular aorta aortic trachea tracheal carina bronchus bronchi rib clavicle
sternum sternal vertebra vertebrae vertebral bone bony osseous skeletal chest thorax thoracic
hemithorax abdomen abdominal stomach lingula lingular parenchyma parenchymal airspace airway knob arch
shoulder humerus scapula esophagus atrium ventricle region zone field space costophrenic
cardiopulmonary cardiomediastinal cardiac cardio intrathoracic hiatal retrocardiac subpleural
paratracheal interstitium midlung midthoracic thoracolumbar lumbar cervical tissue endplate wall
svc subclavian jugular jugulars quadrant junction venous body pulmonary spinal splenic spleen axillary
subdiaphragmatic
left right bilateral bilaterally both upper middle mid lower lateral medial anterior posterior
superior inferior central peripheral distal proximal left-sided right-sided
""".split()

# Observation nouns: always heads.
_OBS_NOUN = """
opacity opacification density effusion pneumothorax pneumothoraces cardiomegaly atelectasis edema
oedema consolidation pneumonia infiltrate infiltration nodule nodularity mass lesion fracture
emphysema fibrosis scarring scar thickening hernia granuloma calcification congestion enlargement
abnormality process disease deformity change tube catheter line pacemaker wire clip hyperinflation
hyperexpansion hypoinflation tortuosity prominence blunting elevation infection aspiration collapse
volume spondylosis osteophyte kyphosis scoliosis dextroscoliosis levoscoliosis pneumomediastinum air
fluid bronchiectasis marking eventration finding adenopathy lymphadenopathy sternotomy stent device
hardware crowding widening flattening lucency ectasia tuberculosis failure vascularity cyst cavity
pneumoperitoneum thymoma malignancy tumor metastasis copd granulomata fusion arthritis shift
engorgement dislocation subluxation
""".split()

# Observation adjectives: modify the next observation head if one follows, else are heads themselves.
_OBS_ADJ = """
normal clear unremarkable stable unchanged enlarged enlarging tortuous prominent calcified
hyperinflated hyperexpanded hypoinflated elevated intact well-expanded expanded inflated widened
blunted dilated ectatic increased decreased improved worsened worsening abnormal mild mildly moderate
moderately severe severely small large minimal minor trace tiny focal diffuse patchy streaky linear
acute chronic new residual subsegmental platelike plate-like scattered multifocal cavitary
interstitial alveolar bullous old healed significant gross grossly marked markedly slight slightly
low degenerative atherosclerotic granulomatous nodular reticular reticulonodular coarse emphysematous
active displaced multilevel persistent postsurgical postoperative surgical multiple numerous
obstructive congestive accentuated noncalcified confluent irregular definite
""".split()

_IRREGULAR = {"hila": "hilum", "apices": "apex", "bronchi": "bronchus", "vertebrae": "vertebra",
              "pneumothoraces": "pneumothorax", "granulomata": "granuloma"}

ANAT, NOUN, ADJ = "ANAT", "NOUN", "ADJ"


def _lexicon() -> dict[str, str]:
    """lower-case surface form (incl. regular plurals) -> word class."""
    lex: dict[str, str] = {}
    for cls, words in ((ADJ, _OBS_ADJ), (NOUN, _OBS_NOUN), (ANAT, _ANATOMY)):
        for w in words:
            forms = {w, w + "s", w + "es"} | ({w[:-1] + "ies"} if w.endswith("y") else set())
            for f in forms:
                lex.setdefault(f, cls)  # a generated plural never overrides a listed word
            lex[w] = cls
    for f in _IRREGULAR:
        lex[f] = lex[_IRREGULAR[f]]
    return lex


LEXICON = _lexicon()

# ------------------------------------------------------------------------------------- cue phrases
# (phrase, kind, direction). kind: NEG | UNC; direction: fwd (scope towards the clause end) or bwd
# (towards the clause start). Tokens inside a cue phrase never become entities.
_CUES: list[tuple[str, str, str]] = [
    *[(p, "NEG", "fwd") for p in (
        "no", "not", "without", "negative for", "free of", "absence of", "resolution of",
        "clear of", "neither", "nor", "rather than", "no evidence of", "no signs of", "no longer")],
    *[(p, "NEG", "bwd") for p in (
        "not seen", "not identified", "not visualized", "not appreciated", "not demonstrated",
        "not evident", "not present", "not noted", "not detected", "not visible", "is absent",
        "are absent", "resolved", "has resolved", "have resolved", "has cleared", "have cleared")],
    *[(p, "UNC", "fwd") for p in (
        "may", "might", "could", "possible", "possibly", "probable", "probably", "likely",
        "questionable", "question of", "suspected", "suspect", "suspicious for", "concerning for",
        "worrisome for", "cannot exclude", "can not exclude", "can't exclude", "cannot rule out",
        "suggest", "suggests", "suggestive of", "suggesting", "presumed", "presumably", "equivocal",
        "differential", "borderline", "perhaps", "consider", "versus", "vs", "difficult to exclude")],
    *[(p, "UNC", "bwd") for p in (
        "cannot be excluded", "can not be excluded", "cannot be ruled out", "not excluded",
        "not ruled out", "not entirely excluded", "is possible", "are possible", "is suspected",
        "are suspected", "is questioned", "versus", "vs")],
]

# Cues that link the last observation before them to the first one after them (same sentence).
_SUGGESTIVE = (
    "suggestive of", "consistent with", "compatible with", "may represent", "could represent",
    "might represent", "likely represents", "likely represent", "probably represents", "representing",
    "concerning for", "suspicious for", "worrisome for", "may reflect", "likely reflects", "reflecting",
    "indicative of", "suggesting", "suggest", "suggests", "likely", "which may be", "characteristic of",
)


def _phrase_index(phrases: Sequence[tuple[str, Any]]) -> dict[str, list[tuple[tuple[str, ...], Any]]]:
    """first word -> [(word tuple, payload)], longest phrase first (longest match wins)."""
    idx: dict[str, list[tuple[tuple[str, ...], Any]]] = {}
    for phrase, payload in phrases:
        words = tuple(phrase.split())
        idx.setdefault(words[0], []).append((words, payload))
    for v in idx.values():
        v.sort(key=lambda x: -len(x[0]))
    return idx


def _cue_payloads() -> list[tuple[str, Any]]:
    """phrase -> frozenset of (kind, direction); a phrase listed twice ("versus") scopes both ways."""
    merged: dict[str, set[tuple[str, str]]] = {}
    for phrase, kind, direction in _CUES:
        merged.setdefault(phrase, set()).add((kind, direction))
    return [(p, frozenset(v)) for p, v in merged.items()]


_CUE_INDEX = _phrase_index(_cue_payloads())
_SUGG_INDEX = _phrase_index([(p, True) for p in _SUGGESTIVE])

# ------------------------------------------------------------------------------------- tokenising
_TOKEN_RE = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|\d+(?:\.\d+)?|[^\sA-Za-z\d]")
_SENTENCE_END = {".", ";", "!", "?", ":"}
_CLAUSE_WORDS = {"but", "however", "although", "though", "whereas", "except", "which", "while"}
_BREAK_AFTER_COMMA = {"the", "there", "this", "these", "it", "its", "with", "which", "however", "although"}
# May sit between a modifier and its head ("xxxx" is the IU de-identification mask).
_BRIDGE = {"and", "or", ",", "to", "-", "/", "xxxx", "sized", "appearing", "radiographic"}
_MOD_WINDOW = 5


def tokenize(text: str) -> list[str]:
    """Words (hyphen/apostrophe-joined), numbers and single punctuation marks, case preserved."""
    return _TOKEN_RE.findall(text)


def _segments(low: list[str]) -> tuple[list[int], list[int]]:
    """Per-token sentence id and clause id (clauses also break at 'but', ', the', ', and there', ...)."""
    sent, clause = [], []
    s = c = 0
    for i, w in enumerate(low):
        prev = low[i - 1] if i else ""
        if w in _CLAUSE_WORDS or (prev == "," and w in _BREAK_AFTER_COMMA) or (
                w == "and" and prev == "," and i + 1 < len(low) and low[i + 1] in ("the", "there")):
            c += 1
        sent.append(s)
        clause.append(c)
        if w in _SENTENCE_END:
            s += 1
            c += 1
    return sent, clause


def _match(low: list[str], i: int, index: dict) -> tuple[int, Any] | None:
    for words, payload in index.get(low[i], ()):
        if tuple(low[i:i + len(words)]) == words:
            return len(words), payload
    return None


# ------------------------------------------------------------------------------------- extraction
def _assertion(low: list[str], clause: list[int]) -> tuple[list[bool], list[bool], list[bool]]:
    """Per token: (inside a cue phrase, negated, uncertain).

    A cue's scope runs to the clause edge or to the next/previous cue, whichever comes first, so
    "opacities likely atelectasis, no pneumothorax" keeps pneumothorax negated, not uncertain.
    """
    n = len(low)
    is_cue, neg, unc = [False] * n, [False] * n, [False] * n
    cues: list[tuple[int, int, Any]] = []  # (start, end, payload)
    i = 0
    while i < n:
        m = _match(low, i, _CUE_INDEX)
        if m is None:
            i += 1
            continue
        cues.append((i, i + m[0], m[1]))
        for j in range(i, i + m[0]):
            is_cue[j] = True
        i += m[0]
    for k, (start, end, payload) in enumerate(cues):
        stop = cues[k + 1][0] if k + 1 < len(cues) else n
        first = cues[k - 1][1] if k else 0
        for kind, direction in payload:
            flags = neg if kind == "NEG" else unc
            if direction == "fwd":
                j = end
                while j < stop and clause[j] == clause[start]:
                    flags[j] = True
                    j += 1
            else:
                j = start - 1
                while j >= first and clause[j] == clause[start]:
                    flags[j] = True
                    j -= 1
    return is_cue, neg, unc


def _classes(low: list[str], is_cue: list[bool]) -> list[str | None]:
    return [None if is_cue[i] else LEXICON.get(w) for i, w in enumerate(low)]


def _obs_heads(cls: list[str | None], clause: list[int], low: list[str]) -> dict[int, int | None]:
    """Observation token -> index of the head it modifies (None: it is a head). Right to left, so a
    later adjective's head status is known: 'mildly enlarged' -> mildly modifies enlarged."""
    n = len(cls)
    head_of: dict[int, int | None] = {}
    for i in range(n - 1, -1, -1):
        if cls[i] not in (NOUN, ADJ):
            continue
        if cls[i] == NOUN:
            head_of[i] = None
            continue
        target = None
        for j in range(i + 1, min(n, i + 1 + _MOD_WINDOW)):
            if clause[j] != clause[i]:
                break
            if cls[j] in (NOUN, ADJ):
                if head_of[j] is None:
                    target = j
                    break
                continue  # another modifier of the same head: keep looking
            if cls[j] == ANAT or low[j] in _BRIDGE:
                continue
            break
        head_of[i] = target
    return head_of


def _anat_heads(cls: list[str | None], clause: list[int]) -> dict[int, int | None]:
    """Anatomy token -> head of its run of consecutive anatomy tokens (None: it is the head)."""
    head_of: dict[int, int | None] = {}
    i, n = 0, len(cls)
    while i < n:
        if cls[i] != ANAT:
            i += 1
            continue
        j = i
        while j + 1 < n and cls[j + 1] == ANAT and clause[j + 1] == clause[i]:
            j += 1
        for k in range(i, j):
            head_of[k] = j
        head_of[j] = None
        i = j + 1
    return head_of


_PREP = {"in", "at", "of", "within", "involving", "over", "along", "overlying", "projecting", "on",
         "throughout", "near", "about", "the", "a", "an", "both"}


def _location(i: int, cls: list[str | None], low: list[str], clause: list[int],
              anat_head_of: dict[int, int | None], anat_heads: list[int]) -> int | None:
    """Anatomy head an observation head is located at, or None.

    Nouns look inside their own phrase: anatomy just before ("left pleural effusion", modifiers may
    sit between) or just after, possibly behind a preposition ("opacity in the right lower lobe").
    Adjective heads are predicates ("the lungs are clear"): nearest anatomy head in the clause.
    """
    if cls[i] == NOUN:
        j = i - 1
        while j >= 0 and clause[j] == clause[i] and cls[j] == ADJ:
            j -= 1
        if j >= 0 and clause[j] == clause[i] and cls[j] == ANAT:
            return j if anat_head_of[j] is None else anat_head_of[j]
        j = i + 1
        while j < len(cls) and j <= i + 4 and clause[j] == clause[i] and cls[j] is None and low[j] in _PREP:
            j += 1
        if j < len(cls) and clause[j] == clause[i] and cls[j] == ANAT:
            return j if anat_head_of[j] is None else anat_head_of[j]
        return None
    same = [a for a in anat_heads if clause[a] == clause[i]]
    # nearest; on a tie prefer the one before (the subject of "X is normal")
    return min(same, key=lambda a: (abs(a - i), a > i)) if same else None


def _suggestive_pairs(low: list[str], sent: list[int], obs_heads: list[int]) -> list[tuple[int, int]]:
    pairs = []
    i = 0
    while i < len(low):
        m = _match(low, i, _SUGG_INDEX)
        if m is None:
            i += 1
            continue
        end = i + m[0]
        before = [h for h in obs_heads if h < i and sent[h] == sent[i]]
        after = [h for h in obs_heads if h >= end and sent[h] == sent[i]]
        if before and after:
            pairs.append((before[-1], after[0]))
        i = end
    return pairs


def extract_proxy_graph(text: str) -> dict[str, Any]:
    """Rule-based RadGraph-style annotation of one report: {"text", "entities": {id: entity}}.

    Entities are single tokens (start_ix == end_ix, token indices of ``tokenize(text)``), ids "1".. in
    text order, relations ``[type, target_id]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"report text must be a str, got {type(text).__name__}")
    return _thaw(text)


@lru_cache(maxsize=4096)
def _extract_frozen(text: str) -> tuple:
    toks = tokenize(text)
    low = [t.lower() for t in toks]
    sent, clause = _segments(low)
    is_cue, neg, unc = _assertion(low, clause)
    cls = _classes(low, is_cue)
    obs_head_of = _obs_heads(cls, clause, low)
    anat_head_of = _anat_heads(cls, clause)

    ent_idx = [i for i, c in enumerate(cls) if c is not None]
    eid = {i: str(k + 1) for k, i in enumerate(ent_idx)}
    rels: dict[int, list[tuple[str, int]]] = {i: [] for i in ent_idx}
    for i, h in obs_head_of.items():
        if h is not None:
            rels[i].append(("modify", h))
    for i, h in anat_head_of.items():
        if h is not None:
            rels[i].append(("modify", h))

    anat_heads = [i for i, h in anat_head_of.items() if h is None]
    obs_heads = sorted(i for i, h in obs_head_of.items() if h is None)
    for i in obs_heads:
        a = _location(i, cls, low, clause, anat_head_of, anat_heads)
        if a is not None:
            rels[i].append(("located_at", a))
    for a, b in _suggestive_pairs(low, sent, obs_heads):
        rels[a].append(("suggestive_of", b))

    out = []
    for i in ent_idx:
        if cls[i] == ANAT:
            label = "ANAT-DP"
        else:
            label = "OBS-U" if unc[i] else "OBS-DA" if neg[i] else "OBS-DP"
        out.append((eid[i], toks[i], label, i, tuple((t, eid[j]) for t, j in rels[i])))
    return tuple(out)


def _thaw(text: str) -> dict[str, Any]:
    # The cache holds immutable tuples; every call gets fresh dicts it may modify.
    ents = {
        e: {"tokens": tok, "label": label, "start_ix": ix, "end_ix": ix, "relations": [[t, j] for t, j in rel]}
        for e, tok, label, ix, rel in _extract_frozen(text)
    }
    return {"text": text, "entities": ents}


class _LazyGraphs(Sequence):
    """The proxy graph of ``texts[i]``, built when read."""

    def __init__(self, texts: Sequence[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        return extract_proxy_graph(self.texts[i])


def radgraph_proxy_reward(refs: Sequence[str], hyps: Sequence[str], lowercase: bool = True) -> MetricOutput:
    """RadGraph-style reward with the rule-based extractor: ``radgraph_proxy_{simple,partial,complete}_f1``.

    A proxy, NOT RadGraph-F1: the reward formula is RadGraph's, the graphs come from hand-written rules.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references and {len(hyps)} hypotheses")
    for name, texts in (("reference", refs), ("hypothesis", hyps)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name} {i}: report text must be a str, got {type(t).__name__}")
    # Graphs are built as each pair is scored, not all at once (about 12 KiB per pair held).
    return radgraph_reward(_LazyGraphs(refs), _LazyGraphs(hyps), lowercase=lowercase, prefix="radgraph_proxy", info={
        "metric": "RadGraph-style proxy reward (rule-based extractor; NOT RadGraph-F1, not comparable "
                  "with published RadGraph-F1 numbers)",
        "annotator": f"eval.radgraph.proxy rule-based extractor v{PROXY_VERSION}",
    })
