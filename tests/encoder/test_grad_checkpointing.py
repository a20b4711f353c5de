"""Activation checkpointing per block (``model.grad_checkpointing``): same loss and gradients,
fewer saved activations, and under FSDP2 the checkpoint sits inside each sharded block."""

from __future__ import annotations

import pytest
import torch

from encoder.augment import MultiCrop, MultiCropConfig, collate_multicrop
from encoder.ssl import SSLConfig, SSLMetaArch
from encoder.vit import Block, build_vit


def _batch(seed: int = 0, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    crop = MultiCrop(MultiCropConfig(global_size=56, local_size=28, n_local=2))
    imgs = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=96, mode="bilinear")
    return collate_multicrop([crop(im, g) for im in imgs], (4, 4),
                             {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}, g)


def _model() -> SSLMetaArch:
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", img_size=56, depth=3, embed_dim=48, num_heads=3, drop_path_rate=0.3,
                    layerscale_init=0.1)
    return SSLMetaArch(vit, SSLConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32))


class _Saved:
    """Bytes autograd saves for backward outside any checkpoint (what checkpointing removes)."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t


def _step(model: SSLMetaArch, batch: dict) -> tuple[float, dict, int, int]:
    """One SSL forward/backward: loss, student gradients (full tensors), saved bytes, block forwards."""
    calls = [0]
    hooks = [blk.attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for blk in model.student["backbone"].blocks]
    saved = _Saved()
    torch.manual_seed(1)  # drop-path
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss, _ = model(batch, teacher_temp=0.04)
    loss.backward()
    for h in hooks:
        h.remove()
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731
    grads = {n: full(p.grad).clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, saved.bytes, calls[0]


def _assert_same(ref: tuple, ckpt: tuple, depth: int) -> None:
    (loss0, g0, bytes0, calls0), (loss1, g1, bytes1, calls1) = ref, ckpt
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    # student blocks run 2 (global + local) forwards; with checkpointing each runs once more in backward
    assert calls0 == 2 * depth and calls1 == 4 * depth
    assert bytes1 < 0.6 * bytes0, (bytes1, bytes0)


def test_checkpointing_keeps_loss_and_gradients():
    batch = _batch()
    ref = _step(_model(), batch)
    m = _model()
    m.student["backbone"].set_grad_checkpointing(True)
    _assert_same(ref, _step(m, batch), depth=3)


def test_checkpointing_off_in_no_grad():
    """Inference and the teacher (no grad): no checkpoint, no recompute, same outputs."""
    vit = build_vit("vit_tiny", img_size=56, depth=2, embed_dim=48, num_heads=3)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = vit(x)["cls"]
        vit.set_grad_checkpointing(True)
        b = vit(x)["cls"]
    assert torch.equal(a, b)


def test_checkpointing_inside_fsdp2_blocks(one_rank_group):
    """FSDP2 (``shard_ssl_model``) on a checkpointed model: each block is an FSDP module whose own
    forward is the checkpointed one (checkpoint inside the sharding unit), and loss, gradients and
    the memory saving are those of the unsharded model."""
    from encoder.distributed import shard_ssl_model

    batch = _batch()
    ref = _step(_model(), batch)
    m = _model()
    m.student["backbone"].set_grad_checkpointing(True)
    shard_ssl_model(m, torch.device("cpu"))
    for blk in m.student["backbone"].blocks:
        assert type(blk).__name__.startswith("FSDP") and isinstance(blk, Block) and blk.grad_checkpointing
    _assert_same(ref, _step(m, batch), depth=3)


def test_train_config_switches_it_on(tmp_path):
    from encoder.train import build_model
    from radgen.config import load_config

    tiny = ["model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
            "model.img_size=56", "ssl.out_dim=64", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32"]
    on = build_model(load_config("encoder", [], [f"out={tmp_path}", *tiny, "model.grad_checkpointing=true"]))
    off = build_model(load_config("encoder", [], [f"out={tmp_path}", *tiny]))
    assert all(b.grad_checkpointing for b in on.student["backbone"].blocks)
    assert not any(b.grad_checkpointing for b in off.student["backbone"].blocks)
    assert load_config("encoder", ["rad_dino_vitb14"], [f"out={tmp_path}"]).model.grad_checkpointing
