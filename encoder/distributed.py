"""Data parallelism for pretraining: one process, DDP-style replication, or FSDP sharding.

Guarded throughout: with one process nothing here touches ``torch.distributed``.

* ``ddp``: every rank holds the whole model; gradients are averaged with one flat all-reduce
  before clipping (what DDP does, without overlapping communication with backward).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every transformer block, each
  backbone and each head of *both* student and teacher the same way, so the teacher EMA is a
  shard-local update and no rank ever holds a whole copy. Gradients are reduce-scattered
  (averaged) by FSDP itself. For ViT-L/g on many GPUs this is what keeps memory per GPU flat.

Checkpoints are written in one format whatever the strategy: full (unsharded) model and optimizer
state dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``), so a run can
be resumed under a different world size or strategy only if the global batch is unchanged (the
loop checks) and any checkpoint loads into a plain module for feature extraction.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["STRATEGIES", "setup_distributed", "close_distributed", "resolve_strategy", "shard_ssl_model", "average_gradients",
           "sum_gradients", "all_sum", "all_ranks_agree", "set_gradient_sync", "broadcast_model", "sync_diff", "full_state",
           "load_full_state"]

STRATEGIES = ("auto", "ddp", "fsdp")


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes; ``(rank, world)`` (``(0, 1)`` without torchrun).

    A CUDA ``device`` (from :func:`encoder.inference.resolve_device`) becomes the current one first.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_distributed(timeout_s: float = 60.0) -> None:
    """Tear down the process group, the ranks together; a no-op when there is none.

    Left to the interpreter's shutdown, or torn down by one rank while another still talks to it,
    gloo's threads can abort the process ("terminate called without an active exception", seen in
    the 2-rank pretraining tests under load), failing a run that succeeded. So gloo ranks first meet
    at a barrier bounded in time, so that a rank whose peer died still exits."""
    from datetime import timedelta

    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    except Exception:  # a peer that failed or left: nothing to wait for
        pass
    dist.destroy_process_group()


def resolve_strategy(strategy: str, world: int) -> str:
    """``single`` for one process; ``auto`` means ``ddp`` (ViT-B fits on any GPU that trains it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world == 1:
        return "single"
    return "ddp" if strategy == "auto" else strategy


def shard_ssl_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> None:
    """Apply FSDP2 in place: blocks first, then each backbone and head (student and teacher alike).

    Student and teacher get the same sharding, so parameter i of the student and of the teacher
    are shards of the same shape on every rank and the EMA needs no communication.
    ``param_dtype`` (bf16 training): parameters are all-gathered and used in that dtype, gradients
    reduce-scattered in fp32 into the fp32 shards (``MixedPrecisionPolicy``); None: all fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for branch in (model.student, model.teacher):
        for blk in branch["backbone"].blocks:
            fully_shard(blk, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
        for name in branch.keys():
            # reshard_after_forward=True also for these top-level modules: FSDP2 keeps a root
            # unsharded after forward until its backward, which the teacher never runs.
            fully_shard(branch[name], mesh=mesh, reshard_after_forward=True, mp_policy=mp)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP: whether this backward reduce-scatters (False accumulates unsharded gradients locally)."""
    for name in model.student.keys():
        model.student[name].set_requires_gradient_sync(sync)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """DDP-style mean of gradients over ranks with one flat all-reduce."""
    sum_gradients(params, world, divide_by=world)


def sum_gradients(params: list[nn.Parameter], world: int, divide_by: int = 1) -> None:
    """Sum of gradients over ranks (divided by ``divide_by``) with one flat all-reduce.

    Every rank must call it with the same ``params``: a parameter without a gradient on this rank
    (unused, or no backward at all because none of its inputs loaded) contributes zeros.
    """
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def broadcast_model(model: nn.Module, world: int) -> None:
    """Rank 0's weights and buffers everywhere (before sharding, so FSDP shards agree)."""
    if world == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_sum(x: float, device: torch.device, world: int) -> float:
    """Sum of ``x`` over ranks (one tiny all-reduce that every rank must call). ``> 0`` of a 0/1
    flag: some rank raised it, which is how every rank takes a stop at the same step."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_ranks_agree(flag: bool, device: torch.device, world: int) -> bool:
    """True only if ``flag`` holds on every rank (one tiny all-reduce that every rank must call)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def sync_diff(model: nn.Module, world: int) -> float:
    """Largest difference across ranks of per-tensor float64 checksums of the *full* weights (0.0 = identical)."""
    if world == 1:
        return 0.0
    sums = torch.stack([_full(t.detach()).double().sum().cpu() for t in model.state_dict().values()])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    if dist.get_backend() == "nccl":
        sums, gathered = sums.cuda(), [g.cuda() for g in gathered]
    dist.all_gather(gathered, sums)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded CPU model and optimizer state dicts keyed by parameter name (collective under FSDP)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, opt, options=_FULL)


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict) -> None:
    """Inverse of :func:`full_state`; works on plain, replicated and sharded models alike."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if any(isinstance(k, int) for k in opt_sd.get("state", {})):
        # written before name-keyed optimizer state (plain opt.state_dict(), keyed by position)
        if any(hasattr(p, "full_tensor") for p in model.parameters()):
            raise ValueError("this checkpoint's optimizer state is keyed by position; resume it without FSDP")
        opt.load_state_dict(opt_sd)
        return
    set_optimizer_state_dict(model, opt, opt_sd, options=opts)
