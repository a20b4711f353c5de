"""Block-wise iBOT masking: exact counts, determinism, blockiness, batch sampling, loss weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoder.masking import block_mask, masked_indices, sample_masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _neighbour_stats(mask: torch.Tensor) -> tuple[float, float]:
    """For masked patches of a (H, W) mask: share with >= 1 masked 4-neighbour, and mean share
    of their in-grid 4-neighbours that are masked."""

    def count4(x: torch.Tensor) -> torch.Tensor:
        p = F.pad(x[None, None], (1, 1, 1, 1))[0, 0]
        return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]

    m = mask.float()
    masked_nb = count4(m)[mask]
    in_grid_nb = count4(torch.ones_like(m))[mask]
    return (masked_nb > 0).float().mean().item(), (masked_nb / in_grid_nb).mean().item()


@pytest.mark.parametrize("n_masked", [0, 1, 3, 4, 25, 102, 128, 200, 256])
def test_block_mask_exact_count(n_masked: int):
    for seed in range(3):
        m = block_mask((16, 16), n_masked, _gen(seed))
        assert m.shape == (16, 16) and m.dtype == torch.bool
        assert int(m.sum()) == n_masked


def test_block_mask_exact_count_with_small_max_block_and_rect_grid():
    m = block_mask((7, 13), 50, _gen(1), max_block=6)
    assert m.shape == (7, 13) and int(m.sum()) == 50


def test_block_mask_rejects_impossible_count():
    with pytest.raises(ValueError):
        block_mask((4, 4), 17, _gen(0))


def test_block_mask_deterministic():
    a = block_mask((16, 16), 80, _gen(123))
    b = block_mask((16, 16), 80, _gen(123))
    c = block_mask((16, 16), 80, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_block_mask_is_blocky_compared_with_random():
    n = 102  # ~40% of 16 x 16
    block_any, block_frac, rand_any, rand_frac = [], [], [], []
    for seed in range(10):
        g = _gen(seed)
        bm = block_mask((16, 16), n, g)
        rm = torch.zeros(256, dtype=torch.bool)
        rm[torch.randperm(256, generator=g)[:n]] = True
        a, f = _neighbour_stats(bm)
        block_any.append(a), block_frac.append(f)
        a, f = _neighbour_stats(rm.view(16, 16))
        rand_any.append(a), rand_frac.append(f)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # Share of masked patches with a masked neighbour: ~1 for blocks, ~0.85 for random at 40%.
    assert mean(block_any) > 0.97
    assert mean(block_any) > mean(rand_any) + 0.05
    # Share of a masked patch's neighbours that are masked: ~0.85 vs ~0.4 (the mask ratio).
    assert mean(block_frac) > mean(rand_frac) + 0.3
    assert mean(rand_frac) == pytest.approx(0.4, abs=0.08)


@pytest.mark.parametrize("batch_size,p", [(16, 0.5), (10, 0.3), (7, 1.0), (8, 0.0)])
def test_sample_masks_counts_ratios_and_spread(batch_size: int, p: float):
    grid, lo, hi = (16, 16), 0.1, 0.5
    N = grid[0] * grid[1]
    masks = sample_masks(batch_size, grid, (lo, hi), p, generator=_gen(0))
    assert masks.shape == (batch_size, N) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    n_img = round(batch_size * p)
    assert int((counts > 0).sum()) == n_img
    assert torch.all(masks[counts == 0] == False)  # noqa: E712
    ratios = sorted((counts[counts > 0].float() / N).tolist())
    for r in ratios:  # counts are rounded to whole patches
        assert lo - 1 / N <= r <= hi + 1 / N
    if n_img >= 2:
        # One ratio per sub-interval: the i-th smallest lies in the i-th slice of the range.
        edges = torch.linspace(lo, hi, n_img + 1).tolist()
        for i, r in enumerate(ratios):
            assert edges[i] - 1 / N <= r <= edges[i + 1] + 1 / N


def test_sample_masks_shuffles_and_is_deterministic():
    a = sample_masks(32, (8, 8), generator=_gen(5))
    b = sample_masks(32, (8, 8), generator=_gen(5))
    assert torch.equal(a, b)
    masked_rows = (a.sum(1) > 0).nonzero().squeeze(1).tolist()
    assert masked_rows != list(range(16))  # not all in front: rows were shuffled


def test_masked_indices_weights():
    masks = sample_masks(12, (16, 16), generator=_gen(3))
    idx, w = masked_indices(masks)
    assert idx.dtype == torch.long and idx.shape == w.shape == (int(masks.sum()),)
    assert torch.all(masks.flatten()[idx])
    rows = idx // masks.shape[1]
    per_row = torch.zeros(masks.shape[0]).index_add_(0, rows, w)
    n_masked_imgs = int((masks.sum(1) > 0).sum())
    assert torch.allclose(per_row[masks.sum(1) > 0], torch.ones(n_masked_imgs))
    assert torch.all(per_row[masks.sum(1) == 0] == 0)


def test_masked_indices_empty():
    idx, w = masked_indices(torch.zeros(3, 10, dtype=torch.bool))
    assert idx.numel() == 0 and w.numel() == 0
