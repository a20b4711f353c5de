"""RAD-DINO pretraining loop: one process or many (``torchrun``), CPU or GPU, exact resume.

``train(cfg, images)`` takes the resolved ``configs/encoder`` config and a torch ``Dataset`` whose
items are radiographs as float tensors (1, H, W) in [0, 1] (``radgen`` builds it from files), so the
same loop serves any data source.

Exactness: every random draw of a step is derived from ``(seed, step, rank)`` — the data order
(a seeded permutation per data epoch), each sample's crops (a generator per sample), the iBOT
masks (a generator per micro-batch) and the global RNG used by drop-path (reseeded every step) —
so a run resumed from a checkpoint follows the same trajectory as one that never stopped.

Data parallelism (``train.strategy``, see ``encoder/distributed.py``): ``ddp`` replicates the
model and averages gradients with one all-reduce before clipping; ``fsdp`` shards student and
teacher with FSDP2. All collectives are skipped in a single process.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Dataset
from tqdm import tqdm

from encoder.augment import MultiCrop, MultiCropConfig
from encoder.checkpoint import load_latest_checkpoint, save_checkpoint
from encoder.distributed import (
    average_gradients,
    all_ranks_agree,
    all_sum,
    broadcast_model,
    full_state,
    load_full_state,
    resolve_strategy,
    set_gradient_sync,
    setup_distributed,
    shard_ssl_model,
    sync_diff,
)
from encoder.feeding import CollateMultiCrop, ResumableSampler, build_loader, mix_seed
from encoder.guards import CollapseGuard, NonFiniteGuard, train_config_errors
from encoder.inference import resolve_device, resolve_precision, set_deterministic
from encoder.io import atomic_write_text
from encoder.loop import CsvLog, StopSignal, tensorboard_writer
from encoder.masking import MASK_STYLES
from encoder.ssl import SSLConfig, SSLMetaArch, logs_to_host
from encoder.vit import ViTConfig, ViTEncoder

__all__ = ["train", "cosine_schedule", "build_param_groups", "collapse_flags", "Schedules",
           "resolve_mask_style", "teacher_start_share"]

CKPT_NAME = "checkpoint.pt"
LOG_FIELDS = ["step", "epoch", "lr", "wd", "momentum", "teacher_start_share", "teacher_temp", "loss", "dino", "ibot",
              "koleo", "teacher_entropy", "teacher_batch_entropy", "teacher_info", "cls_std", "collapse",
              "images_per_s", "sync_diff", "nonfinite_skipped"]


# ----------------------------------------------------------------------------------------------
# Schedules (precomputed arrays indexed by step, as in DINOv2)
# ----------------------------------------------------------------------------------------------
def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``."""
    warm = np.linspace(warmup_start, base, warmup, endpoint=False) if warmup > 0 else np.array([])
    n = max(total - warmup, 0)
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(n, 1)))
    out = np.concatenate([warm, cos])
    assert len(out) == total
    return out


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg: DictConfig, total: int, steps_per_epoch: int, global_batch: int) -> "Schedules":
        o, t = cfg.optim, cfg.teacher
        scale = {"sqrt": math.sqrt(global_batch / 1024), "linear": global_batch / 1024, "none": 1.0}[o.lr_scaling]
        lr = cosine_schedule(o.base_lr * scale, o.min_lr, total, int(o.warmup_epochs * steps_per_epoch))
        wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
        mom = cosine_schedule(t.momentum, t.final_momentum, total)
        warm_t = min(int(t.warmup_temp_epochs * steps_per_epoch), total)
        temp = np.concatenate([np.linspace(t.warmup_temp, t.temp, warm_t), np.full(total - warm_t, t.temp)])
        return cls(lr, wd, mom, temp, int(o.freeze_last_layer_epochs * steps_per_epoch))


def teacher_start_share(momentum: np.ndarray, steps: int) -> float:
    """The weight the teacher's EMA still gives its starting weights after ``steps`` updates.

    ``momentum``: the per-step schedule (T,). Each update keeps ``m`` of the teacher, so after
    ``steps`` updates the starting weights (a random init, or ``model.init_from``) carry
    ``prod(momentum[:steps])``. A short run with a slow teacher is mostly its start: probing it
    measures the init as much as the training (cpu_tiny at 400 steps: 0.45; 30 steps: 0.94). The
    early students are near the start too, so this is a lower bound on how much of it is the init.
    """
    return float(np.prod(np.asarray(momentum[:steps], dtype=np.float64)))


def build_param_groups(model: SSLMetaArch, layer_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with per-parameter lr / wd multipliers (DINOv2's recipe).

    Layer-wise lr decay: block ``i`` gets ``layer_decay ** (depth - i)``, the embeddings
    ``layer_decay ** (depth + 1)``, the final norm and heads 1. The patch embedding gets an extra
    ``patch_embed_lr_mult``. Biases, norms, LayerScale gammas and tokens get no weight decay. The
    heads' prototype layers are flagged so they can be frozen early in training.
    """
    depth = len(model.student["backbone"].blocks)
    groups: dict[tuple, dict] = {}
    for name, p in model.student.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            if sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            elif sub.startswith(("norm.",)):
                layer = depth + 1
            else:  # cls/pos/mask/register tokens, patch embedding
                layer = 0
            lr_mult = layer_decay ** (depth + 1 - layer)
            if sub.startswith("patch_embed."):
                lr_mult *= patch_embed_lr_mult
        else:
            lr_mult = 1.0
        no_wd = p.ndim == 1 or name.endswith((".gamma", "token", "tokens", "pos_embed")) or "norm" in name
        last = ".last_layer." in name
        key = (round(lr_mult, 8), 0.0 if no_wd else 1.0, last)
        g = groups.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1], "is_last_layer": last})
        g["params"].append(p)
    return list(groups.values())


def collapse_flags(logs: dict, out_dim: int, n_samples: int) -> str:
    """``ok``, ``dominant`` or ``uniform`` from the teacher's output distribution on a batch.

    With ``H(p)`` the per-sample entropy and ``H(mean p)`` the entropy of the batch-mean
    distribution, their difference is the mutual information between sample and prototype: how
    much the teacher's output tells samples apart. Both DINO collapses drive it to ~0:
    ``dominant`` — every sample on the same few prototypes (``H(mean p)`` small); ``uniform`` —
    every sample spread alike over many prototypes (``H(mean p)`` large, information ~0).
    Thresholds are fractions of ``ln(min(K, n))``, the most the batch can show.
    """
    if "teacher_entropy" not in logs or "teacher_batch_entropy" not in logs:
        return "n/a"
    reachable = math.log(max(2, min(out_dim, n_samples)))
    info = logs["teacher_batch_entropy"] - logs["teacher_entropy"]
    if logs["teacher_batch_entropy"] < 0.25 * reachable:
        return "dominant"
    if info < 0.1 * reachable:
        return "uniform"
    return "ok"


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def _device_and_precision(cfg: DictConfig) -> tuple[torch.device, str]:
    set_deterministic(bool(cfg.train.deterministic))  # before any CUDA work (cuBLAS reads its env var once)
    device = resolve_device(str(cfg.train.device))
    prec = cfg.train.precision
    if prec == "auto":
        # bf16 on GPUs that run it natively; CPU pretraining stays fp32 (its runs and tests are fp32)
        prec = resolve_precision("auto", device) if device.type == "cuda" else "fp32"
    if prec == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a GPU (use bf16 or fp32 on CPU)")
    if prec not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto/fp32/bf16/fp16, got {prec!r}")
    return device, prec


def build_model(cfg: DictConfig) -> SSLMetaArch:
    m = cfg.model
    vit_cfg = ViTConfig(arch=m.arch, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                        img_size=m.img_size, patch_size=m.patch_size,
                        num_register_tokens=m.num_register_tokens, drop_path_rate=m.drop_path_rate,
                        layerscale_init=m.layerscale_init)
    backbone = ViTEncoder(vit_cfg)
    backbone.set_grad_checkpointing(bool(m.grad_checkpointing))  # student only in effect: the teacher runs without grad
    training_sd = None  # a dinov2 training checkpoint: student, teacher and heads, loaded below
    if m.init_from:
        from encoder.ssl_checkpoint import HEAD_RISK, is_training_checkpoint
        from encoder.weights import read_state_dict, load_dinov2_state, load_hf_dinov2

        src = Path(m.init_from)
        if src.is_dir():
            loaded = load_hf_dinov2(src)
            sd = loaded.state_dict()
            if sd["pos_embed"].shape != backbone.pos_embed.shape:
                from encoder.weights import resize_pos_embed

                sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], backbone.pos_embed.shape[1] - 1)
            backbone.load_state_dict(sd)
        else:
            if not src.is_file():
                raise FileNotFoundError(f"model.init_from: {src}: no such file or folder")
            sd = read_state_dict(src)
            if is_training_checkpoint(sd):
                training_sd = sd
            else:
                load_dinov2_state(backbone, sd, str(src))
        if training_sd is None:
            warnings.warn(f"model.init_from={src} holds a backbone only: the DINO and iBOT heads start at "
                          f"random; {HEAD_RISK}", stacklevel=2)
    s = cfg.ssl
    ssl_cfg = SSLConfig(out_dim=s.out_dim, hidden_dim=s.hidden_dim, bottleneck_dim=s.bottleneck_dim,
                        nlayers=s.nlayers, ibot_separate_head=s.ibot_separate_head,
                        ibot_out_dim=s.ibot_out_dim, dino_weight=s.dino_weight,
                        ibot_weight=s.ibot_weight, koleo_weight=s.koleo_weight,
                        centering=s.centering, student_temp=s.student_temp,
                        center_momentum=s.center_momentum)
    meta = SSLMetaArch(backbone, ssl_cfg)
    if training_sd is not None:
        from encoder.ssl_checkpoint import load_training_state

        report = load_training_state(meta, training_sd, str(m.init_from))
        print(f"model.init_from: loaded {', '.join(report['loaded'])} from {m.init_from}", file=sys.stderr)
        for note in report["notes"]:
            warnings.warn(f"model.init_from: {note}", stacklevel=2)
    return meta


def _multicrop(cfg: DictConfig) -> MultiCrop:
    c = cfg.crops
    return MultiCrop(MultiCropConfig(
        global_size=c.global_size, local_size=c.local_size, n_local=c.n_local,
        global_scale=tuple(c.global_scale), local_scale=tuple(c.local_scale), hflip=c.hflip,
        brightness=c.brightness, contrast=c.contrast, gamma=tuple(c.gamma), noise_prob=c.noise_prob,
        # runs saved before these keys existed resume without them (off)
        range_compression=tuple(c.get("range_compression", (0.0, 0.0))),
        collimation_prob=c.get("collimation_prob", 0.0), collimation_max=c.get("collimation_max", 0.12)))


def validate_config(cfg: DictConfig) -> None:
    """Fail before any work starts, with every problem of the config in one message."""
    errors = []
    if not cfg.out:
        errors.append("'out' (output folder) is required")
    if cfg.model.init_from and not Path(str(cfg.model.init_from)).exists():
        errors.append(f"model.init_from: {cfg.model.init_from}: no such file or folder")
    rc = list(cfg.crops.get("range_compression", (0.0, 0.0)))
    if len(rc) != 2 or not -1.0 <= rc[0] <= rc[1] <= 1.0:
        errors.append(f"crops.range_compression must be [lo, hi] with -1 <= lo <= hi <= 1, got {rc}")
    if not 0.0 <= cfg.crops.get("collimation_prob", 0.0) <= 1.0:
        errors.append(f"crops.collimation_prob must be in [0, 1], got {cfg.crops.collimation_prob}")
    if not 0.0 <= cfg.crops.get("collimation_max", 0.12) < 0.5:
        errors.append(f"crops.collimation_max must be in [0, 0.5), got {cfg.crops.collimation_max}")
    if cfg.crops.global_size % cfg.model.patch_size or cfg.crops.local_size % cfg.model.patch_size:
        errors.append(f"crop sizes ({cfg.crops.global_size}, {cfg.crops.local_size}) must be "
                      f"multiples of the patch size {cfg.model.patch_size}")
    if cfg.optim.batch_size < 2:
        errors.append("optim.batch_size must be >= 2 (KoLeo and centring need a batch)")
    if cfg.optim.accum_steps < 1 or cfg.optim.epochs < 1:
        errors.append("optim.accum_steps and optim.epochs must be >= 1")
    lo, hi = cfg.masking.mask_ratio
    if not 0 <= lo <= hi < 1 or not 0 <= cfg.masking.mask_probability <= 1:
        errors.append("masking.mask_ratio must satisfy 0 <= lo <= hi < 1 and mask_probability in [0, 1]")
    style = OmegaConf.select(cfg, "masking.style", default=None)
    if style is not None and style not in MASK_STYLES:
        errors.append(f"masking.style must be one of {', '.join(MASK_STYLES)}, got {style!r}")
    errors += train_config_errors(cfg.train)
    try:
        SSLConfig(centering=cfg.ssl.centering, dino_weight=cfg.ssl.dino_weight,
                  ibot_weight=cfg.ssl.ibot_weight, koleo_weight=cfg.ssl.koleo_weight)
    except ValueError as exc:
        errors.append(str(exc))
    if errors:
        raise ValueError("pretrain-encoder: invalid config:\n  - " + "\n  - ".join(errors))


def resolve_mask_style(cfg: DictConfig, saved_config: dict | None) -> str:
    """The iBOT mask style (``masking.style``) a run uses, given the config of the checkpoint it
    resumes (``None``: a fresh run).

    A config without ``masking.style`` predates the DINOv2 style: it means ``legacy``, the only
    masking there was then. So a run started before the key existed resumes with ``legacy``
    whatever the current default says, and its masks continue exactly. A checkpoint that names a
    style must be resumed with that style: switching would make the resumed run differ from an
    uninterrupted one, so it is refused (start a new run to change style).
    """
    current = OmegaConf.select(cfg, "masking.style", default=None) or "legacy"
    if saved_config is None:
        return current
    saved = (saved_config.get("masking") or {}).get("style")
    if saved is None:
        if current != "legacy":
            warnings.warn("the checkpoint being resumed predates masking.style: resuming with "
                          f"masking.style=legacy (not {current!r}) so its masks continue exactly",
                          stacklevel=2)
        return "legacy"
    if saved != current:
        raise ValueError(f"checkpoint written with masking.style={saved}, now {current}: resume "
                         "would not be exact (resume with the same style or start a new run)")
    return saved


def train(cfg: DictConfig, images: Dataset) -> dict:
    """Pretrain on ``images`` (items: float tensors (1, H, W) in [0, 1]); returns a summary."""
    validate_config(cfg)
    device, precision = _device_and_precision(cfg)
    rank, world = setup_distributed(device)
    strategy = resolve_strategy(cfg.train.strategy, world)
    out = Path(cfg.out)
    ckpt_path = out / CKPT_NAME
    ckpt = load_latest_checkpoint(ckpt_path) if cfg.train.resume else None
    # Settle the mask style before the config is written, so config.yaml and the checkpoints
    # record the style the run really uses (an old run resumes with "legacy").
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.masking.style = resolve_mask_style(cfg, (ckpt.get("config") or {}) if ckpt else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    o = cfg.optim
    B, accum = int(o.batch_size), int(o.accum_steps)
    global_batch = B * world * accum
    steps_per_epoch = int(o.steps_per_epoch or max(1, len(images) // global_batch))
    total = int(o.epochs * steps_per_epoch)
    stop_at = min(total, int(o.max_steps)) if o.max_steps else total
    sched = Schedules.from_config(cfg, total, steps_per_epoch, global_batch)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    broadcast_model(model, world)  # before sharding, so every rank shards the same weights
    if strategy == "fsdp":
        # bf16: all-gather and compute in bf16, reduce-scatter gradients in fp32 (fp32 master shards)
        shard_ssl_model(model, device, param_dtype=torch.bfloat16 if precision == "bf16" else None)
    groups = build_param_groups(model, o.layer_decay, o.patch_embed_lr_mult)
    opt = torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]

    start, start_share = 0, 1.0
    if ckpt is not None:
        if ckpt.get("global_batch") != global_batch:
            raise ValueError(f"{ckpt_path}: written with global batch {ckpt.get('global_batch')}, "
                             f"now {global_batch}: resume would not be exact")
        load_full_state(model, opt, ckpt["model"], ckpt["optimizer"])
        start = int(ckpt["step"])
        # exact across skipped steps when the checkpoint recorded it; older ones: the schedule's product
        start_share = float(ckpt.get("teacher_start_share", teacher_start_share(sched.momentum, start)))
        del ckpt

    grid = (cfg.crops.global_size // cfg.model.patch_size,) * 2
    mask_cfg = {"mask_ratio_range": tuple(cfg.masking.mask_ratio),
                "mask_probability": float(cfg.masking.mask_probability),
                "style": cfg.masking.style,
                # DINOv2's default largest block is computed from the crop and patch size.
                "img_size": int(cfg.crops.global_size),
                "patch_size": int(cfg.model.patch_size)} if model.do_ibot else None
    sampler = ResumableSampler(len(images), B, rank, world, cfg.seed, start=start * accum)
    loader = build_loader(images, _multicrop(cfg), sampler, CollateMultiCrop(grid, mask_cfg, cfg.seed, rank), B,
                          int(cfg.data.num_workers), device)
    batches = iter(loader)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    log = CsvLog(out / "log.csv", LOG_FIELDS, keep=lambda r: int(r["step"]) < start) if rank == 0 else None
    tb = tensorboard_writer(out) if rank == 0 else None

    saved = {"step": start if ckpt_path.is_file() else None}
    nonfinite = NonFiniteGuard(str(cfg.train.on_nonfinite), int(cfg.train.max_nonfinite_skips))
    collapse = CollapseGuard(int(cfg.train.stop_on_collapse))

    def kept() -> str:
        return (f"the last good checkpoint (step {saved['step']}) is kept at {ckpt_path}" if saved["step"] is not None
                else "no checkpoint had been written yet")

    def save(step_next: int, logs: dict) -> None:
        if rank != 0 and strategy != "fsdp":
            return
        model_sd, opt_sd = full_state(model, opt)  # collective under FSDP: every rank calls it
        if rank != 0:
            return
        save_checkpoint(ckpt_path, {
            "step": step_next, "model": model_sd, "optimizer": opt_sd, "strategy": strategy,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "vit_config": model.student["backbone"].cfg.to_dict(),
            "ssl_config": model.config_dict(), "global_batch": global_batch, "world_size": world,
            "teacher_start_share": start_share,  # its own key: a re-run of a finished run saves empty logs
            "last_logs": {k: v for k, v in logs.items() if isinstance(v, (int, float, str))},
        }, keep=int(cfg.train.keep_checkpoints))
        saved["step"] = step_next

    bar = tqdm(total=stop_at, initial=start, desc="pretrain", unit="step",
               disable=rank != 0 or not cfg.train.progress, dynamic_ncols=True)
    logs: dict = {}
    status = "finished"
    t_last = time.perf_counter()
    with StopSignal() as pre:
        for step in range(start, stop_at):
            torch.manual_seed(mix_seed(cfg.seed, 2, step, rank))  # drop-path etc.: exact on resume
            lr, wd = float(sched.lr[step]), float(sched.wd[step])
            for g in opt.param_groups:
                frozen = g["is_last_layer"] and step < sched.freeze_last_layer_steps
                g["lr"] = 0.0 if frozen else lr * g["lr_mult"]
                g["weight_decay"] = wd * g["wd_mult"]
            temp = float(sched.teacher_temp[step])
            model.student.train()
            acc: dict = {}  # this step's logs, device tensors until read once after backward
            for micro in range(accum):
                if strategy == "fsdp":  # reduce-scatter once, after the last micro-batch
                    set_gradient_sync(model, micro == accum - 1)
                batch = next(batches)  # collated (and its masks drawn) in the loader
                batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, part = model(batch, temp)
                loss = loss / accum
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in part.items():
                    acc[k] = acc.get(k, 0.0) + v.double() / accum  # float64, as the floats it replaced
            if strategy == "ddp":
                average_gradients(params, world)  # FSDP has already reduce-scattered them
            if scaler:
                scaler.unscale_(opt)
            # The norm is needed anyway to catch an inf gradient behind a finite loss; with
            # max_norm=inf the gradients are multiplied by exactly 1.
            gnorm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad or float("inf"))
            acc = logs_to_host({**acc, "_gnorm": gnorm})  # the step's one device-to-host read
            gnorm = acc.pop("_gnorm")
            ok = NonFiniteGuard.finite(acc["loss"], 0.0 if scaler else gnorm)  # fp16: the scaler skips inf grads
            ok = all_ranks_agree(ok, device, world)
            if nonfinite.should_skip(ok, f"pretrain step {step}", kept()):
                opt.zero_grad(set_to_none=True)  # no optimiser or teacher update for this step
            elif scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if ok:
                opt.zero_grad(set_to_none=True)
                model.update_teacher(float(sched.momentum[step]))
                start_share *= float(sched.momentum[step])
            acc["nonfinite_skipped"] = nonfinite.skipped
            if cfg.train.verify_sync:
                acc["sync_diff"] = sync_diff(model, world)

            now = time.perf_counter()
            acc.update(step=step, epoch=step // steps_per_epoch, lr=lr, wd=wd,
                       momentum=float(sched.momentum[step]), teacher_start_share=start_share, teacher_temp=temp,
                       images_per_s=global_batch / max(now - t_last, 1e-9))
            acc["collapse"] = collapse_flags(acc, model.dino_loss.out_dim, 2 * B)
            flag = acc["collapse"]  # this rank's batch; a stop must be taken by every rank at the same step
            if collapse.patience and all_sum(float(flag != "ok"), device, world) > 0 and flag == "ok":
                flag = "flagged on another rank"
            collapse.update(flag, f"pretrain step {step}", kept())
            if "teacher_entropy" in acc:
                acc["teacher_info"] = acc["teacher_batch_entropy"] - acc["teacher_entropy"]
            t_last = now
            logs = acc
            if log and (step % cfg.train.log_every == 0 or step == stop_at - 1):
                log.write({k: acc.get(k) for k in LOG_FIELDS})
                if tb:
                    for k in LOG_FIELDS[4:]:
                        if isinstance(acc.get(k), float):
                            tb.add_scalar(k, acc[k], step)
            bar.set_postfix(loss=f"{acc['loss']:.3f}", img_s=f"{acc['images_per_s']:.1f}",
                            collapse=acc["collapse"], refresh=False)
            bar.update()
            done = step + 1
            if all_sum(float(pre.flag), device, world) > 0:  # SIGTERM on any rank: all save and stop here
                save(done, logs)
                status = "preempted"
                break
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < stop_at:
                save(done, logs)
        else:
            done = stop_at
            save(done, logs)
    bar.close()
    if log:
        log.close()
    if tb:
        tb.close()
    return {"status": status, "steps": done, "total_steps": total, "checkpoint": str(ckpt_path),
            "last": logs, "rank": rank, "world_size": world, "strategy": strategy, "precision": precision, "device": str(device)}
