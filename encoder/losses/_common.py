"""Pieces shared by the DINO (CLS) and iBOT (patch) losses: teacher centring, Sinkhorn-Knopp, soft CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dist import all_reduce_max, all_reduce_sum

__all__ = ["soft_cross_entropy", "sinkhorn_knopp", "CenteredTeacherLoss"]


def soft_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Per-row ``-sum_k t_k * log_softmax(s / student_temp)_k``; (..., K) -> (...)."""
    # float32: log_softmax of sharp logits under autocast loses precision in half.
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (..., K)
    return -(teacher_probs.float() * log_p).sum(dim=-1)  # (...)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp (SwAV / DINOv2) soft assignments; (N, K) logits -> (N, K) rows summing to 1.

    Samples may be split across processes: totals and prototype (row) sums are all-reduced,
    so the equipartition holds over the global batch.
    """
    logits = teacher_logits.float()  # (N, K)
    k = logits.shape[1]
    # Subtracting one global constant leaves the result unchanged (the total is normalised
    # away) but keeps exp() from overflowing at small temperatures.
    local_max = logits.amax() if logits.numel() else logits.new_tensor(float("-inf"))
    shift = all_reduce_max(local_max.clone())
    q = torch.exp((logits - shift) / teacher_temp).t()  # (K, N)
    n_total = all_reduce_sum(logits.new_full((), float(logits.shape[0])))  # global sample count (a fill: no host copy)

    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # (K, 1): each prototype ...
        q /= k  # ... gets mass 1/K
        q /= q.sum(dim=0, keepdim=True)  # (1, N): each sample ...
        q /= n_total  # ... gets mass 1/N (columns are local, no reduce needed)
    q *= n_total  # each sample's assignment now sums to 1
    return q.t()  # (N, K)


class CenteredTeacherLoss(nn.Module):
    """Base for self-distillation losses: holds the teacher centre and the teacher-side transforms."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((t - center) / teacher_temp)``; (..., K) -> (..., K)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp teacher targets (no centre needed); (N, K) -> (N, K)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the (global) batch mean of raw teacher logits: ``c = c*m + mean*(1-m)``.

        Call AFTER computing this step's teacher probabilities: the targets use the centre
        from before the update. ``teacher_logits`` is (..., K); all leading dims are samples.
        """
        flat = teacher_logits.detach().float().reshape(-1, self.out_dim)  # (N, K)
        # Sum and count in one buffer so a single collective handles uneven per-rank sizes.
        stats = torch.cat([flat.sum(dim=0), flat.new_full((1,), float(flat.shape[0]))])  # (K + 1,)
        all_reduce_sum(stats)
        count = stats[-1]
        batch_mean = (stats[:-1] / count.clamp(min=1)).unsqueeze(0)  # (1, K)
        m = self.center_momentum
        old = self.center.clone()
        self.center.mul_(m).add_(batch_mean.to(self.center.dtype), alpha=1 - m)
        # Nothing to average (e.g. no masked patches anywhere): keep the centre. Decided on the
        # device, so the step does not wait here for the teacher's forward to finish.
        self.center.copy_(torch.where(count > 0, self.center, old))
