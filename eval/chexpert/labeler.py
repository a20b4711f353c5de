"""A rule-based CheXpert-14 report labeler ("rules-v1"), written for radgen.

Output follows the CheXpert convention (Irvin et al. 2019) for each of the 14 observations in
``CHEXPERT_14`` order: ``1`` positive, ``0`` negative, ``-1`` uncertain, ``None`` not mentioned.

How a report is labelled
1. The text is cut into sentences (full stops that are not decimals or abbreviations, newlines,
   numbered-list markers such as ``1.`` / ``2)``), and each sentence into *clauses* at words that end
   the scope of a negation or hedge ("but", "however", "although", "except", "other than", ";" ...).
2. Each clause is searched for *mention phrases* (``MENTIONS`` below, one entry per observation).
   Heart and mediastinum are also described by *anatomy phrases* ("heart size", "cardiac
   silhouette", "mediastinum") that only count as a mention when the clause says they are normal
   (-> 0), enlarged (-> 1) or borderline (-> -1).
3. Every mention is classified, in this order: a negated hedge ("cannot exclude") -> -1; a negation
   cue before it in the clause ("no", "without", "negative for", ...) or after it ("is not seen",
   "has resolved") -> 0; a hedge before it ("may", "possible", "likely", "suggestive of") or after
   it ("is possible", "is suspected") -> -1; named as one of alternatives ("X or Y", "X versus Y",
   "X/Y") -> -1; otherwise -> 1. A negation's scope also ends where a new, positively stated item
   starts ("no pneumothorax, small left effusion"); "no change in" is not a negation.
4. Mentions of one observation are combined as CheXpert does: positive beats uncertain beats
   negative. "No Finding" is 1 when no observation other than Support Devices is positive or
   uncertain, and blank otherwise (so an empty report gets No Finding = 1).

CheXpert has one "uncertain" value for two different things: a finding raised as a possibility
("may represent atelectasis") and a finding named as one of alternatives ("atelectasis or
scarring"). Both are output as -1; ``label_reports_with_alternatives`` also returns a mask of the
-1s that come only from the second kind, for comparisons whose gold standard separates them.

All rules are general clinical language; none is tuned to a single report. The phrase tables are
plain data at the top of this module so they can be read and reviewed on their own.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from eval.chexpert.observations import CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES

__all__ = [
    "MENTIONS",
    "RuleLabeler",
    "label_report",
    "label_reports",
    "label_reports_with_alternatives",
    "split_sentences",
]

# --------------------------------------------------------------------------------------------
# Phrase tables (regular-expression fragments, matched on lower-cased text at word boundaries).
# A space inside a phrase matches any run of whitespace or hyphens.
# --------------------------------------------------------------------------------------------

# "pleural effusion versus thickening", "fluid or thickening": that thickening is pleural.
_AFTER_PLEURAL_FLUID_ALTERNATIVE = "(?:" + "|".join(
    rf"(?<={fluid}\s{alt}\s)"
    for fluid in ("effusion", "effusions", "fluid")
    for alt in ("or", "versus", "vs", "and/or")
) + ")"

# Mention phrases: a match is a mention of the observation (its label then depends on cues).
MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"widen(?:ed|ing) (?:of )?(?:the )?(?:superior )?mediastin\w*",
        r"mediastin\w* widening",
        r"mediastinal enlargement",
        r"enlarged (?:cardio)?mediastin\w*(?: silhouette| contours?)?",
        r"enlargement of the (?:cardio)?mediastin\w*(?: silhouette| contours?)?",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"cardiac enlargement",
        r"enlarged (?:heart|cardiac (?:silhouette|shadow|contours?|size))",
        r"enlargement of the (?:heart|cardiac silhouette|cardiac shadow)",
    ),
    "Lung Opacity": (
        r"opacit(?:y|ies)",
        r"opacifications?",
        r"opacified",
        r"infiltrat(?:e|es|ion|ive)",
        r"air ?space (?:disease|process|opacit(?:y|ies)|densit(?:y|ies))",
        # A "nodular opacity/density" is described, not called a nodule: an opacity, not a lesion.
        r"(?:parenchymal|pulmonary|lung|patchy|hazy|streaky|ill defined|airspace|alveolar|nodular) "
        r"densit(?:y|ies)",
        r"ground glass",
        r"haziness",
        r"interstitial (?:markings?|prominence|pattern|thickening|lung disease|disease)",
        r"reticul(?:ar|ation|onodular)(?: markings?| pattern| opacit(?:y|ies)| changes?)?",
        r"scar(?:ring|s)?",
        r"peribronchial (?:thickening|cuffing)",
    ),
    "Lung Lesion": (
        r"mass(?:es)?",
        r"mass ?like",
        r"nodules?",
        r"nodular lesions?",
        r"(?:lung|pulmonary|cavitary|cavitating|lytic|parenchymal) lesions?",
        r"tumou?rs?",
        r"neoplasms?",
        r"carcinoma",
        r"malignanc(?:y|ies)",
        r"metasta(?:sis|ses|tic disease)",
        r"lump",
    ),
    "Edema": (
        r"(?<!tissue\s)(?<!tissues\s)(?<!extremity\s)o?edema(?:tous)?",
        r"fluid overload",
        r"kerley b? ?lines?",
    ),
    "Consolidation": (
        r"consolidat(?:ion|ions|ive|ed)",
    ),
    "Pneumonia": (
        r"pneumonias?",
        r"bronchopneumonia",
        r"pneumonitis",
        # "prior granulomatous infection" is a healed sequela, not pneumonia.
        r"(?<!granulomatous\s)(?<!prior\s)(?<!previous\s)(?<!old\s)(?<!remote\s)(?<!healed\s)infections?",
        r"infectious (?:process|etiology|infiltrates?|disease)",
    ),
    "Atelectasis": (
        r"atelecta(?:sis|ses|tic)",
        r"collapse of (?:the |a )?(?:\w+ ){0,3}?(?:lung|lobe)",
        r"(?:lung|lobar|lobe|segmental) collapse",
        r"collapsed (?:\w+ )?(?:lung|lobe)",
    ),
    "Pneumothorax": (
        r"pneumothora(?:x|ces|xes)",
        r"hydropneumothorax",
    ),
    "Pleural Effusion": (
        r"(?<!pericardial\s)(?<!joint\s)effusions?",
        r"pleural fluid",
        r"fluid in the (?:\w+ )?(?:pleural space|fissure)",
        r"hydrothorax",
        r"hydropneumothorax",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis)",
        r"thickening of the (?:\w+ )?(?:pleura|fissures?)",
        r"(?:fissural|fissure) thickening",
        r"thickened (?:\w+ )?(?:pleura|fissures?)",
        # "pleural fluid versus thickening": the thickening is pleural.
        _AFTER_PLEURAL_FLUID_ALTERNATIVE + r"(?:pleural )?thickening",
        r"thickening(?= (?:or|versus|vs|and/or) (?:\w+ ){0,2}(?:pleural )?(?:effusion|fluid))",
        r"calcified pleura\w*",
        r"pleuro ?parenchymal (?:scarring|thickening|changes?)",
        r"fibrothorax",
        r"apical (?:pleural )?capp?(?:ing)?",
    ),
    "Fracture": (
        # A broken lead, wire or catheter is a device problem, not a bone fracture.
        r"(?<!lead\s)(?<!wire\s)(?<!line\s)(?<!catheter\s)fractures?",
        r"fractured",
    ),
    "Support Devices": (
        r"(?:endotracheal|tracheostomy|chest|feeding|nasogastric|orogastric|enteric|ng|og|et|"
        r"gastric|dobhoff|thoracostomy|mediastinal|drainage) tubes?",
        r"tracheostomy",
        r"catheters?",
        r"(?:picc|central(?: venous)?|venous|arterial|jugular|subclavian|dialysis|swan ganz) lines?",
        r"picc",
        r"pacemakers?",
        r"pacers?",
        r"(?:pacing|pacemaker|pacer|cardiac) (?:leads?|wires?)",
        r"defibrillators?",
        r"aicd",
        r"icd",
        r"stents?",
        r"ports?",
        r"port a cath",
        r"sternotomy wires?",
        r"drains?",
        r"(?:vp|ventriculoperitoneal) shunt",
        r"shunt tubing",
        r"(?:valve|joint) (?:replacements?|prosthes[ie]s)",
        r"prosthetic (?:valves?|joints?)",
        r"(?:surgical|orthopedic|fixation) hardware",
        r"loop recorder",
    ),
}

# Anatomy phrases: labelled only by what the clause says about their size.
ANATOMY: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        r"heart(?! failure)(?: size)?",
        r"cardiac (?:silhouette|size|shadow|contours?|borders?)",
    ),
    "Enlarged Cardiomediastinum": (
        r"cardiomediastinal (?:silhouette|contours?|size|shadow)",
        r"mediastin(?:um|al (?:silhouette|contours?|structures?|width|shadow))",
    ),
}
# Size statements about an anatomy phrase. The earliest statement after the phrase wins
# ("heart size is normal; the aorta is enlarged").
# "Upper limits of normal" is still normal. "Borderline" grades an enlargement when it qualifies
# one ("borderline enlarged", "borderline cardiomegaly" -> positive, mild degree) and is a hedge
# when it stands for the size alone ("borderline heart size" -> uncertain).
ANATOMY_BORDERLINE = r"borderline(?! enlarg)|prominent"
ANATOMY_NORMAL = (
    r"normal|within normal limits|unremarkable|not (?:\w+ )?enlarged|nonenlarged|non enlarged|"
    r"not (?:\w+ )?large|no (?:\w+ )?enlargement|upper limits? of normal"
)
ANATOMY_ENLARGED = r"enlarg\w*|large|increased|widen\w*"

# Negation cues that come BEFORE the mention (their scope runs forward to the clause end).
PRE_NEGATION: tuple[str, ...] = (
    r"no",
    r"not",
    r"without",
    r"negative for",
    r"free of",
    r"clear of",
    r"absence of",
    r"absent",
    r"resolution of",
    r"resolved",
    r"removal of",
    r"removed",
    r"nor",
    r"neither",
    r"lack of",
    r"ruled out",
    r"unlikely",
)
# Negation cues that come AFTER the mention ("effusion is not seen", "effusion has resolved").
POST_NEGATION: tuple[str, ...] = (
    r"(?:is |are |was |were |has been |have been )?(?:not|no longer) (?:\w+ ){0,2}?"
    r"(?:seen|identified|visualized|visible|demonstrated|appreciated|evident|present|noted|"
    r"detected|apparent|shown|excluded|suspected)(?! (?:on|in) (?:the )?(?:prior|previous|comparison))",
    r"(?:has |have )?(?:resolved|cleared|disappeared)",
    r"(?:has |have )?been (?:removed|resolved|excluded|ruled out)",
    r"(?:is |are )?(?:absent|unlikely|ruled out)",
)
# Hedges that contain a negation word: checked first so they are not read as negations.
NEGATED_HEDGES: tuple[str, ...] = (
    r"(?:can ?not|can't|could not|couldn't|does not|doesn't) (?:be )?(?:\w+ )?(?:be )?"
    r"(?:exclude[ds]?|rule[ds]? out|ruled out)",
    r"(?:difficult|hard|unable) to (?:\w+ )?(?:exclude|rule out)",
    r"not (?:\w+ )?(?:excluded|ruled out)",
)
# Hedges that come BEFORE the mention (scope runs forward to the clause end).
PRE_UNCERTAINTY: tuple[str, ...] = (
    r"may",
    r"might",
    r"could",
    r"can be",
    r"possibl[ey]",
    r"probabl[ey]",
    r"likely",
    r"presum\w+",
    r"perhaps",
    r"questionabl[ey]",
    r"question(?:ed| of)?",
    r"suspect(?:ed)?",
    r"suspicious (?:for|of)",
    r"suggest(?:s|ing|ed|ive)?(?: of)?",
    r"concern(?:ing)? for",
    r"worrisome for",
    r"differential(?: diagnosis)?(?: considerations?)?(?: includes?| of)?",
    r"consider(?:ed|ation)?",
    r"favou?r(?:ed|s)?",
    r"equivocal",
    r"indeterminate",
    r"correlat\w+(?: clinically)? (?:for|with)",
    r"evaluat\w+ for",
    r"(?:to )?(?:exclude|rule out)",
    r"r/o",
)
# Hedges that come AFTER the mention ("pneumonia is possible", "effusion?").
POST_UNCERTAINTY: tuple[str, ...] = (
    r"(?:\w+ ){0,4}?(?:is|are|was|were|remains?) (?:also |still |more |most |less )?(?:possible|possibly "
    r"present|probable|probably present|likely|suspected|questioned|questionable|a possibility|"
    r"a consideration|considered|favou?red|not excluded)",
    r"(?:possible|suspected|questioned|not excluded)",
    r"(?:\w+ ){0,4}?(?:may|might|could) (?:also )?(?:be )?(?:present|seen)",
    r"\?",
)
# Words that put two findings forward as alternatives: "atelectasis or consolidation".
ALTERNATIVE = r"(?:(?<!\w)(?:or|versus|vs\.?|and/or|alternatively)(?!\w)|/)"

# Phrases that look like negations but mean "still there": "no change in the effusion".
PSEUDO_NEGATION: tuple[str, ...] = (
    r"no (?:significant |appreciable |substantial |interval |definite )?(?:change|increase|decrease|"
    r"worsening|improvement|progression)",
    r"not (?:significantly |substantially |appreciably )?(?:changed|increased|decreased|improved|worsened)",
    r"without (?:significant |appreciable |interval )?(?:change|progression)",
    r"not only",
)

# Words that end the scope of any cue (a new clause starts after them).
SCOPE_END: tuple[str, ...] = (
    r";",
    r":",
    r"but",
    r"however",
    r"although",
    r"though",
    r"whereas",
    r"while",
    r"yet",
    r"except(?: for)?",
    r"aside from",
    r"apart from",
    r"other than",
    r"with the exception of",
    r"otherwise",
    r"which",
    r"that (?:is|are|may|could|might)",
)
# A comma or "and" followed by one of these starts a new, positively stated item:
# "no pneumothorax, small left effusion" (scope of "no" ends before "small").
NEW_ITEM = (
    r"(?:,|\band\b)\s+(?:there|mild|mildly|minimal|small|moderate|moderately|severe|trace|"
    r"persistent|stable|unchanged|residual|chronic|increased|increasing|decreased|improved|"
    r"improving|worsening|worsened|slight|slightly|subtle|new|interval|redemonstrat\w+|"
    r"possible|probable|likely|questionable)\b"
    # "no effusion seen, small nodule at the right apex": the negated item was closed by its verb.
    r"|\b(?:seen|identified|noted|present|demonstrated|visualized|appreciated|evident)\s*,"
)

# Abbreviations whose full stop does not end a sentence.
ABBREVIATIONS = ("dr", "mr", "mrs", "ms", "vs", "approx", "e.g", "i.e", "etc", "fig", "st", "cf")


# --------------------------------------------------------------------------------------------
# Compilation (once, at import).
# --------------------------------------------------------------------------------------------


def _phrase(p: str) -> str:
    """Phrase fragment -> regex that matches whole words; " ?" is an optional space, " " a space."""
    body = p.replace(" ?", r"[\s\-]*").replace(" ", r"[\s\-]+")
    left = r"(?<!\w)" if (p[0].isalnum() or p[0] == "(") else ""
    return rf"{left}(?:{body})(?!\w)"


def _alt(phrases: Sequence[str]) -> str:
    return "|".join(_phrase(p) for p in phrases)


_MENTION_RES: dict[str, re.Pattern[str]] = {
    obs: re.compile(_alt(phrases)) for obs, phrases in MENTIONS.items()
}
_ANATOMY_RES: dict[str, re.Pattern[str]] = {obs: re.compile(_alt(p)) for obs, p in ANATOMY.items()}
_ANATOMY_STATE_RE = re.compile(
    rf"(?<!\w)(?:(?P<normal>{ANATOMY_NORMAL})|(?P<border>{ANATOMY_BORDERLINE})"
    rf"|(?P<large>{ANATOMY_ENLARGED}))(?!\w)"
)
_PRE_NEG_RE = re.compile(_alt(PRE_NEGATION))
# Post-mention cues may sit a few words away: "effusion or pneumothorax is not seen".
_POST_NEG_RE = re.compile(r"^(?P<gap>.{0,45}?)(?:" + _alt(POST_NEGATION) + ")")
_NEG_HEDGE_RE = re.compile(_alt(NEGATED_HEDGES))
_POST_NEG_HEDGE_RE = re.compile(r"^(?P<gap>.{0,45}?)(?:" + _alt(NEGATED_HEDGES) + ")")
_LIST_WORD_RE = re.compile(r"\b(?:or|nor|and)\b")
_PRE_UNC_RE = re.compile(_alt(PRE_UNCERTAINTY))
_POST_UNC_RE = re.compile(r"^[\s,]*(?:" + _alt(POST_UNCERTAINTY) + ")")
_ALT_BEFORE_RE = re.compile(rf"{ALTERNATIVE}\s*(?:[\w\-]+\s+){{0,3}}$")
_ALT_AFTER_RE = re.compile(rf"^\s*,?\s*{ALTERNATIVE}")
_PSEUDO_NEG_RE = re.compile(_alt(PSEUDO_NEGATION))
_SCOPE_END_RE = re.compile(_alt(SCOPE_END))
_NEW_ITEM_RE = re.compile(NEW_ITEM)

_ABBREV_RE = re.compile(r"\b(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")\.$", re.IGNORECASE)
# Sentence ends: ". " / "? " / "! " (or a full stop glued to the next capitalised word), newlines,
# and numbered-list markers ("1. ", "2) ") at the start of the text or after a sentence end.
_SENT_END_RE = re.compile(r"(?<=[.!?])\s+|(?<=[A-Za-z]\.)(?=[A-Z][a-z])|\n+")
_LIST_MARKER_RE = re.compile(r"(?:^|\s)\(?\d{1,2}[.)](?=\s|[A-Za-z])\s*")


def split_sentences(text: str) -> list[str]:
    """Report text -> sentences (list markers removed, XXXX masks kept as text)."""
    if not isinstance(text, str):
        raise TypeError(f"report text must be str, got {type(text).__name__}")
    # Numbered-list markers become sentence breaks: "1. A. 2. B" and "A 2. B" (no full stop).
    text = _LIST_MARKER_RE.sub("\n", text)
    pieces: list[str] = []
    buf = ""
    for part in _SENT_END_RE.split(text):
        if not part or not part.strip():
            continue
        buf = f"{buf} {part}" if buf else part
        if _ABBREV_RE.search(buf.rstrip()):
            continue  # "Dr. Smith", "atelectasis vs. consolidation": not a sentence end
        pieces.append(buf.strip())
        buf = ""
    if buf.strip():
        pieces.append(buf.strip())
    return [p for p in pieces if re.search(r"\w", p)]


def _clauses(sentence: str) -> list[str]:
    """Lower-cased sentence -> clauses; no cue's scope crosses a clause boundary."""
    out, start = [], 0
    for m in _SCOPE_END_RE.finditer(sentence):
        out.append(sentence[start : m.start()])
        start = m.end()
    out.append(sentence[start:])
    return [c for c in out if c.strip()]


def _find_mentions(clause: str) -> list[tuple[str, int, int]]:
    """All (observation, start, end) mention spans in a clause."""
    found = []
    for obs, rx in _MENTION_RES.items():
        found.extend((obs, m.start(), m.end()) for m in rx.finditer(clause))
    return found


def _mask_pseudo(clause: str) -> str:
    """Blank out pseudo-negations ("no change in") so their "no" is not read as a negation."""
    return _PSEUDO_NEG_RE.sub(lambda m: " " * len(m.group()), clause)


def _last_cue_before(rx: re.Pattern[str], pre: str) -> re.Match[str] | None:
    last = None
    for m in rx.finditer(pre):
        last = m
    if last is None:
        return None
    between = pre[last.end() :]
    if _NEW_ITEM_RE.search(between):
        return None  # a new, positively stated item starts between the cue and the mention
    return last


# Internal per-mention code for "uncertain only because it is named as one of several
# alternatives" ("atelectasis or scarring"); reported as -1, kept apart for label_with_alternatives.
_ALTERNATIVE_ONLY = -2


def _post_cue(rx: re.Pattern[str], post: str) -> bool:
    """A cue after the mention that still refers to it: across a comma only inside a list
    ("consolidation, effusion, or pneumothorax is not seen"), not into the next item
    ("small effusion, pneumothorax is not seen")."""
    m = rx.search(post)
    if m is None:
        return False
    gap = m.group("gap")
    return "," not in gap or bool(_LIST_WORD_RE.search(gap))


def _classify(clause: str, start: int, end: int) -> int:
    """Label one mention inside its clause: 1, 0, -1 (hedged) or _ALTERNATIVE_ONLY."""
    pre, post = clause[:start], clause[end:]
    if _last_cue_before(_NEG_HEDGE_RE, pre) or _post_cue(_POST_NEG_HEDGE_RE, post):
        return -1  # "cannot exclude": a hedge, although it contains a negation word
    if _last_cue_before(_PRE_NEG_RE, pre) or _post_cue(_POST_NEG_RE, post):
        return 0
    if _last_cue_before(_PRE_UNC_RE, pre) or _POST_UNC_RE.search(post):
        return -1
    if _ALT_BEFORE_RE.search(pre) or _ALT_AFTER_RE.search(post):
        return _ALTERNATIVE_ONLY
    return 1


def _classify_anatomy(clause: str, start: int, end: int) -> int | None:
    """Heart/mediastinum phrase: 0 if said normal, 1 if enlarged, -1 if borderline, else None."""
    post = clause[end:]
    pre_words = " ".join(clause[:start].split()[-3:])  # "normal heart size", "enlarged heart"
    for text in (post, pre_words):
        m = _ANATOMY_STATE_RE.search(text)
        if m is None:
            continue
        if m.group("normal"):
            return 0
        if m.group("border"):
            return -1
        hedged = _last_cue_before(_PRE_UNC_RE, clause[:start]) or _PRE_UNC_RE.search(text[: m.start()])
        return -1 if hedged else 1
    return None


def _combine(values: list[int]) -> int | None:
    """CheXpert combination of several mentions: positive > uncertain > negative."""
    if not values:
        return None
    if 1 in values:
        return 1
    if _ALTERNATIVE_ONLY in values:
        return _ALTERNATIVE_ONLY
    if -1 in values:
        return -1
    return 0


def _label_codes(text: str) -> dict[str, int | None]:
    """Per-observation code (1, 0, -1, _ALTERNATIVE_ONLY or None) before the public mapping."""
    found: dict[str, list[int]] = {obs: [] for obs in CHEXPERT_14}
    for sentence in split_sentences(text):
        for clause in _clauses(_normalise(sentence)):
            masked = _mask_pseudo(clause)
            spans = _find_mentions(masked)
            for obs, s, e in spans:
                found[obs].append(_classify(masked, s, e))
            for obs, rx in _ANATOMY_RES.items():
                for m in rx.finditer(masked):
                    if any(s <= m.start() < e or m.start() <= s < m.end() for _, s, e in spans):
                        continue  # part of an explicit mention ("enlarged heart")
                    lab = _classify_anatomy(masked, m.start(), m.end())
                    if lab is not None:
                        found[obs].append(lab)
    codes = {obs: _combine(v) for obs, v in found.items()}
    others = [codes[o] for o in CHEXPERT_14 if o not in (NO_FINDING, SUPPORT_DEVICES)]
    # CheXpert: No Finding is positive when nothing but support devices is positive or uncertain.
    codes[NO_FINDING] = None if any(v not in (None, 0) for v in others) else 1
    return codes


def label_report(text: str) -> dict[str, int | None]:
    """One report -> {observation: 1 / 0 / -1 / None} for the 14 CheXpert observations."""
    return {obs: (-1 if v == _ALTERNATIVE_ONLY else v) for obs, v in _label_codes(text).items()}


def _normalise(sentence: str) -> str:
    """Lower-case and tidy whitespace; keep every character position meaningful."""
    s = sentence.lower()
    s = re.sub(r"\s+", " ", s)
    return s


def _as_text(t: object, i: int) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return ""  # a missing report (empty CSV cell) is an empty report
    if not isinstance(t, str):
        raise TypeError(f"report {i} must be str, got {type(t).__name__}")
    return t


def label_reports_with_alternatives(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reports -> (labels (N, 14) float with NaN = not mentioned, alternatives (N, 14) bool).

    ``alternatives[i, j]`` is True where label -1 comes only from the finding being named as one
    of several alternatives with no hedging word ("atelectasis or scarring", "effusion versus
    thickening") — a finer distinction than CheXpert's single "uncertain" value.
    """
    if isinstance(texts, str):
        raise TypeError("expected a sequence of report strings, got a single str")
    labels = np.full((len(texts), len(CHEXPERT_14)), np.nan)
    alternatives = np.zeros(labels.shape, dtype=bool)
    for i, t in enumerate(texts):
        codes = _label_codes(_as_text(t, i))
        for j, obs in enumerate(CHEXPERT_14):
            v = codes[obs]
            if v == _ALTERNATIVE_ONLY:
                labels[i, j], alternatives[i, j] = -1, True
            elif v is not None:
                labels[i, j] = v
    return labels, alternatives


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """Reports -> (N, 14) float array in CHEXPERT_14 order; NaN = not mentioned."""
    return label_reports_with_alternatives(texts)[0]


class RuleLabeler:
    """Callable labeler interface shared with other labelers (e.g. CheXbert): texts -> (N, 14)."""

    name = "rules-v1"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return label_reports(texts)

    def label_with_alternatives(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Labels plus the "uncertain only as a named alternative" mask (see module docs)."""
        return label_reports_with_alternatives(texts)
