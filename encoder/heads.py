"""Projection heads for self-distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototype layer (``last_layer``, g fixed at 1).

    With unit-norm bottleneck and unit-norm prototype rows, the logits are cosine similarities.
    Training may freeze ``last_layer`` for the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.mlp = self._build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)

        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        _init_linear(last)  # before weight_norm: afterwards .weight is a computed property
        self.last_layer = weight_norm(last)  # weight = g * v / ||v||, per output row
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        g.data.fill_(1.0)
        g.requires_grad_(False)  # fixed unit-norm prototypes

    @staticmethod
    def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Sequential:
        if nlayers == 1:
            return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (..., in_dim) -> (..., out_dim)."""
        lead = x.shape[:-1]
        h = self.mlp(x.reshape(-1, x.shape[-1]))  # (M, bottleneck); flat so BatchNorm1d works
        # Larger eps in half precision so tiny norms don't underflow to 0 / inf.
        eps = 1e-6 if h.dtype == torch.float16 else 1e-12
        h = F.normalize(h, p=2, dim=-1, eps=eps)
        out = self.last_layer(h)  # (M, out_dim)
        return out.reshape(*lead, out.shape[-1])

