"""Prompts and token sequences of the report generator (tokenizer in, id lists and batches out).

The user turn is ``<image>`` + newline + the instruction (+ newline + the indication line when a
manifest column supplies one), wrapped in the tokenizer's chat template when it has one
(:func:`radgen.model.chat.chat_prompt`). The single ``<image>`` id is expanded to as many ids as
the projector emits tokens (:func:`~radgen.model.splice.expand_image_placeholder`). The target is
the findings text followed by the end-of-sequence token, which is what generation stops on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import Tensor

from eval.chexpert import CHEXPERT_14, NO_FINDING
from eval.chexpert.labeler import label_report

from radgen.model.findings_head import FINDINGS
from radgen.model.chat import chat_prompt
from radgen.model.splice import build_example, expand_image_placeholder, pad_batch

__all__ = ["PromptConfig", "ReportTokenizer", "findings_list_text", "positive_findings", "FIRST_LINE_END",
           "NO_FINDING_LINE", "tag_findings", "strip_finding_tags",
           "sentence_spans", "normal_sentences", "has_labels"]

FIRST_LINE_END = "\n"  # ends the stated findings line of a findings-first target
NO_FINDING_LINE = "No finding."  # the stated line of a film without findings


def has_labels(labels: dict | None) -> bool:
    """Whether a row carries any CheXpert label (a blank column is not a label)."""
    return bool(labels) and any(v is not None for v in labels.values())


def positive_findings(labels: dict | None) -> list[str]:
    """The observations labelled 1, CheXpert order, No Finding left out."""
    return [o for o in CHEXPERT_14 if o != NO_FINDING and (labels or {}).get(o) == 1]


def findings_list_text(labels: dict | None) -> str | None:
    """The target of the findings-list task: ``"Positive: Cardiomegaly, Pleural Effusion."``
    (:func:`positive_findings`) or ``"No finding."``; ``None`` for a row without labels."""
    if not has_labels(labels):
        return None
    pos = positive_findings(labels)
    return ("Positive: " + ", ".join(pos) + ".") if pos else NO_FINDING_LINE


def sentence_spans(text: str, start: int = 0) -> list[tuple[int, int]]:
    """``(begin, end)`` character spans of the sentences of ``text[start:]`` (split after ``.``,
    ``!`` or ``?`` followed by white space), as offsets into ``text``."""
    spans, pos = [], start
    for sent in re.split(r"(?<=[.!?])\s+", text[start:]):
        if not sent:
            continue
        b = text.index(sent, pos)
        pos = b + len(sent)
        spans.append((b, pos))
    return spans


_TAG = re.compile(r"\[(?:" + "|".join(re.escape(o) for o in FINDINGS) + r")\]\s*")


@lru_cache(maxsize=65536)
def _sentence_findings(sentence: str) -> frozenset[str]:
    """The findings the rule-based CheXpert labeler reads as positive in one sentence."""
    return frozenset(o for o, v in label_report(sentence).items() if v == 1 and o != NO_FINDING)


def tag_findings(text: str, labels: dict | None) -> str:
    """A findings text planned after its stated line: the sentences that state each positive
    finding come first, in the line's order (:func:`positive_findings`), each after its tag
    (``"[Edema] Moderate interstitial edema."``); the other sentences follow in their own order.

    A sentence states a finding when the rule-based CheXpert labeler
    (:func:`eval.chexpert.labeler.label_report`) reads it as positive for that finding; one that
    states two is tagged with the first of the line. A finding no sentence states (a parent label
    such as Lung Opacity) gets no tag. No knowledge of a report grammar is used. The writer then
    binds each stated finding to the sentence right after its tag, where in a free-order report it
    must find, among sentences that co-occur, which one each name of the line asks for. Rows
    without a positive finding: the text as it is. :func:`strip_finding_tags` undoes the tags."""
    pos = positive_findings(labels)
    text = text.strip()
    if not pos:
        return text
    sents = [text[b:e] for b, e in sentence_spans(text)]
    found = [_sentence_findings(s) for s in sents]
    used: set[int] = set()
    planned = []
    for o in pos:
        for i, s in enumerate(sents):
            if i not in used and o in found[i]:
                used.add(i)
                planned.append(f"[{o}] {s}")
    return " ".join(planned + [s for i, s in enumerate(sents) if i not in used])


def strip_finding_tags(text: str) -> str:
    """``text`` without the ``[Finding]`` tags of :func:`tag_findings` (only the 13 finding names
    count as tags; other brackets stay)."""
    return _TAG.sub("", text).strip()


def normal_sentences(reports: list[tuple[str, dict | None]]) -> frozenset[str]:
    """Every sentence of the reports of films labelled with no finding (``(text, labels)`` pairs;
    rows without labels are left out): the sentences that say nothing about a finding."""
    out = set()
    for text, labels in reports:
        if has_labels(labels) and not positive_findings(labels):
            text = text.strip()
            out.update(text[b:e] for b, e in sentence_spans(text))
    return frozenset(out)


@dataclass
class PromptConfig:
    instruction: str = "Write the findings section of the radiology report for this chest X-ray."
    indication: str = "Indication: {indication}"  # used only when a row has an indication
    image_token: str = "<image>"
    system: str | None = None  # None: no system turn; "default": the chat template's own; else that text

    def user_text(self, indication: str | None = None, instruction: str | None = None) -> str:
        text = f"{self.image_token}\n{instruction or self.instruction}"
        if indication and indication.strip():
            text += "\n" + self.indication.format(indication=indication.strip())
        return text

    def to_dict(self) -> dict:
        return asdict(self)


class ReportTokenizer:
    """Turns (indication, findings) pairs into model inputs for one tokenizer and image length."""

    def __init__(self, tokenizer, prompt: PromptConfig, image_token_id: int, n_image_tokens: int,
                 max_target_tokens: int = 256, findings_first: bool = False, first_line_weight: float = 1.0,
                 finding_sentence_weight: float = 1.0, finding_tags: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no end-of-sequence token")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.image_token_id = int(image_token_id)
        self.n_image_tokens = int(n_image_tokens)
        self.max_target_tokens = int(max_target_tokens)
        self.findings_first = bool(findings_first)
        self.first_line_weight = float(first_line_weight)
        self.finding_tags = bool(finding_tags)  # findings_first targets planned by tag_findings
        # loss weight of the sentences no normal report contains; the set comes from the training
        # reports (set_normal_sentences): without it every sentence weighs 1
        self.finding_sentence_weight = float(finding_sentence_weight)
        self.normal_sentences: frozenset[str] = frozenset()
        self._finding_positions: dict[str, list[int]] = {}  # per target text, for the current normal set
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._prompt_cache: dict[str | None, list[int]] = {}

    def prompt_text(self, indication: str | None = None, instruction: str | None = None) -> str:
        return chat_prompt(self.tokenizer, self.prompt.user_text(indication, instruction), system=self.prompt.system)

    def prompt_ids(self, indication: str | None = None, instruction: str | None = None) -> list[int]:
        """The prompt with its image placeholder expanded: ``n_image_tokens`` image ids in it.
        ``instruction`` replaces the configured one (another task on the same image)."""
        key = (indication or None, instruction or None)
        if key not in self._prompt_cache:
            ids = self.tokenizer(self.prompt_text(*key), add_special_tokens=False)["input_ids"]
            self._prompt_cache[key] = expand_image_placeholder(ids, self.image_token_id, self.n_image_tokens)
        return list(self._prompt_cache[key])

    def target_ids(self, text: str) -> list[int]:
        """Findings tokens (at most ``max_target_tokens - 1``) followed by EOS."""
        # Every token covers at least one character, so this cut never changes the result; it
        # keeps an absurdly long report (a megabyte) from being tokenised in full at every step.
        text = text.strip()[: 64 * self.max_target_tokens]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: self.max_target_tokens - 1] + [self.tokenizer.eos_token_id]

    def train_batch(self, targets: list[str], indications: list[str | None] | None = None,
                    instructions: list[str | None] | None = None) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` (B, L)."""
        indications = indications or [None] * len(targets)
        instructions = instructions or [None] * len(targets)
        prompts = [self.prompt_ids(ind, ins) for ind, ins in zip(indications, instructions)]
        tgts = [self.target_ids(t) for t in targets]
        pairs = [build_example(p, t) for p, t in zip(prompts, tgts)]
        batch = pad_batch([p[0] for p in pairs], self.pad_id, side="right", labels=[p[1] for p in pairs])
        by_line = self.findings_first and self.first_line_weight != 1.0
        by_sentence = self.finding_sentence_weight != 1.0 and bool(self.normal_sentences)
        if by_line or by_sentence:  # report targets only: another task's target weighs 1 throughout
            w = torch.ones(batch["labels"].shape)
            for b, (p, t, text, ins) in enumerate(zip(prompts, tgts, targets, instructions)):
                if ins is not None:
                    continue
                if by_sentence:
                    for i in self.finding_token_positions(text):
                        w[b, len(p) + i] = self.finding_sentence_weight
                if by_line:  # the stated findings line (see first_line_tokens)
                    w[b, len(p):len(p) + self.first_line_tokens(t)] = self.first_line_weight
            batch["label_weights"] = w
        return batch

    def set_normal_sentences(self, sentences: frozenset[str]) -> None:
        """The sentences of normal reports (:func:`normal_sentences` of the training rows): with
        ``finding_sentence_weight`` the target tokens of every other sentence weigh that much."""
        self.normal_sentences = frozenset(sentences)
        self._finding_positions.clear()

    def finding_token_positions(self, text: str) -> list[int]:
        """Positions in :meth:`target_ids` of ``text`` of the tokens that belong to a sentence of
        the findings that no normal report contains (the stated line of a findings-first target
        is not a sentence of the findings). A token that straddles a sentence boundary counts."""
        if text not in self._finding_positions:
            self._finding_positions[text] = self._finding_positions_uncached(text)
        return list(self._finding_positions[text])

    def _finding_positions_uncached(self, text: str) -> list[int]:
        text = text.strip()[: 64 * self.max_target_tokens]  # as target_ids cuts it
        start = text.index(FIRST_LINE_END) + 1 if self.findings_first and FIRST_LINE_END in text else 0
        spans = [(b, e) for b, e in sentence_spans(text, start) if text[b:e] not in self.normal_sentences]
        if not spans:
            return []
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [i for i, (a, z) in enumerate(offsets[: self.max_target_tokens - 1])
                if any(a < e and z > b for b, e in spans)]

    def first_line_tokens(self, target_ids: list[int]) -> int:
        """How many leading target tokens make up the stated findings line (up to and including the
        first token that holds its newline; 0 when there is none)."""
        for i, t in enumerate(target_ids):
            if FIRST_LINE_END in self.tokenizer.decode([t]):
                return i + 1
        return 0

    def generation_batch(self, indications: list[str | None], stated: list[str] | None = None) -> dict[str, Tensor]:
        """Left-padded prompts (B, L) for batched generation; ``stated`` lines (a findings head's)
        are appended as the start of the answer, so the model writes on after them."""
        prompts = [self.prompt_ids(ind) for ind in indications]
        if stated is not None:
            prompts = [p + self.stated_ids(line) for p, line in zip(prompts, stated)]
        return pad_batch(prompts, self.pad_id, side="left")

    def stated_ids(self, line: str) -> list[int]:
        """The ids of a stated findings line and its newline, as they begin a findings-first
        target (the line's tokens never merge across the newline: tested for the built-in LLM)."""
        return self.tokenizer(line.strip() + FIRST_LINE_END, add_special_tokens=False)["input_ids"]

    def report_target(self, text: str, labels: dict | None = None) -> str:
        """The target the model learns for a report: the findings text, or with ``findings_first``
        the line :func:`findings_list_text` of the row's labels, a newline, then the findings
        (with ``finding_tags``, planned by :func:`tag_findings`; rows without labels: the findings
        alone)."""
        if not self.findings_first:
            return text
        head = findings_list_text(labels)
        if head is None:
            return text
        body = tag_findings(text, labels) if self.finding_tags else text.strip()
        return f"{head}{FIRST_LINE_END}{body}"

    def decode(self, ids) -> str:
        """The generated findings text (with ``findings_first``, the stated list line removed:
        see :meth:`split_output`)."""
        return self.split_output(self.tokenizer.decode(ids, skip_special_tokens=True))[1]

    def split_output(self, text: str) -> tuple[str | None, str]:
        """``(stated findings line or None, findings)`` of a generated text (with ``finding_tags``,
        the tags removed from the findings)."""
        text = text.strip()
        head = None
        if self.findings_first and FIRST_LINE_END in text:
            first, body = text.split(FIRST_LINE_END, 1)
            if first.startswith(("Positive:", "No finding")):
                head, text = first.strip(), body.strip()
        return head, strip_finding_tags(text) if self.finding_tags else text
