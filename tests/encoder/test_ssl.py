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


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_no_masked_patch_gives_zero_ibot_and_keeps_the_centre(centering):
    m = _model(centering=centering)
    batch = _batch()
    batch["masks"].zero_()
    batch["mask_indices"], batch["mask_weights"] = batch["mask_indices"][:0], batch["mask_weights"][:0]
    loss, logs = m(batch, teacher_temp=0.04)
    loss.backward()
    assert torch.isfinite(loss) and float(logs["ibot"]) == 0.0
    assert not m.ibot_loss.center.any()  # nothing to average: the centre stays where it was


# Two ranks (gloo) where rank 0's micro-batch has no masked patch: the iBOT head and centre
# update are collectives under FSDP / with several ranks, so rank 0 must still take part.
_EMPTY_RANK_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from encoder.distributed import close_distributed, setup_distributed, shard_ssl_model
from encoder.ssl import SSLConfig, SSLMetaArch
from encoder.vit import build_vit
from encoder.augment import MultiCrop, MultiCropConfig, collate_multicrop

strategy, centering, out = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = setup_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = SSLMetaArch(build_vit("vit_tiny", img_size=56, depth=2, embed_dim=48, num_heads=3),
                    SSLConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32, centering=centering))
if strategy == "fsdp":
    shard_ssl_model(model, torch.device("cpu"))
g = torch.Generator().manual_seed(rank)
crop = MultiCrop(MultiCropConfig(global_size=56, local_size=28, n_local=2))
imgs = torch.nn.functional.interpolate(torch.rand(4, 1, 8, 8, generator=g), size=96, mode="bilinear")
batch = collate_multicrop([crop(im, g) for im in imgs], (4, 4),
                          {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}, g)
if rank == 0:  # no masked patch on this rank
    batch["masks"].zero_()
    batch["mask_indices"], batch["mask_weights"] = batch["mask_indices"][:0], batch["mask_weights"][:0]
assert (rank == 0) == (len(batch["mask_indices"]) == 0)
for _ in range(2):
    loss, logs = model(batch, teacher_temp=0.04)
    loss.backward()
torch.save({"ibot": model.ibot_loss.center, "dino": model.dino_loss.center, "loss": loss.detach()},
           f"{out}/rank{rank}.pt")
dist.barrier()
close_distributed()
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy,centering", [("ddp", "centering"), ("fsdp", "centering"),
                                                ("ddp", "sinkhorn_knopp")])
def test_rank_without_masked_patches_joins_the_collectives(tmp_path, strategy, centering):
    """Rank 0 has no masked patch, rank 1 has some: two steps finish on both ranks (no hang) and
    both hold the same iBOT centre, moved by rank 1's patches."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "empty_rank.py"
    script.write_text(_EMPTY_RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), strategy, centering, str(tmp_path)],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung in mismatched collectives")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.isfinite(a["loss"]) and torch.isfinite(b["loss"])
    torch.testing.assert_close(a["ibot"], b["ibot"], rtol=0, atol=0)
    torch.testing.assert_close(a["dino"], b["dino"], rtol=0, atol=0)
    if centering == "centering":
        assert a["ibot"].abs().sum() > 0
