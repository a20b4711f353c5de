"""Frozen features: pooling, intermediate layers, inference mode, determinism, batching."""

from __future__ import annotations

import pytest
import torch

from encoder.features import encode, encode_batches, feature_dim, resolve_layers
from encoder.vit import ViTConfig, ViTEncoder

C = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(registers: int = 0, seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    cfg = ViTConfig(arch="test", embed_dim=C, depth=3, num_heads=2, img_size=56,
                    num_register_tokens=registers, layerscale_init=None)
    return ViTEncoder(cfg)


@pytest.fixture(scope="module")
def model() -> ViTEncoder:
    return _model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def _quadrant_means(patches: torch.Tensor) -> torch.Tensor:
    """(B, 16, C) on a 4x4 grid -> (B, 4*C): top-left, top-right, bottom-left, bottom-right means."""
    g = patches.reshape(patches.shape[0], 4, 4, -1)
    quads = [g[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)]
    return torch.stack(quads, 1).flatten(1)


@pytest.mark.parametrize("pool,dim", [("cls", C), ("mean", C), ("cls+mean", 2 * C), ("cls+grid2", 5 * C)])
def test_pool_shapes_and_values(model, images, pool, dim):
    f = encode(model, images, pool=pool)
    assert f.shape == (4, dim) and f.dtype == torch.float32 and feature_dim(model, None, pool) == dim
    with torch.no_grad():
        out = model.eval()(images)
    want = {"cls": out["cls"], "mean": out["patches"].mean(1),
            "cls+mean": torch.cat([out["cls"], out["patches"].mean(1)], -1),
            "cls+grid2": torch.cat([out["cls"], _quadrant_means(out["patches"])], -1)}[pool]
    torch.testing.assert_close(f, want)


def test_mean_excludes_registers(images):
    m = _model(registers=2)
    with torch.no_grad():
        out = m.eval()(images)
    assert out["registers"].shape[1] == 2 and out["patches"].shape[1] == 16
    torch.testing.assert_close(encode(m, images, pool="mean"), out["patches"].mean(1))


def test_layers_concatenate_in_the_order_given(model, images):
    last = encode(model, images, layers=[-1])
    torch.testing.assert_close(last, encode(model, images))  # final block, normed == forward
    a = encode(model, images, layers=[0, 2], pool="cls+mean")
    assert a.shape == (4, 4 * C) and feature_dim(model, [0, 2], "cls+mean") == 4 * C
    b = encode(model, images, layers=[2, 0], pool="cls+mean")
    torch.testing.assert_close(a, torch.cat([b[:, 2 * C:], b[:, :2 * C]], -1))
    outs = model.get_intermediate_layers(images, [0], norm=True)
    torch.testing.assert_close(a[:, :C], outs[0]["cls"].detach())
    torch.testing.assert_close(encode(model, images, layers=2), encode(model, images, layers=[1, 2]))
    assert resolve_layers(model, [-1, 0]) == [2, 0] and resolve_layers(model, None) is None
    for bad in ([3], [-4], [1, -2], []):
        with pytest.raises(ValueError):
            encode(model, images, layers=bad)
    with pytest.raises(ValueError, match="pool"):
        encode(model, images, pool="max")


def test_inference_mode_no_grad_and_mode_restored(images):
    m = _model()
    m.train()
    f = encode(m, images, pool="cls+mean", layers=[1, 2])
    assert m.training  # restored
    assert not f.requires_grad and f.grad_fn is None and not f.is_inference()
    assert all(p.grad is None for p in m.parameters())
    # usable as input to a trainable head (not an inference tensor)
    head = torch.nn.Linear(f.shape[1], 1)
    head(f).sum().backward()
    assert head.weight.grad is not None


def test_deterministic_and_batching(model, images):
    torch.testing.assert_close(encode(model, images), encode(model, images), rtol=0, atol=0)
    other = _model(seed=1)
    assert not torch.allclose(encode(model, images), encode(other, images))
    whole = encode(model, images, pool="cls+mean")
    batched = encode_batches(model, iter([images[:3], images[3:4], images[:0]]), pool="cls+mean",
                             progress=True, total=4)
    assert batched.shape == (4, 2 * C) and batched.device.type == "cpu"
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-5)
    assert encode_batches(model, [], pool="cls+mean", layers=[0, 1]).shape == (0, 4 * C)
