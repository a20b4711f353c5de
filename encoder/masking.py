"""Block-wise patch masking for the iBOT objective (BEiT / iBOT / DINOv2 recipe).

Masked image modelling on a ViT hides whole rectangles of patches rather than scattered single
patches: a scattered patch can be inferred from its visible neighbours by interpolation, a block
cannot, so blocks force the student to use context. All randomness comes from an explicit
``torch.Generator`` so a batch's masks can be reproduced exactly on resume.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_mask", "sample_masks", "masked_indices"]

# Tries to place one block before giving up on blocks altogether (DINOv2 uses 10).
_TRIES_PER_BLOCK = 10


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Integer uniform in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (1,), generator=generator).item())


def _place_block(
    mask: Tensor,  # (H, W) bool, modified in place
    budget: int,
    log_aspect: tuple[float, float],
    min_block: int,
    generator: torch.Generator,
) -> int:
    """Mask one random rectangle adding between 1 and ``budget`` new patches; return how many."""
    H, W = mask.shape
    for _ in range(_TRIES_PER_BLOCK):
        area = _uniform(generator, min_block, budget)
        aspect = math.exp(_uniform(generator, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (1 <= h <= H and 1 <= w <= W):
            continue
        top = _randint(generator, 0, H - h + 1)
        left = _randint(generator, 0, W - w + 1)
        region = mask[top : top + h, left : left + w]  # a view: filling it writes into mask
        new = h * w - int(region.sum())
        # Overlap with earlier blocks is allowed, but the total must never overshoot the target.
        if 0 < new <= budget:
            region.fill_(True)
            return new
    return 0


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    generator: torch.Generator,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    min_block: int = 4,
    max_block: int | None = None,
) -> Tensor:
    """Mask exactly ``n_masked`` patches of an ``(H, W)`` grid, mostly as random rectangles.

    Rectangles have area uniform in ``[min_block, min(max_block, remaining)]`` and log-uniform
    aspect ratio in ``[min_aspect, max_aspect or 1/min_aspect]``. When no further block fits
    (bounded tries), the remainder is topped up with random single patches.
    Returns a bool tensor (H, W).
    """
    H, W = grid
    N = H * W
    if not 0 <= n_masked <= N:
        raise ValueError(f"n_masked={n_masked} outside [0, {N}] for grid {grid}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    max_block = N if max_block is None else max_block

    mask = torch.zeros(H, W, dtype=torch.bool)
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        if budget < min_block:
            break
        added = _place_block(mask, budget, log_aspect, min_block, generator)
        if added == 0:
            break
        count += added

    deficit = n_masked - count
    if deficit > 0:
        free = (~mask).flatten().nonzero().squeeze(1)  # (N - count,)
        pick = free[torch.randperm(free.numel(), generator=generator)[:deficit]]
        mask.view(-1)[pick] = True
    return mask


def sample_masks(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    min_aspect: float = 0.3,
    min_block: int = 4,
    max_block: int | None = None,
) -> Tensor:
    """Masks for a batch of global crops, as in DINOv2's collate. Returns bool (B, H*W).

    ``round(B * mask_probability)`` images are masked; image ``i`` of those gets a ratio drawn
    uniformly in the ``i``-th of equal sub-intervals of ``mask_ratio_range`` (so ratios are spread
    over the whole range, not clustered), the others get no mask; rows are then shuffled.
    ``max_block`` defaults to half the grid (DINOv2). ``generator=None`` uses torch's global RNG.
    """
    g = torch.default_generator if generator is None else generator
    H, W = grid
    N = H * W
    lo, hi = mask_ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"bad mask_ratio_range {mask_ratio_range}")
    max_block = N // 2 if max_block is None else max_block

    n_images = round(batch_size * mask_probability)
    edges = torch.linspace(lo, hi, n_images + 1, dtype=torch.float64).tolist()
    masks = torch.zeros(batch_size, N, dtype=torch.bool)
    for i in range(n_images):
        ratio = _uniform(g, edges[i], edges[i + 1])
        n = round(N * ratio)
        mask = block_mask(grid, n, g, min_aspect, min_block=min_block, max_block=max_block)
        masks[i] = mask.flatten()  # (N,)
    return masks[torch.randperm(batch_size, generator=g)]


def masked_indices(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of masked patches in ``masks`` (B, N) and their per-image loss weights.

    Returns ``(flat_idx (M,) long, weights (M,) float)`` where ``flat_idx`` indexes
    ``masks.flatten()`` and each weight is 1 / (masked patches in its row), so every masked image
    contributes equally to the iBOT loss whatever its mask ratio.
    """
    masks = masks.bool()
    flat_idx = masks.flatten().nonzero().squeeze(1)  # (M,)
    per_row = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # (B, 1)
    weights = (1.0 / per_row).expand_as(masks)[masks]  # (M,)
    return flat_idx, weights
