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


# ----------------------------------------------------------------------------------------------
# Inference path: fast pooling, bf16 weights, precision resolution
# ----------------------------------------------------------------------------------------------
def _timm_like(registers: int = 1) -> ViTEncoder:
    """LayerScale, qkv bias and registers on: every branch of a real rad-dino-style block."""
    torch.manual_seed(3)
    return ViTEncoder(ViTConfig(arch="test", embed_dim=C, depth=3, num_heads=2, img_size=56,
                                num_register_tokens=registers, layerscale_init=1.0)).eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_encode_runs_only_what_the_pool_needs_with_the_full_forwards_result(images, registers):
    """CLS-only last block and early stop give the result of the plain forward / intermediate layers."""
    m = _timm_like(registers)
    with torch.no_grad():
        full = m(images)
        inter = m.get_intermediate_layers(images, [0, 1, 2], norm=True)
    torch.testing.assert_close(encode(m, images), full["cls"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode(m, images, layers=[1, 0]),
                               torch.cat([inter[1]["cls"], inter[0]["cls"]], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode(m, images, layers=[0], pool="mean"), inter[0]["patches"].mean(1))
    # a block the shortcut does not know runs in full
    m.blocks[2].attn.gate = torch.nn.Linear(C, C)
    with torch.no_grad():
        gated = m(images)["cls"]
    torch.testing.assert_close(encode(m, images), gated)


def test_bf16_weights_within_the_stated_tolerance_of_fp32(images):
    """docs/encoder.md: bf16 CLS features have cosine >= 0.999 and relative L2 error <= 3 % vs fp32."""
    import copy

    from encoder.inference import model_precision, prepare_encoder

    m = _timm_like()
    ref = encode(m, images, pool="cls+mean")
    mb = prepare_encoder(copy.deepcopy(m), "bf16", "cpu")
    assert model_precision(mb) == "bf16" and model_precision(m) == "fp32"
    assert not mb.training and not any(p.requires_grad for p in mb.parameters())
    got = encode(mb, images, pool="cls+mean")
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.equal(got, ref)  # really computed in bf16
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert cos.min() >= 0.999 and rel.max() <= 0.03 and (got - ref).abs().max() <= 0.1
    # fp32 preparation changes nothing
    same = prepare_encoder(copy.deepcopy(m), "fp32", "cpu")
    torch.testing.assert_close(encode(same, images, pool="cls+mean"), ref, rtol=0, atol=0)


def test_precision_resolution(monkeypatch):
    import encoder.inference as inf

    assert inf._parse_bf16_flags("flags\t: fpu avx512f avx512_bf16 amx_tile\n", "x86_64") == ("avx512_bf16",)
    assert inf._parse_bf16_flags("flags\t: fpu avx512f avx512_vnni\n", "x86_64") == ()
    assert inf._parse_bf16_flags("Features\t: fp asimd bf16 i8mm\n", "aarch64") == ("bf16",)
    monkeypatch.setattr(inf, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert inf.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(inf, "cpu_bf16_flags", lambda: ())
    assert inf.resolve_precision("auto", "cpu") == "fp32"
    assert inf.resolve_precision("bf16", "cpu") == "bf16"  # explicit: honoured (emulated)
    assert inf.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        inf.resolve_precision("fp16", "cpu")
    assert inf.precision_dtype("bf16") == torch.bfloat16
    assert inf.default_batch_size("cpu") >= 1


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_features(images):
    """torch.compile of the blocks (~15 s of compiling on 2 cores): same features, any batch size."""
    import copy

    from encoder.inference import prepare_encoder

    m = _timm_like()
    mc = prepare_encoder(copy.deepcopy(m), "fp32", "cpu", compile=True)
    for x, kw in ((images, {"pool": "cls+mean"}), (images[:3], {"pool": "cls+mean"}),
                  (images[:2], {"layers": [0, 1]})):
        torch.testing.assert_close(encode(mc, x, **kw), encode(m, x, **kw), rtol=1e-5, atol=1e-5)
