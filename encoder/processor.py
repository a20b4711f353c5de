"""rad-dino preprocessing: shortest edge -> 518 (bicubic), centre crop 518, [0, 1], normalise.

Mirrors microsoft/rad-dino's ``BitImageProcessor`` (mean 0.5307, std 0.2583 on all three
channels, grayscale replicated to 3 channels) on float images, so images loaded by radgen (float
[0, 1], any bit depth) are not first squeezed through 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RadDinoProcessor", "RAD_DINO_MEAN", "RAD_DINO_STD"]

RAD_DINO_MEAN = 0.5307
RAD_DINO_STD = 0.2583


@dataclass
class RadDinoProcessor:
    shortest_edge: int = 518
    crop_size: int = 518
    mean: float = RAD_DINO_MEAN
    std: float = RAD_DINO_STD

    def resize_shape(self, h: int, w: int) -> tuple[int, int]:
        """Output size of the shortest-edge resize (the longer side truncated, as transformers does)."""
        if h <= w:
            return self.shortest_edge, int(self.shortest_edge * w / h)
        return int(self.shortest_edge * h / w), self.shortest_edge

    def one(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W) or (1|3, H, W) float in [0, 1] -> (3, crop, crop) normalised."""
        x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
        if not x.is_floating_point():  # a PIL image or uint8 array would clamp to a constant image
            raise ValueError(f"RadDinoProcessor expects float pixels in [0, 1], got {x.dtype} (divide 8-bit "
                             "images by 255, or read them with radgen.data.images.load_image)")
        x = x.float()
        if x.dim() == 2:
            x = x[None]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        h, w = x.shape[-2:]
        nh, nw = self.resize_shape(h, w)
        # antialias when shrinking, like PIL's bicubic filter
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=True)[0].clamp(0, 1)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        if top < 0 or left < 0:
            raise ValueError(f"resized image {nh}x{nw} smaller than crop {self.crop_size}")
        x = x[:, top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean) / self.std

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """A batch: (B, 3, crop, crop)."""
        return torch.stack([self.one(im) for im in images])
