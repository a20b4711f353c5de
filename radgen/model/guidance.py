"""Line guidance: make the writer follow the stated findings line (classifier-free guidance on it).

A run with a findings head states each film's findings line and the LLM writes the report on
from it. A short-trained writer follows that line only in part (told "Positive: Pleural
Effusion." it may still write "No pleural effusion"). Line guidance decodes every film twice in
one batch: after its stated line (*cond*) and after the neutral line "No finding." (*uncond*),
and picks each next token from

    log p = log p_uncond + s * (log p_cond - log p_uncond)

(classifier-free guidance as used for language models, Sanchez et al. 2023, "Stay on topic with
classifier-free guidance"; the condition here is the stated line). ``s = 1`` is plain decoding;
``s > 1`` moves each step away from what the writer would say of a normal film, towards what
the line implies. For a film whose line is "No finding." both rows are the same and nothing
changes, so guidance cannot add a finding to a film the head calls normal.

Both rows of a pair get the guided scores, so greedy (and beam) decoding picks the same token for
both and they stay in step through HF ``generate`` with its KV cache; sampling would not keep
them in step and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["guided_scores", "PairedGuidance"]


def guided_scores(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Guided log-probabilities (B, V) from the conditional and unconditional scores (B, V):
    ``log_softmax(uncond) + scale * (log_softmax(cond) - log_softmax(uncond))``."""
    lc = torch.log_softmax(cond.float(), dim=-1).clamp(min=-1e4)  # no inf - inf where a row masks a token
    lu = torch.log_softmax(uncond.float(), dim=-1).clamp(min=-1e4)
    return lu + scale * (lc - lu)


class PairedGuidance:
    """A ``transformers`` logits processor for a batch of ``2B`` rows: rows ``0..B-1`` conditional,
    rows ``B..2B-1`` their unconditional partners (same order). Both halves get the guided scores
    (or the one half's where ``scale`` is 1)."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # HF LogitsProcessor protocol
        n = scores.shape[0]
        if n % 2:
            raise ValueError(f"line guidance needs an even batch of (cond, uncond) rows, got {n}")
        b = n // 2
        cond, uncond = scores[:b], scores[b:]
        guided = guided_scores(cond, uncond, self.scale)
        # a token masked (-inf) in either row of the pair is not produced (suppressed ids are masked
        # in both; the clamp in guided_scores would otherwise give a one-sided mask a huge lead)
        guided = guided.masked_fill(torch.isneginf(cond) | torch.isneginf(uncond), float("-inf"))
        return torch.cat([guided, guided]).to(scores.dtype)
