"""Kozachenko-Leonenko differential-entropy regulariser (spreads features in a batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """``-mean(log(d_nn + eps))`` with ``d_nn`` each L2-normalised row's nearest-neighbour distance."""

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``x``: (B, D) features of one crop; returns a float32 scalar."""
        if x.shape[0] < 2:
            # No neighbour to measure: a 0 that stays attached to the graph (zero grads),
            # so backward() on it, alone or summed, works instead of producing NaN.
            return x.float().sum() * 0.0
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # (B, D)
            with torch.no_grad():  # the neighbour choice is discrete: no gradient through it
                dots = x @ x.t()  # (B, B)
                dots.fill_diagonal_(-1.0)  # a point is not its own neighbour
                nn_idx = dots.argmax(dim=1)  # (B,)
            dist = nn.PairwiseDistance(p=2, eps=eps)(x, x[nn_idx])  # (B,)
            return -torch.log(dist + eps).mean()
