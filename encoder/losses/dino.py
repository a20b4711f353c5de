"""DINOv2 CLS-token self-distillation loss (multi-crop pairing)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import CenteredTeacherLoss, soft_cross_entropy

__all__ = ["DINOLoss"]


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between student crops and the teacher's two global crops.

    Pairs: global crop i with teacher global 1-i (never its own view); every local crop
    with both teacher globals. The loss is the plain mean over these 2 + 2L pairs, each
    pair being a batch mean.
    """

    def forward(self, student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        """``student_logits``: [g0, g1, l0, ..., l_{L-1}], each (B, K); ``teacher_probs``: [t0, t1], each (B, K)."""
        if len(teacher_probs) != 2:
            raise ValueError(f"expected 2 teacher global crops, got {len(teacher_probs)}")
        if len(student_logits) < 2:
            raise ValueError(f"expected >= 2 student crops (2 globals first), got {len(student_logits)}")
        t0, t1 = teacher_probs
        s_globals, s_locals = student_logits[:2], student_logits[2:]

        def pair(s: Tensor, t: Tensor) -> Tensor:
            return soft_cross_entropy(s, t, self.student_temp).mean()  # scalar

        terms = [pair(s_globals[0], t1), pair(s_globals[1], t0)]
        for s in s_locals:
            terms += [pair(s, t0), pair(s, t1)]
        return torch.stack(terms).mean()
