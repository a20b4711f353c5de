"""The SSL meta-architecture: teacher without gradients, EMA, loss switches, a falling loss."""

from __future__ import annotations

import pytest
import torch

from encoder.augment import MultiCrop, MultiCropConfig, collate_multicrop
from encoder.ssl import SSLConfig, SSLMetaArch, logs_to_host
from encoder.vit import build_vit


def _batch(seed: int = 0, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    crop = MultiCrop(MultiCropConfig(global_size=56, local_size=28, n_local=2))
    # smooth random "radiographs"
    imgs = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=96, mode="bilinear")
    samples = [crop(im, g) for im in imgs]
    return collate_multicrop(samples, (4, 4), {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}, g)


def _model(**kw) -> SSLMetaArch:
    torch.manual_seed(0)
    cfg = SSLConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32, **kw)
    return SSLMetaArch(build_vit("vit_tiny", img_size=56, depth=2, embed_dim=48, num_heads=3), cfg)


def test_teacher_gets_no_gradients_and_losses_are_reported():
    m = _model()
    loss, logs = m(_batch(), teacher_temp=0.04)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert m.student["backbone"].cls_token.grad is not None
    assert {"dino", "ibot", "koleo", "teacher_entropy", "cls_std", "loss"} <= set(logs)
    logs = logs_to_host(logs)
    assert logs["loss"] == pytest.approx(logs["dino"] + logs["ibot"] + 0.1 * logs["koleo"], rel=1e-5)


@pytest.mark.parametrize("off", ["ibot", "koleo"])
def test_weight_zero_switches_a_loss_off(off: str):
    m = _model(**{f"{off}_weight": 0.0})
    _, logs = m(_batch(), teacher_temp=0.04)
    assert off not in logs
    assert getattr(m, f"do_{off}") is False


def test_ema_update():
    m = _model()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in m.teacher.parameters()]
    stud = [p.clone() for p in m.student.parameters()]
    m.update_teacher(0.9)
    for t0, s, t1 in zip(before_t, stud, m.teacher.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_sinkhorn_variant_runs():
    m = _model(centering="sinkhorn_knopp")
    loss, _ = m(_batch(), teacher_temp=0.05)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        SSLConfig(centering="nope")


def test_loss_falls_on_a_tiny_run():
    m = _model()
    opt = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(1)
    losses = []
    for _ in range(25):
        loss, logs = m(batch, teacher_temp=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_teacher(0.99)
        losses.append(float(logs["loss"]))
    assert min(losses[-5:]) < losses[0]
