"""Feeding the GPU: crops collated in the loader's workers into pinned memory, no host reads in
the SSL step's forward, one-channel crops, and FSDP2 mixed precision under bf16."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from encoder.augment import MultiCrop, MultiCropConfig, collate_multicrop
from encoder.ssl import SSLConfig, SSLMetaArch
from encoder.feeding import CollateMultiCrop, ResumableSampler, build_loader
from encoder.vit import build_vit

MASKS = {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}


def _images(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return list(torch.nn.functional.interpolate(torch.rand(n, 1, 6, 6, generator=g), size=64, mode="bilinear"))


def _loader(device: str, workers: int = 0):
    sampler = ResumableSampler(8, 2, rank=0, world=1, seed=0, start=3)
    mc = MultiCrop(MultiCropConfig(global_size=56, local_size=28, n_local=2))
    return build_loader(_images(), mc, sampler, CollateMultiCrop((4, 4), MASKS, seed=0, rank=0), 2, workers,
                        torch.device(device))


def test_loader_pins_only_on_cuda_and_keeps_its_workers():
    cpu, cuda = _loader("cpu"), _loader("cuda", workers=2)  # built, not iterated: no GPU needed
    assert not cpu.pin_memory and cuda.pin_memory
    assert not cpu.persistent_workers and cuda.persistent_workers and cuda.num_workers == 2
    assert isinstance(cuda.collate_fn, CollateMultiCrop) and cuda.worker_init_fn is not None


def test_workers_collate_the_same_batches():
    """Collation (and the iBOT masks) in 2 worker processes equals collation in this process, and
    micro-batch k's masks are drawn as the training loop drew them before (seed, 3, k, rank)."""
    from encoder.feeding import mix_seed as _mix

    inline, workers = iter(_loader("cpu")), iter(_loader("cpu", workers=2))
    for k in range(3, 6):  # the sampler starts at micro-batch 3 (a resumed run)
        a, b = next(inline), next(workers)
        assert a.keys() == b.keys() and a["global_crops"].shape == (4, 1, 56, 56)
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
        samples = [_loader("cpu").dataset[(e, i, k)] for e, i, _ in _keys(k)]
        ref = collate_multicrop(samples, (4, 4), MASKS, torch.Generator().manual_seed(_mix(0, 3, k, 0)))
        assert torch.equal(ref["masks"], a["masks"])


def _keys(k: int) -> list[tuple]:
    it = iter(ResumableSampler(8, 2, rank=0, world=1, seed=0, start=k))
    return [next(it), next(it)]


def test_encoder_takes_one_channel_crops():
    vit = build_vit("vit_tiny", img_size=56, depth=1, embed_dim=24, num_heads=2)
    x = torch.randn(2, 1, 56, 56)
    assert torch.equal(vit(x)["cls"], vit(x.expand(-1, 3, -1, -1).contiguous())["cls"])


class _HostReads(TorchDispatchMode):
    """Records ops that make the host wait for the device: reading a value (``.item()``,
    ``float()``, ``bool()``, ...), ``nonzero`` and boolean-mask indexing (whose result size the
    host must learn first)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_local_scalar_dense" in name or "nonzero" in name or "masked_select" in name:
            self.seen.append(name)
        if name.startswith("aten.index.Tensor") and any(
                torch.is_tensor(t) and t.dtype == torch.bool for t in (args[1] or [])):
            self.seen.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_ssl_forward_reads_nothing_back_from_the_device(centering):
    """Between the teacher's and the student's forward (and up to backward) nothing waits for the
    device; the logs stay tensors and are read in one copy afterwards."""
    from encoder.ssl import logs_to_host

    torch.manual_seed(0)
    model = SSLMetaArch(build_vit("vit_tiny", img_size=56, depth=2, embed_dim=48, num_heads=3),
                        SSLConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32, centering=centering))
    batch = next(iter(_loader("cpu")))
    with _HostReads() as reads:
        loss, logs = model(batch, teacher_temp=0.04)
        loss.backward()
    assert reads.seen == []
    assert all(torch.is_tensor(v) and not v.requires_grad for v in logs.values())
    host = logs_to_host(logs)
    assert host["loss"] == pytest.approx(host["dino"] + host["ibot"] + 0.1 * host["koleo"], rel=1e-5)


def test_fsdp_bf16_gathers_in_bf16_and_reduces_in_fp32(one_rank_group):
    from encoder.distributed import shard_ssl_model

    torch.manual_seed(0)
    model = SSLMetaArch(build_vit("vit_tiny", img_size=56, depth=2, embed_dim=48, num_heads=3),
                        SSLConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32))
    shard_ssl_model(model, torch.device("cpu"), param_dtype=torch.bfloat16)
    seen = []
    qkv = model.student["backbone"].blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    loss, _ = model(next(iter(_loader("cpu"))), teacher_temp=0.04)
    loss.backward()
    assert seen and set(seen) == {torch.bfloat16}  # computed with bf16 all-gathered weights
    p = model.student["backbone"].blocks[0].attn.qkv.weight  # the fp32 shard the optimiser steps
    assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


class _Sharded(Exception):
    pass


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_pretrain_passes_the_fsdp_precision(monkeypatch, tmp_path, precision, dtype):
    import encoder.train as et
    from radgen.config import load_config

    def shard(model, device, param_dtype=None):
        raise _Sharded(param_dtype)

    monkeypatch.setattr(et, "resolve_strategy", lambda strategy, world: "fsdp")
    monkeypatch.setattr(et, "shard_ssl_model", shard)
    tiny = ["model.arch=vit_tiny", "model.embed_dim=48", "model.depth=1", "model.num_heads=3", "model.img_size=56",
            "ssl.out_dim=64", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32", "crops.global_size=56",
            "crops.local_size=28", "train.device=cpu", f"train.precision={precision}"]
    with pytest.raises(_Sharded) as exc:
        et.train(load_config("encoder", [], [f"out={tmp_path}", *tiny]), _images())
    assert exc.value.args[0] == dtype


def test_gpu_recipe_uses_workers(tmp_path):
    from radgen.config import load_config

    assert load_config("encoder", ["rad_dino_vitb14"], [f"out={tmp_path}"]).data.num_workers >= 4
