"""Block-wise iBOT masking: DINOv2 and legacy styles, determinism, blockiness, batch sampling,
loss weights, and the style a resumed run uses."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import encoder.masking as masking
from encoder.masking import block_mask, dinov2_max_block, masked_indices, sample_masks

pytestmark = pytest.mark.usefixtures("one_thread")


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
def test_block_mask_legacy_exact_count(n_masked: int):
    for seed in range(3):
        m = block_mask((16, 16), n_masked, _gen(seed), style="legacy")
        assert m.shape == (16, 16) and m.dtype == torch.bool
        assert int(m.sum()) == n_masked


def test_block_mask_legacy_exact_count_with_small_max_block_and_rect_grid():
    m = block_mask((7, 13), 50, _gen(1), max_block=6, style="legacy")
    assert m.shape == (7, 13) and int(m.sum()) == 50


@pytest.mark.parametrize("n_masked", [0, 1, 3, 4, 25, 102, 128, 200])
def test_block_mask_dinov2_never_overshoots(n_masked: int):
    for seed in range(3):
        m = block_mask((16, 16), n_masked, _gen(seed))  # dinov2 is the default
        assert m.shape == (16, 16) and m.dtype == torch.bool
        assert int(m.sum()) <= n_masked
        if n_masked >= 25:  # on a 16 x 16 grid a shortfall is a patch or two at most
            assert int(m.sum()) >= n_masked - 4


def test_block_mask_dinov2_stops_short_without_top_up():
    """4 x 4 grid: when ten tries place no block the mask stays short (legacy tops it up)."""
    short = {1: 0, 4: 0, 7: 0}
    for n in short:
        for seed in range(100):
            got = int(block_mask((4, 4), n, _gen(seed)).sum())
            assert got <= n
            short[n] += got < n
            assert int(block_mask((4, 4), n, _gen(seed), style="legacy").sum()) == n
    # A single patch needs a 1 x 1 block (area uniform in [1, 4]): about a third of draws fail.
    assert 20 <= short[1] <= 50
    assert short[4] > 0 and short[7] > 0


def _record_blocks(monkeypatch) -> list[tuple[int, int]]:
    """Bounding-box (height, width) of the patches each placed block adds: one block each."""
    boxes: list[tuple[int, int]] = []
    place = masking._place_block

    def spy(mask, *args, **kwargs):
        before = mask.clone()
        added = place(mask, *args, **kwargs)
        if added:
            new = mask & ~before
            boxes.append((int(new.any(1).sum()), int(new.any(0).sum())))
        return added

    monkeypatch.setattr(masking, "_place_block", spy)
    return boxes


@pytest.mark.parametrize("grid", [(4, 4), (3, 6)])
def test_dinov2_blocks_never_span_the_grid(monkeypatch, grid: tuple[int, int]):
    """DINOv2's fit test is strict (h < H and w < W); legacy blocks may span a whole side."""
    H, W = grid
    boxes = _record_blocks(monkeypatch)
    for seed in range(150):
        for n in (4, 6, 9):
            block_mask(grid, n, _gen(seed))
    assert len(boxes) > 300
    assert all(h < H and w < W for h, w in boxes)
    # The bounding box of the added patches lies inside its block, so one that spans a side
    # proves the block did: legacy blocks do.
    boxes.clear()
    for seed in range(150):
        for n in (4, 6, 9):
            block_mask(grid, n, _gen(seed), style="legacy")
    assert any(h == H or w == W for h, w in boxes)
    # (Whole masks are no test of this: in dinov2 style a 1 x 3 block plus a 1 x 1 one can
    # still make a 1 x 4 row, since small blocks keep being tried.)


def test_block_mask_rejects_impossible_count_and_unknown_style():
    for style in ("dinov2", "legacy"):
        with pytest.raises(ValueError):
            block_mask((4, 4), 17, _gen(0), style=style)
    with pytest.raises(ValueError, match="style"):
        block_mask((4, 4), 3, _gen(0), style="ibot")
    with pytest.raises(ValueError, match="style"):
        sample_masks(4, (4, 4), generator=_gen(0), style="DINOv2")


def test_block_mask_deterministic():
    a = block_mask((16, 16), 80, _gen(123))
    b = block_mask((16, 16), 80, _gen(123))
    c = block_mask((16, 16), 80, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("style", ["dinov2", "legacy"])
def test_block_mask_is_blocky_compared_with_random(style: str):
    n = 102  # ~40% of 16 x 16
    block_any, block_frac, rand_any, rand_frac = [], [], [], []
    for seed in range(10):
        g = _gen(seed)
        bm = block_mask((16, 16), n, g, style=style)
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


@pytest.mark.parametrize("style", ["dinov2", "legacy"])
@pytest.mark.parametrize("batch_size,p", [(16, 0.5), (10, 0.3), (7, 1.0), (8, 0.0)])
def test_sample_masks_counts_ratios_and_spread(batch_size: int, p: float, style: str):
    grid, lo, hi = (16, 16), 0.1, 0.5
    N = grid[0] * grid[1]
    masks = sample_masks(batch_size, grid, (lo, hi), p, generator=_gen(0), style=style)
    assert masks.shape == (batch_size, N) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    n_img = round(batch_size * p) if style == "legacy" else int(batch_size * p)
    assert int((counts > 0).sum()) == n_img
    assert torch.all(masks[counts == 0] == False)  # noqa: E712
    ratios = sorted((counts[counts > 0].float() / N).tolist())
    # legacy: counts rounded to whole patches; dinov2: truncated, and may fall a few short.
    slack_lo = 1 / N if style == "legacy" else 5 / N
    slack_hi = 1 / N if style == "legacy" else 0.0
    for r in ratios:
        assert lo - slack_lo <= r <= hi + slack_hi
    if n_img >= 2:
        # One ratio per sub-interval: the i-th smallest lies in the i-th slice of the range.
        edges = torch.linspace(lo, hi, n_img + 1).tolist()
        for i, r in enumerate(ratios):
            assert edges[i] - slack_lo <= r <= edges[i + 1] + slack_hi + 1e-6


@pytest.mark.parametrize("batch_size,p,n_dinov2,n_legacy", [
    (7, 0.5, 3, 4),     # int(3.5) vs round(3.5)
    (11, 0.5, 5, 6),    # int(5.5) vs round(5.5)
    (6, 0.5, 3, 3),
    (5, 0.5, 2, 2),     # round(2.5) is 2 (round half to even)
    (64, 0.7, 44, 45),  # int(44.8) vs round(44.8)
])
def test_number_of_masked_images(batch_size: int, p: float, n_dinov2: int, n_legacy: int):
    for style, want in (("dinov2", n_dinov2), ("legacy", n_legacy)):
        for seed in range(3):
            masks = sample_masks(batch_size, (16, 16), (0.1, 0.5), p, generator=_gen(seed), style=style)
            assert int(masks.any(1).sum()) == want, (style, seed)


def test_dinov2_default_max_block(monkeypatch):
    # DINOv2: max_num_patches = 0.5 * img_size // patch_size * img_size // patch_size
    assert 0.5 * 518 // 14 * 518 // 14 == 666
    assert dinov2_max_block((37, 37)) == 666 == dinov2_max_block((37, 37), 518, 14)
    assert (37 * 37) // 2 == 684  # legacy's N // 2
    assert dinov2_max_block((8, 8)) == 32 == dinov2_max_block((8, 8), 112, 14)
    assert dinov2_max_block((16, 16)) == 128 == dinov2_max_block((16, 16), 224, 14)
    assert dinov2_max_block((37, 37), 520, 14) == int(0.5 * 520 // 14 * 520 // 14) == 668
    seen: list[tuple[str, int]] = []
    real = masking.block_mask

    def spy(*args, **kwargs):
        seen.append((kwargs["style"], kwargs["max_block"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(masking, "block_mask", spy)
    sample_masks(2, (37, 37), (0.1, 0.2), 0.5, generator=_gen(0))
    sample_masks(2, (37, 37), (0.1, 0.2), 0.5, generator=_gen(0), img_size=518, patch_size=14)
    sample_masks(2, (37, 37), (0.1, 0.2), 0.5, generator=_gen(0), style="legacy")
    sample_masks(2, (37, 37), (0.1, 0.2), 0.5, generator=_gen(0), max_block=50)
    assert seen == [("dinov2", 666), ("dinov2", 666), ("legacy", 684), ("dinov2", 50)]


def _reference_masked_fraction(n_batches: int, batch: int, side: int, ratio: tuple[float, float],
                               p: float, seed: int) -> float:
    """Monte-Carlo of the documented DINOv2 procedure, written independently of encoder.masking:
    int(B*p) images, ratio uniform in the i-th of equal slices, target int(N*ratio), blocks of
    area uniform in [4, min(left, max_block)] and log-uniform aspect in [0.3, 1/0.3], strict fit,
    up to 10 tries per block, overlap allowed but no overshoot, stop when a block fails."""
    rng = random.Random(seed)
    N = side * side
    max_block = 0.5 * (side * 14) // 14 * (side * 14) // 14  # DINOv2's expression, patch 14
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    lo, hi = ratio
    masked_total = 0
    for _ in range(n_batches):
        k = int(batch * p)
        for i in range(k):
            target = int(N * rng.uniform(lo + (hi - lo) * i / k, lo + (hi - lo) * (i + 1) / k))
            cells: set[tuple[int, int]] = set()
            while len(cells) < target:
                left = min(target - len(cells), max_block)
                for _try in range(10):
                    area = rng.uniform(4, left)
                    aspect = math.exp(rng.uniform(log_lo, log_hi))
                    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                    if not (h < side and w < side):
                        continue
                    r0, c0 = rng.randint(0, side - h), rng.randint(0, side - w)
                    block = {(r, c) for r in range(r0, r0 + h) for c in range(c0, c0 + w)}
                    if 0 < len(block - cells) <= left:
                        cells |= block
                        break
                else:
                    break  # ten failures: stop short
            masked_total += len(cells)
    return masked_total / (n_batches * batch * N)


def test_dinov2_masked_fraction_matches_reference_procedure():
    """cpu_tiny's setting (8 x 8 grid, 64 global crops, p 0.5, ratio 0.1-0.5), 500 batches.

    Ratios are stratified over each batch, so the batch mean barely varies (standard error
    ~3e-5 per 500 batches); legacy's round + top-up gives 0.150, DINOv2's procedure 0.1457."""
    batches, B, side = 500, 64, 8
    want = _reference_masked_fraction(batches, B, side, (0.1, 0.5), 0.5, seed=0)
    g = _gen(0)
    got = sum(sample_masks(B, (side, side), generator=g).float().mean().item()
              for _ in range(batches)) / batches
    g = _gen(0)
    legacy = sum(sample_masks(B, (side, side), generator=g, style="legacy").float().mean().item()
                 for _ in range(batches)) / batches
    assert got == pytest.approx(want, abs=5e-4)
    assert abs(legacy - want) > 3e-3  # the check tells the two procedures apart
    assert 0.140 < want < 0.150


# Flat indices of masks drawn by encoder/masking.py before the dinov2 style existed (the
# legacy style must reproduce them bit for bit so runs started with it resume exactly).
_LEGACY_BM_4x4 = [0, 1, 2, 4, 5, 6, 9]  # block_mask((4, 4), 7, seed 1)
_LEGACY_BM_8x8 = [5, 6, 13, 14, 17, 18, 19, 20, 21, 22, 29, 31, 32, 33, 34, 39, 40, 41, 42, 47]
_LEGACY_SM_4x4 = [8, 9, 10, 12, 13, 14, 16, 24, 48, 52, 56, 58]  # sample_masks(6, (4, 4), seed 3)
_LEGACY_SM_5x6 = [6, 7, 8, 9, 12, 13, 14, 15, 30, 31, 32, 33, 36, 37, 38, 39, 40, 41, 44, 45, 46,
                  47, 52, 53, 58, 59, 63, 69, 79, 80, 81, 85, 86, 87, 88, 151, 152, 153, 157, 158,
                  159, 163, 164, 165, 167, 168, 169, 170, 171, 179]


def _flat(m: torch.Tensor) -> list[int]:
    return m.flatten().nonzero().squeeze(1).tolist()


def _digest(m: torch.Tensor, mod: int) -> tuple[int, int, int]:
    i = m.flatten().nonzero().squeeze(1).long()
    return i.numel(), int(i.sum()), int((i * (i % mod)).sum())


def test_legacy_style_reproduces_the_old_masks():
    L = {"style": "legacy"}
    assert _flat(block_mask((4, 4), 7, _gen(1), **L)) == _LEGACY_BM_4x4
    assert _flat(block_mask((8, 8), 20, _gen(2), max_block=10, **L)) == _LEGACY_BM_8x8
    assert _flat(sample_masks(6, (4, 4), generator=_gen(3), **L)) == _LEGACY_SM_4x4
    assert _flat(sample_masks(7, (5, 6), (0.2, 0.6), 0.5, generator=_gen(4), **L)) == _LEGACY_SM_5x6
    assert _digest(sample_masks(64, (8, 8), generator=_gen(5), **L), 97) == (615, 1303578, 62967510)
    g = _gen(6)  # three batches from one generator: the stream position is preserved too
    stream = torch.cat([sample_masks(64, (8, 8), generator=g, **L) for _ in range(3)])
    assert _digest(stream, 101) == (1847, 11144520, 579455942)


@pytest.mark.parametrize("style", ["dinov2", "legacy"])
def test_sample_masks_shuffles_and_is_deterministic(style: str):
    a = sample_masks(32, (8, 8), generator=_gen(5), style=style)
    b = sample_masks(32, (8, 8), generator=_gen(5), style=style)
    c = sample_masks(32, (8, 8), generator=_gen(6), style=style)
    assert torch.equal(a, b) and not torch.equal(a, c)
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


# ----------------------------------------------------------------------------------------------
# Config: masking.style, and the style a resumed run uses
# ----------------------------------------------------------------------------------------------
def test_default_config_selects_dinov2_and_unknown_style_is_rejected(tmp_path: Path):
    from encoder.train import validate_config
    from radgen.config import load_config

    cfg = load_config("encoder", [], [f"out={tmp_path}"])
    assert cfg.masking.style == "dinov2"
    validate_config(cfg)
    validate_config(load_config("encoder", ["cpu_tiny"], [f"out={tmp_path}", "masking.style=legacy"]))
    with pytest.raises(ValueError, match="masking.style"):
        validate_config(load_config("encoder", [], [f"out={tmp_path}", "masking.style=ibot"]))


def test_resolve_mask_style_for_fresh_and_resumed_runs():
    from encoder.train import resolve_mask_style

    dinov2 = OmegaConf.create({"masking": {"style": "dinov2"}})
    legacy = OmegaConf.create({"masking": {"style": "legacy"}})
    old = {"masking": {"mask_probability": 0.5, "mask_ratio": [0.1, 0.5]}}  # saved before the key
    assert resolve_mask_style(dinov2, None) == "dinov2"
    assert resolve_mask_style(legacy, None) == "legacy"
    assert resolve_mask_style(OmegaConf.create({"masking": {}}), None) == "legacy"
    with pytest.warns(UserWarning, match="predates masking.style"):
        assert resolve_mask_style(dinov2, old) == "legacy"
    with pytest.warns(UserWarning, match="predates masking.style"):
        assert resolve_mask_style(dinov2, {}) == "legacy"  # no config saved at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mask_style(legacy, old) == "legacy"
        assert resolve_mask_style(dinov2, {"masking": {"style": "dinov2"}}) == "dinov2"
        assert resolve_mask_style(legacy, {"masking": {"style": "legacy"}}) == "legacy"
    with pytest.raises(ValueError, match="masking.style=legacy, now dinov2"):
        resolve_mask_style(dinov2, {"masking": {"style": "legacy"}})
    with pytest.raises(ValueError, match="masking.style=dinov2, now legacy"):
        resolve_mask_style(legacy, {"masking": {"style": "dinov2"}})


# A few-second pretraining run (as tests/encoder/test_train.py's): 4 x 4 mask grid, 8 global crops.
_TINY = [
    "model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
    "model.img_size=56", "ssl.out_dim=64", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
    "crops.global_size=56", "crops.local_size=28", "crops.n_local=2",
    "optim.batch_size=4", "optim.epochs=4", "optim.steps_per_epoch=4", "optim.warmup_epochs=1",
    "data.image_size=64", "train.progress=false", "train.checkpoint_every=0", "train.log_every=1",
]


def test_run_saved_before_masking_style_resumes_as_legacy(tmp_path: Path):
    """A checkpoint whose config has no masking.style resumes with legacy masks, exactly."""
    import csv

    from encoder.checkpoint import load_checkpoint, save_checkpoint
    from encoder.train import train
    from radgen.config import load_config

    def cfg(out: Path, *extra: str):
        return load_config("encoder", [], [f"out={out}", *_TINY, *extra])

    def ibot(out: Path) -> list[float]:
        with open(out / "log.csv", newline="") as fh:
            return [float(r["ibot"]) for r in csv.DictReader(fh)]

    low = torch.rand(8, 1, 6, 6, generator=_gen(0))
    images = list(F.interpolate(low, size=64, mode="bicubic").clamp(0, 1))
    train(cfg(tmp_path / "legacy", "masking.style=legacy", "optim.max_steps=4"), images)
    train(cfg(tmp_path / "dinov2", "optim.max_steps=4"), images)
    old = tmp_path / "old"
    train(cfg(old, "masking.style=legacy", "optim.max_steps=2"), images)
    ckpt = load_checkpoint(old / "checkpoint.pt")
    del ckpt["config"]["masking"]["style"]  # as written before the key existed
    save_checkpoint(old / "checkpoint.pt", ckpt)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="global batch"):
        train(cfg(old, "optim.max_steps=4", "optim.batch_size=2"), images)  # still checked
    with pytest.warns(UserWarning, match="predates masking.style"):
        train(cfg(old, "optim.max_steps=4"), images)  # the current default is dinov2
    assert OmegaConf.load(old / "config.yaml").masking.style == "legacy"
    assert load_checkpoint(old / "checkpoint.pt")["config"]["masking"]["style"] == "legacy"
    assert ibot(old) == pytest.approx(ibot(tmp_path / "legacy"), rel=1e-6, abs=1e-7)
    assert ibot(tmp_path / "dinov2")[2:] != pytest.approx(ibot(tmp_path / "legacy")[2:], rel=1e-3)
    # A checkpoint that names its style must be resumed with it.
    with pytest.raises(ValueError, match="masking.style=legacy, now dinov2"):
        train(cfg(tmp_path / "legacy", "optim.max_steps=6"), images)
