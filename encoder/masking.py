"""Block-wise patch masking for the iBOT objective (BEiT / iBOT / DINOv2 recipe).

Masked image modelling on a ViT hides whole rectangles of patches rather than scattered single
patches: a scattered patch can be inferred from its visible neighbours by interpolation, a block
cannot, so blocks force the student to use context. All randomness comes from an explicit
``torch.Generator`` so a batch's masks can be reproduced exactly on resume.

Two styles (``style=``):

``"dinov2"`` (default)
    The distribution of DINOv2's ``MaskingGenerator`` + ``collate_data_and_cast``:
    ``int(B * p)`` masked images, target ``int(N * ratio)`` patches (ratio and product in float32,
    as DINOv2's ``torch.linspace`` gives), blocks strictly smaller than the grid in both directions
    (``h < H and w < W``), blocks keep being tried while patches remain to mask (also when fewer
    than ``min_block`` remain), and when ten tries in a row place nothing the mask stops short of
    the target (no top-up). The default largest block is DINOv2's
    ``0.5 * img_size // patch_size * img_size // patch_size`` (see :func:`dinov2_max_block`).
``"legacy"``
    This module's behaviour before the DINOv2 style existed, kept bit for bit so runs started
    with it resume exactly: ``round`` instead of ``int`` for both counts, blocks may span the whole
    grid, block placement stops when fewer than ``min_block`` patches remain, and the mask is
    topped up with random single patches to exactly the target; largest block ``N // 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MASK_STYLES", "block_mask", "sample_masks", "masked_indices", "dinov2_max_block"]

MASK_STYLES = ("dinov2", "legacy")

# Tries to place one block before giving up on blocks altogether (DINOv2 uses 10).
_TRIES_PER_BLOCK = 10


def _check_style(style: str) -> None:
    if style not in MASK_STYLES:
        raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Integer uniform in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, (1,), generator=generator).item())


def dinov2_max_block(
    grid: tuple[int, int], img_size: int | None = None, patch_size: int | None = None
) -> int:
    """DINOv2's default largest block, ``0.5 * img_size // patch_size * img_size // patch_size``.

    Python evaluates that left to right, ``((0.5 * img // p) * img) // p``, not ``0.5 * N``. With
    ``img_size`` and ``patch_size`` given the expression is evaluated literally. Without them the
    crop is taken to be a whole number of patches (``img = side * p``, which ``train.py``
    enforces); the expression then reduces to ``(side // 2) * side`` — for a grid ``(H, W)``,
    ``(H // 2) * W``. That equals ``N // 2`` for an even side and is smaller for an odd one:
    666 instead of 684 at 37 x 37 (518 px, patch 14).
    """
    H, W = grid
    if img_size is not None and patch_size is not None:
        return int(0.5 * img_size // patch_size * img_size // patch_size)
    return (H // 2) * W


def _place_block(
    mask: Tensor,  # (H, W) bool, modified in place
    budget: float,
    log_aspect: tuple[float, float],
    min_block: int,
    generator: torch.Generator,
    strict_fit: bool = False,
) -> int:
    """Mask one random rectangle adding between 1 and ``budget`` new patches; return how many.

    ``strict_fit`` (DINOv2): a block must be strictly smaller than the grid in both directions.
    """
    H, W = mask.shape
    for _ in range(_TRIES_PER_BLOCK):
        area = _uniform(generator, min_block, budget)
        aspect = math.exp(_uniform(generator, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        fits = (h < H and w < W) if strict_fit else (1 <= h <= H and 1 <= w <= W)
        if not fits:
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
    *,
    style: str = "dinov2",
) -> Tensor:
    """Mask up to ``n_masked`` patches of an ``(H, W)`` grid as random rectangles.

    Rectangles have area uniform between ``min_block`` and ``min(max_block, remaining)`` and
    log-uniform aspect ratio in ``[min_aspect, max_aspect or 1/min_aspect]``; ``max_block=None``
    caps blocks only by what remains. When ten tries in a row place no block, ``style="dinov2"``
    stops short of ``n_masked``, ``style="legacy"`` tops the mask up with random single patches
    to exactly ``n_masked`` (see the module docstring for the other differences).
    Returns a bool tensor (H, W).
    """
    _check_style(style)
    dinov2 = style == "dinov2"
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
        # DINOv2 keeps trying small blocks below min_block (area then lies in [budget, min_block]).
        if budget < min_block and not dinov2:
            break
        added = _place_block(mask, budget, log_aspect, min_block, generator, strict_fit=dinov2)
        if added == 0:
            break
        count += added

    deficit = n_masked - count
    if deficit > 0 and not dinov2:
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
    style: str = "dinov2",
    img_size: int | None = None,
    patch_size: int | None = None,
) -> Tensor:
    """Masks for a batch of global crops, as in DINOv2's collate. Returns bool (B, H*W).

    ``int(B * mask_probability)`` images (``round`` for ``style="legacy"``) are masked; image ``i``
    of those gets a ratio drawn uniformly in the ``i``-th of equal sub-intervals of
    ``mask_ratio_range`` (so ratios are spread over the whole range, not clustered) and a target
    of ``int(N * ratio)`` patches (legacy: ``round``); the others get no mask; rows are then
    shuffled. ``max_block`` defaults to :func:`dinov2_max_block` (from ``img_size`` and
    ``patch_size`` when given) for ``"dinov2"`` and to ``N // 2`` for ``"legacy"``.
    ``generator=None`` uses torch's global RNG.
    """
    _check_style(style)
    g = torch.default_generator if generator is None else generator
    H, W = grid
    N = H * W
    lo, hi = mask_ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"bad mask_ratio_range {mask_ratio_range}")
    masks = torch.zeros(batch_size, N, dtype=torch.bool)

    if style == "legacy":
        max_block = N // 2 if max_block is None else max_block
        n_images = round(batch_size * mask_probability)
        edges = torch.linspace(lo, hi, n_images + 1, dtype=torch.float64).tolist()
        for i in range(n_images):
            ratio = _uniform(g, edges[i], edges[i + 1])
            n = round(N * ratio)
            mask = block_mask(grid, n, g, min_aspect, min_block=min_block, max_block=max_block,
                              style="legacy")
            masks[i] = mask.flatten()  # (N,)
        return masks[torch.randperm(batch_size, generator=g)]

    if max_block is None:
        max_block = dinov2_max_block(grid, img_size, patch_size)
    n_images = int(batch_size * mask_probability)
    # float32 edges and float32 ratio arithmetic, as DINOv2 (torch.linspace's default dtype).
    edges = torch.linspace(lo, hi, n_images + 1)  # (n_images + 1,) float32
    for i in range(n_images):
        u = torch.rand((), generator=g)  # float32
        ratio = edges[i] + (edges[i + 1] - edges[i]) * u
        n = min(int(N * ratio), N)
        mask = block_mask(grid, n, g, min_aspect, min_block=min_block, max_block=max_block,
                          style="dinov2")
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
