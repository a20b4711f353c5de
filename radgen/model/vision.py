"""The frozen vision side: a RAD-DINO encoder from any spec, and the tokens the projector reads.

``FrozenVision(encoder, VisionFeatures(...))`` runs the encoder in eval mode without gradients and
returns one token sequence per image, ``(B, T, C)``, chosen by config:

* ``layer``: which block's output (``-1``: the last; ``-2``: the penultimate, as LLaVA);
* ``select``: ``"patch"`` (patch tokens only, as LLaVA-Rad and MAIRA-2) or ``"cls+patch"``
  (CLS first, then the patches); registers are never passed on;
* ``norm``: through the encoder's final LayerNorm or not. transformers' LLaVA reads a Dinov2
  layer's hidden state *before* that norm, so ``norm=False`` is what a LLaVA export can express;
* ``pool``: average-pool the patch grid to ``pool x pool`` (e.g. 37x37 -> 12x12) so a small
  machine trains on fewer image tokens; ``None`` keeps every patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoder.vit import ViTEncoder

__all__ = ["VisionFeatures", "FrozenVision", "SELECTS"]

SELECTS = ("patch", "cls+patch")


@dataclass
class VisionFeatures:
    """Which encoder tokens the projector reads (stored in every run's ``model.json``)."""

    layer: int = -1
    select: str = "patch"
    norm: bool = False
    pool: int | None = None

    def __post_init__(self) -> None:
        if self.select not in SELECTS:
            raise ValueError(f"vision select must be one of {SELECTS}, got {self.select!r}")
        if self.pool is not None and int(self.pool) < 1:
            raise ValueError(f"vision pool must be a positive grid side or null, got {self.pool}")

    def to_dict(self) -> dict:
        return asdict(self)


class FrozenVision(nn.Module):
    """``forward(images (B, 3, S, S)) -> tokens (B, T, C)``, no gradients, encoder kept in eval.

    ``T = (1 if select == "cls+patch" else 0) + (pool**2 if pool else (S // patch)**2)``.
    """

    def __init__(self, encoder: ViTEncoder, features: VisionFeatures):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.features = features
        depth = len(encoder.blocks)
        if not -depth <= features.layer < depth:
            raise ValueError(f"vision layer {features.layer} out of range for an encoder with {depth} blocks")
        self.block = features.layer % depth

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def num_tokens(self, image_size: int) -> int:
        """How many tokens one ``image_size`` x ``image_size`` image gives."""
        side = image_size // self.encoder.cfg.patch_size
        n = self.features.pool ** 2 if self.features.pool else side * side
        return n + (1 if self.features.select == "cls+patch" else 0)

    def train(self, mode: bool = True) -> "FrozenVision":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop-path, whatever the parent's mode
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        param = next(self.encoder.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        out = self.encoder.get_intermediate_layers(x, [self.block], norm=self.features.norm)[0]
        patches = out["patches"]  # (B, h*w, C)
        if self.features.pool:
            B, N, C = patches.shape
            h, w = self.encoder.grid_size(x.shape[-2], x.shape[-1])
            grid = patches.transpose(1, 2).reshape(B, C, h, w)
            patches = F.adaptive_avg_pool2d(grid, self.features.pool).flatten(2).transpose(1, 2)
        if self.features.select == "cls+patch":
            patches = torch.cat([out["cls"][:, None], patches], dim=1)
        return patches
