"""A report never says the same sentence twice: stop a row of greedy decoding when it repeats one.

A writer trained for few steps sometimes fails to end its report and loops ("No displaced rib
fracture." again and again) until the token limit: the batch then runs to that limit, and the
text is scored with the loop in it. :class:`RepeatedSentenceStop` ends a row as soon as it
completes a sentence it has already written (a per-row HF stopping criterion), and
:func:`drop_repeated_sentences` removes that repeat from the text. ``generate.stop_on_repeat``
turns both on (``radgen generate --keep-repeats`` off).
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from radgen.model.prompt import sentence_spans

__all__ = ["RepeatedSentenceStop", "drop_repeated_sentences", "ends_with_a_repeat"]


def _sentences(text: str) -> list[str]:
    return [text[b:e].strip() for b, e in sentence_spans(text)]


def ends_with_a_repeat(text: str) -> bool:
    """Whether the last sentence of ``text`` is complete and said before in it."""
    text = text.strip()
    if not text.endswith((".", "!", "?")):
        return False
    sents = _sentences(text)
    return len(sents) > 1 and sents[-1] in sents[:-1]


def drop_repeated_sentences(text: str) -> str:
    """``text`` with every sentence after its first occurrence removed (order kept)."""
    seen, out = set(), []
    for s in _sentences(text.strip()):
        if s not in seen:
            seen.add(s)
            out.append(s)
    return " ".join(out)


class RepeatedSentenceStop(StoppingCriteria):
    """Per-row stop: True for a row whose generated text (``input_ids`` (B, T): the new tokens)
    has just completed a sentence it already wrote."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # Only a row whose newest token closes a sentence can have just completed a repeat; the
        # others are not decoded (this runs at every decoding step).
        last = self.tokenizer.batch_decode(input_ids[:, -1:], skip_special_tokens=True)
        done = [any(c in t for c in ".!?") and
                ends_with_a_repeat(self.tokenizer.decode(row, skip_special_tokens=True))
                for t, row in zip(last, input_ids)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
