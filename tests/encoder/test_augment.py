"""Chest X-ray multi-crop: shapes, normalisation, seeded reproducibility, flips, collate order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from encoder.augment import MultiCrop, MultiCropConfig, collate_multicrop, range_compress, sample_crop

MEAN, STD = 0.5307, 0.2583

# Small crops keep the tests fast; photometric augmentation fully disabled.
SMALL = MultiCropConfig(global_size=32, local_size=16, n_local=3)
PLAIN = replace(
    SMALL,
    jitter_prob=0.0,
    brightness=0.0,
    contrast=0.0,
    gamma=(1.0, 1.0),
    blur_prob_global=(0.0, 0.0),
    blur_prob_local=0.0,
    noise_prob=0.0,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _radiograph(h: int = 80, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth-ish (1, H, W) image in [0, 1] with structure, so crops differ by position."""
    g = _gen(seed)
    base = torch.linspace(0, 1, w).expand(h, w) * torch.linspace(0.2, 1, h)[:, None]
    return (0.8 * base + 0.2 * torch.rand(h, w, generator=g)).unsqueeze(0)


def test_default_config_matches_spec():
    c = MultiCropConfig()
    assert (c.global_size, c.local_size, c.n_local) == (224, 98, 8)
    assert c.hflip is False and c.blur_prob_global == (1.0, 0.1)
    assert (c.mean, c.std) == (MEAN, STD)


def test_output_shapes_and_dtypes_default_config():
    out = MultiCrop(MultiCropConfig())(torch.rand(1, 256, 240), _gen(0))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    for t in out["global_crops"]:
        assert t.shape == (1, 224, 224) and t.dtype == torch.float32  # grayscale: the encoder expands it
    for t in out["local_crops"]:
        assert t.shape == (1, 98, 98) and t.dtype == torch.float32
    for t in out["global_crops"] + out["local_crops"]:
        assert torch.isfinite(t).all()
        # Values come from [0, 1] pixels, so they stay in the normalised image of [0, 1].
        assert t.min() >= (0 - MEAN) / STD - 1e-5 and t.max() <= (1 - MEAN) / STD + 1e-5


def test_constant_image_normalises_to_zero():
    out = MultiCrop(PLAIN)(torch.full((1, 50, 60), MEAN), _gen(0))
    for t in out["global_crops"] + out["local_crops"]:
        assert t.abs().max() < 1e-4


def test_same_seed_same_crops_different_seed_different_crops():
    mc, img = MultiCrop(SMALL), _radiograph()
    a, b, c = mc(img, _gen(7)), mc(img, _gen(7)), mc(img, _gen(8))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)
        assert any(not torch.equal(x, z) for x, z in zip(a[key], c[key]))


def test_global_rng_is_not_used():
    mc, img = MultiCrop(SMALL), _radiograph()
    torch.manual_seed(0)
    a = mc(img, _gen(3))
    torch.manual_seed(999)
    b = mc(img, _gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"]))


def _left_right(t: torch.Tensor) -> tuple[float, float]:
    w = t.shape[-1]
    return t[..., : w // 2].mean().item(), t[..., w // 2 :].mean().item()


FULL_VIEW = replace(PLAIN, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0))


def _bright_left(size: int = 64) -> torch.Tensor:
    img = torch.zeros(1, size, size)
    img[..., : size // 2] = 1.0
    return img


def test_no_horizontal_flip_by_default():
    mc = MultiCrop(FULL_VIEW)
    for seed in range(10):
        out = mc(_bright_left(), _gen(seed))
        for t in out["global_crops"] + out["local_crops"]:
            left, right = _left_right(t)
            assert left > right + 1.0


def test_hflip_enabled_can_flip():
    mc = MultiCrop(replace(FULL_VIEW, hflip=True))
    flipped = kept = 0
    for seed in range(5):
        out = mc(_bright_left(), _gen(seed))
        for t in out["global_crops"] + out["local_crops"]:
            left, right = _left_right(t)
            flipped += right > left + 1.0
            kept += left > right + 1.0
    assert flipped > 0 and kept > 0 and flipped + kept == 25


def test_one_and_three_channel_inputs_agree():
    mc, gray = MultiCrop(SMALL), _radiograph()
    a = mc(gray, _gen(11))
    b = mc(gray.expand(3, -1, -1).clone(), _gen(11))
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize(
    "bad", [torch.rand(2, 8, 8), torch.rand(8, 8), torch.zeros(1, 8, 8, dtype=torch.uint8)]
)
def test_bad_inputs_rejected(bad: torch.Tensor):
    with pytest.raises((ValueError, TypeError)):
        MultiCrop(SMALL)(bad, _gen(0))


def test_photometric_augmentation_changes_intensities():
    img = _radiograph()
    plain = MultiCrop(FULL_VIEW)(img, _gen(0))["global_crops"][0]
    cfg = replace(
        FULL_VIEW, jitter_prob=1.0, brightness=0.4, contrast=0.4, gamma=(0.7, 1.4),
        blur_prob_global=(1.0, 1.0), noise_prob=1.0, noise_std=(0.02, 0.03),
    )
    aug = MultiCrop(cfg)
    out = aug(img, _gen(0))["global_crops"][0]
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-3)


def test_range_compress_flattens_or_steepens_large_scale_contrast():
    x = _radiograph(64, 64)
    assert torch.equal(range_compress(x, 0.0), x.clamp(0, 1))
    def large_scale_spread(y):  # std of an 8x8 block average: the film's large-scale contrast
        return float(torch.nn.functional.avg_pool2d(y[None], 8).std())
    flat, steep = range_compress(x, 0.6), range_compress(x, -0.3)
    assert large_scale_spread(flat) < 0.7 * large_scale_spread(x) < large_scale_spread(steep)
    assert flat.min() >= 0 and steep.max() <= 1 and flat.shape == x.shape
    # fine detail (the difference from the block average) is kept
    fine = lambda y: y - torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(y[None], 8), scale_factor=8)[0]
    assert torch.allclose(fine(flat), fine(x), atol=0.05)


def test_collimation_borders_are_flat_strips():
    cfg = replace(PLAIN, n_local=0, collimation_prob=1.0, collimation_max=0.25)
    x = _radiograph(64, 64)
    strips = 0
    for seed in range(20):
        for crop in MultiCrop(cfg)(x, _gen(seed))["global_crops"]:
            px = crop[0] * STD + MEAN  # back to [0, 1]
            for edge in (px[:, 0], px[:, -1], px[0], px[-1]):
                if edge.std() < 1e-6:  # a collimated side is one value, black or white
                    strips += 1
                    assert float(edge[0]) == pytest.approx(0.0, abs=1e-5) or float(edge[0]) == pytest.approx(1.0, abs=1e-5)
    assert strips > 20  # about half the 160 sides, minus the strips too narrow to draw


def test_acquisition_augmentations_off_by_default_and_deterministic_on():
    x = _radiograph(64, 64)
    off = MultiCrop(replace(PLAIN, n_local=0))(x, _gen(3))["global_crops"]
    on_cfg = replace(PLAIN, n_local=0, range_compression=(-0.4, 0.4), collimation_prob=0.5)
    on = MultiCrop(on_cfg)(x, _gen(3))["global_crops"]
    again = MultiCrop(on_cfg)(x, _gen(3))["global_crops"]
    assert MultiCropConfig().range_compression == (0.0, 0.0) and MultiCropConfig().collimation_prob == 0.0
    assert all(torch.equal(a, b) for a, b in zip(on, again))
    assert not all(torch.equal(a, b) for a, b in zip(on, off))


def test_sample_crop_box_in_bounds_and_area():
    g = _gen(0)
    for _ in range(200):
        top, left, h, w = sample_crop(100, 60, (0.05, 0.32), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 60
        assert 0.04 <= h * w / 6000 <= 0.34
        assert 0.7 <= w / h <= 1.45
    assert sample_crop(40, 40, (1.0, 1.0), (1.0, 1.0), g) == (0, 0, 40, 40)
    # Impossible request (full area at a ratio the image lacks) falls back to a centred crop.
    top, left, h, w = sample_crop(100, 20, (1.0, 1.0), (1.0, 1.0), g)
    assert (h, w) == (20, 20) and top == 40 and left == 0


def test_collate_order_and_masks():
    B, L, grid = 3, SMALL.n_local, (4, 4)
    mc = MultiCrop(SMALL)
    samples = [mc(_radiograph(seed=i), _gen(i)) for i in range(B)]
    mask_cfg = {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}
    batch = collate_multicrop(samples, grid, mask_cfg, _gen(0))
    g, loc = batch["global_crops"], batch["local_crops"]
    assert g.shape == (2 * B, 1, 32, 32) and loc.shape == (L * B, 1, 16, 16)
    for k in range(2):
        for i in range(B):
            assert torch.equal(g[k * B + i], samples[i]["global_crops"][k])
    for k in range(L):
        for i in range(B):
            assert torch.equal(loc[k * B + i], samples[i]["local_crops"][k])
    masks = batch["masks"]
    assert masks.shape == (2 * B, 16) and masks.dtype == torch.bool
    assert int((masks.sum(1) > 0).sum()) == round(2 * B * 0.5)
    n = batch["n_masked"]
    assert n == int(masks.sum()) == batch["mask_indices"].numel() == batch["mask_weights"].numel()
    assert torch.all(masks.flatten()[batch["mask_indices"]])


def test_collate_without_masks_or_locals():
    mc = MultiCrop(replace(SMALL, n_local=0))
    samples = [mc(_radiograph(seed=i), _gen(i)) for i in range(2)]
    batch = collate_multicrop(samples, (2, 2), None, _gen(0))
    assert batch["local_crops"] is None
    assert batch["masks"].shape == (4, 4) and not batch["masks"].any()
    assert batch["n_masked"] == 0 and batch["mask_indices"].numel() == 0
