"""Throughput of one DINOv2-style pretraining step for a ViT-S/14, against the machine's matmul peak.

1. Matmul peak: best-of-N time of a 2048 x 2048 x 2048 matmul in fp32 and bf16 (FLOPs = 2 n^3).
   Also the rate of one matmul with the shape of the ViT's MLP fc1 on the global batch
   (rows = 2B*N tokens, 384 -> 1536), i.e. what the model's own GEMMs can reach on this machine.
2. A full step of ``encoder.ssl.SSLMetaArch`` on ``build_vit("vit_small", img_size=224)``:
   teacher forward on the 2B global crops + DINO/iBOT heads and targets, student forward on the
   masked global crops and the L*B local crops, heads, DINO + iBOT + KoLeo losses, backward,
   gradient clipping (3.0, as DINOv2), AdamW step, EMA teacher update.
   The batch comes from ``encoder.augment.collate_multicrop`` fed with *precomputed random crop
   tensors* of the right shapes (2 globals at ``--global-size``, ``--n-local`` locals at
   ``--local-size``) and iBOT block masks drawn with mask_probability 0.5, ratio (0.1, 0.5):
   data loading and augmentation cost is EXCLUDED from the timing.
3. Model FLOPs per step, two ways (both printed):
   * ``torch.utils.flop_counter.FlopCounterMode`` on the first (warm-up) step. On CPU, SDPA runs
     as ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``), which the
     counter does not know; we map them to torch's own SDPA formulas via ``custom_mapping``.
   * analytically, matmuls only (see :func:`analytic_flops`).
   Achieved FLOP/s = FlopCounterMode FLOPs / median step time; fraction of peak is against the
   2048^3 matmul peak of the same precision.

This is a benchmark script, not a test: it prints what this run measured and never fails.

    .venv/bin/python bench/pretrain_step.py                 # fp32, batch 16, 8 locals
    .venv/bin/python bench/pretrain_step.py --bf16          # fp32, then bf16 autocast
    .venv/bin/python bench/pretrain_step.py --bf16 --no-fp32 --batch 8 --steps 2
    .venv/bin/python bench/pretrain_step.py --quick         # batch 2, 112 px + 2x56 px locals, 2 steps (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from _common import RATIO_PEAK, add_json_arg, peak_row, row, write_json  # noqa: E402
from _peak import CPU_SDPA_FLOPS, matmul_rate  # noqa: E402  (bench/ is sys.path[0])

from encoder.augment import collate_multicrop  # noqa: E402
from encoder.ssl import SSLConfig, SSLMetaArch  # noqa: E402
from encoder.vit import build_vit  # noqa: E402

# The size options: the full defaults, and what --quick uses for those not given on the command line.
FULL = dict(batch=16, global_size=224, local_size=98, n_local=8, out_dim=4096, steps=3)
QUICK = dict(batch=2, global_size=112, local_size=56, n_local=2, out_dim=1024, steps=2)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def vit_forward_flops(n_tokens: int, n_patches: int, dim: int, depth: int, patch: int,
                      mlp_ratio: float = 4.0, in_chans: int = 3) -> float:
    """Forward FLOPs of one image through the ViT (matmuls only; FLOPs = 2 x multiply-adds).

    Per token per layer, multiply-adds:
      qkv 3*D^2 + attention output proj D^2 + MLP 2*r*D^2 (= 8*D^2 for r = 4)  -> 12*D^2
      attention scores q.k^T (N*D) + weighted sum of values (N*D)              -> 2*N*D
    i.e. FLOPs per token per layer = 24*D^2 + 4*N*D; times N tokens, times L layers.
    Plus the patch embedding: n_patches * (C*p*p*D) multiply-adds.
    LayerNorm, GELU, softmax, residual adds and LayerScale are elementwise and left out.
    """
    per_layer_macs = n_tokens * ((4 + 2 * mlp_ratio) * dim * dim + 2 * n_tokens * dim)
    patch_macs = n_patches * in_chans * patch * patch * dim
    return 2.0 * (depth * per_layer_macs + patch_macs)


def head_flops(rows: int, in_dim: int, cfg: SSLConfig, out_dim: int) -> float:
    """Forward FLOPs of a DINOHead on ``rows`` vectors: MLP (in->hidden->...->bottleneck) + prototypes."""
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1) + [cfg.bottleneck_dim]
    macs = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + cfg.bottleneck_dim * out_dim
    return 2.0 * rows * macs


def analytic_flops(B: int, n_local: int, g: int, l: int, vit, cfg: SSLConfig, n_masked: int) -> dict:
    """Model FLOPs of one step, matmuls only.

    * teacher: 1x forward of the backbone on 2B global crops + DINO head on 2B CLS + iBOT
      (shared) head on the M masked patch tokens (no backward);
    * student: forward on 2B global + L*B local crops, DINO head on (2+L)*B CLS, iBOT head on
      M patches; backward ~= 2x forward (grad wrt inputs and wrt weights), so fwd+bwd ~= 3x fwd.
      (The patch embedding needs no input gradient, so this slightly overcounts.)
    * optimizer, clipping, EMA, losses, softmax/centering: elementwise, not counted.
    """
    c = vit.cfg
    p = c.patch_size
    extra = 1 + c.num_register_tokens

    def fwd(size: int) -> float:
        n_p = (size // p) ** 2
        return vit_forward_flops(n_p + extra, n_p, c.embed_dim, c.depth, p, c.mlp_ratio, c.in_chans)

    D, K = c.embed_dim, cfg.out_dim
    teacher = 2 * B * fwd(g) + head_flops(2 * B, D, cfg, K) + head_flops(n_masked, D, cfg, K)
    student_fwd = (2 * B * fwd(g) + n_local * B * fwd(l) + head_flops((2 + n_local) * B, D, cfg, K)
                   + head_flops(n_masked, D, cfg, K))
    return {"teacher_fwd": teacher, "student_fwd": student_fwd, "student_fwd_bwd": 3 * student_fwd,
            "total": teacher + 3 * student_fwd}


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
def make_batch(B: int, n_local: int, g: int, l: int, patch: int, seed: int) -> dict:
    """A collated multi-crop batch from random crop tensors (no augmentation)."""
    gen = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, l, l, generator=gen) for _ in range(n_local)]}
               for _ in range(B)]
    mask_cfg = {"mask_ratio_range": (0.1, 0.5), "mask_probability": 0.5}
    return collate_multicrop(samples, (g // patch, g // patch), mask_cfg, gen)


class StepTimer:
    """Wraps ``meta.teacher_targets`` (called from ``SSLMetaArch.forward``) to time it separately."""

    def __init__(self, meta: SSLMetaArch):
        self.acc: dict[str, float] = defaultdict(float)
        orig = meta.teacher_targets

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = orig(*a, **k)
            self.acc["teacher fwd (backbone+heads+targets)"] += time.perf_counter() - t0
            return out

        meta.teacher_targets = timed  # instance attribute shadows the method; the class is untouched


def run_step(meta, opt, batch, bf16: bool, timer: StepTimer) -> dict[str, float]:
    acc = timer.acc
    acc.clear()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, logs = meta(batch, teacher_temp=0.07)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0)
    opt.step()
    t3 = time.perf_counter()
    meta.update_teacher(0.996)
    t4 = time.perf_counter()
    teacher = acc["teacher fwd (backbone+heads+targets)"]
    return {"teacher fwd (backbone+heads+targets)": teacher,
            "student fwd (backbone+heads+losses)": t1 - t0 - teacher,
            "student bwd": t2 - t1,
            "clip + AdamW step": t3 - t2,
            "EMA update": t4 - t3,
            "total": t4 - t0,
            "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--batch", type=int, help="images per step (each gives 2 + n_local crops; default 16)")
    ap.add_argument("--global-size", type=int, help="default 224")
    ap.add_argument("--local-size", type=int, help="default 98")
    ap.add_argument("--n-local", type=int, help="default 8")
    ap.add_argument("--out-dim", type=int, help="prototypes K of the DINO/iBOT head (default 4096)")
    ap.add_argument("--steps", type=int, help="timed steps per precision, after 1 warm-up (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="a small step in seconds: batch 2, 112 px globals, 2 locals of 56 px, out_dim 1024, "
                         "2 timed steps (options given explicitly still apply)")
    ap.add_argument("--bf16", action="store_true", help="also run with bf16 autocast")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 run")
    ap.add_argument("--peak-tries", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} "
          f"threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"loadavg {os.getloadavg()[0]:.2f}")

    precisions = ([] if args.no_fp32 else ["fp32"]) + (["bf16"] if args.bf16 else [])
    if not precisions:
        ap.error("nothing to run: --no-fp32 without --bf16")

    # --- peak ---------------------------------------------------------------------------------
    B, L, g, l = args.batch, args.n_local, args.global_size, args.local_size
    vit = build_vit(args.arch, img_size=g)
    D = vit.embed_dim
    rows = 2 * B * (1 + (g // vit.cfg.patch_size) ** 2)
    peak, shaped = {}, {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name not in precisions and name != "fp32":
            continue
        try:
            peak[name] = matmul_rate(2048, 2048, 2048, dt, args.peak_tries)
            shaped[name] = matmul_rate(rows, D, 4 * D, dt, max(3, args.peak_tries // 2))
        except Exception as e:  # noqa: BLE001
            print(f"{name} matmul failed: {type(e).__name__}: {e}; skipping {name}")
            precisions = [p for p in precisions if p != name]
            continue
        print(f"matmul peak {name}: {peak[name] / 1e9:.1f} GFLOP/s (2048^3, best of {args.peak_tries}); "
              f"fc1-shaped ({rows}x{D} @ {D}x{4 * D}): {shaped[name] / 1e9:.1f} GFLOP/s")

    # --- model and batch ----------------------------------------------------------------------
    cfg = SSLConfig(out_dim=args.out_dim)
    meta = SSLMetaArch(vit, cfg)
    meta.student.train()
    params = [p for p in meta.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, betas=(0.9, 0.999))
    batch = make_batch(B, L, g, l, vit.cfg.patch_size, args.seed)
    n_masked = int(batch["masks"].sum())
    timer = StepTimer(meta)
    n_params = sum(p.numel() for p in params)
    print(f"{args.arch} ({sum(p.numel() for p in vit.parameters()) / 1e6:.1f} M backbone params, "
          f"{n_params / 1e6:.1f} M trainable incl. heads), out_dim {cfg.out_dim}, batch {B}: "
          f"2x{g}px global + {L}x{l}px local crops per image, {n_masked} masked patches "
          f"({int(batch['masks'].any(1).sum())}/{2 * B} global crops masked)")
    print("timing excludes data loading and augmentation (precomputed random crops)")

    ana = analytic_flops(B, L, g, l, vit, cfg, n_masked)

    from torch.utils.flop_counter import FlopCounterMode

    results = []
    for prec in precisions:
        bf16 = prec == "bf16"
        # warm-up step, counted by FlopCounterMode
        try:
            with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
                warm = run_step(meta, opt, batch, bf16, timer)
            counted = float(fc.get_total_flops())
            by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        except Exception as e:  # noqa: BLE001 - fall back to the analytic count
            print(f"FlopCounterMode failed ({type(e).__name__}: {e}); using the analytic count")
            warm = run_step(meta, opt, batch, bf16, timer)
            counted, by_op = float("nan"), {}
        steps = [run_step(meta, opt, batch, bf16, timer) for _ in range(args.steps)]
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        flops = counted if counted == counted else ana["total"]
        rate = flops / med["total"]
        results.append((prec, med, min(s["total"] for s in steps), rate, flops))

        step_list = ", ".join(f"{s['total']:.1f}" for s in steps)
        print(f"\n== {prec}{' autocast' if bf16 else ''}: warm-up {warm['total']:.1f} s (under the counter), "
              f"{args.steps} timed steps {step_list} s, "
              f"loss {steps[-1]['loss']:.3f}")
        print(f"FLOPs/step: FlopCounterMode {counted / 1e12:.3f} TFLOP, analytic {ana['total'] / 1e12:.3f} TFLOP "
              f"(ratio {counted / ana['total']:.3f}; analytic teacher fwd {ana['teacher_fwd'] / 1e12:.3f}, "
              f"student fwd+bwd {ana['student_fwd_bwd'] / 1e12:.3f})")
        if by_op:
            print("  counted by op: " + ", ".join(f"{k.replace('aten.', '')} {v / 1e12:.3f}T"
                                                for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])))
        print(f"median step {med['total']:.2f} s -> {B / med['total']:.2f} images/s "
              f"({B * (2 + L) / med['total']:.1f} crops/s), {rate / 1e9:.1f} GFLOP/s achieved = "
              f"{100 * rate / peak[prec]:.1f}% of the {prec} 2048^3 matmul peak "
              f"({100 * rate / shaped[prec]:.1f}% of the fc1-shaped matmul rate)")
        print("breakdown (median s, % of step):")
        for k, v in med.items():
            if k not in ("total", "loss"):
                print(f"  {k:<38} {v:7.2f}  {100 * v / med['total']:5.1f}%")

    print("\n| precision | batch | median step s | images/s | model TFLOP/step (counted) | "
          "achieved GFLOP/s | matmul peak GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for prec, med, best, rate, flops in results:
        print(f"| {prec} | {B} | {med['total']:.2f} | {B / med['total']:.2f} | {flops / 1e12:.3f} | "
              f"{rate / 1e9:.1f} | {peak[prec] / 1e9:.1f} | {100 * rate / peak[prec]:.1f}% |")
    # Re-measure the peak: if it moved, other processes loaded the machine during the run and
    # the fractions above are unreliable (they use the peak measured before the steps).
    after = {name: matmul_rate(2048, 2048, 2048, dt, args.peak_tries)
             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if name in peak}
    print("matmul peak re-measured after the steps: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s ({100 * v / peak[k]:.0f}% of before)" for k, v in after.items())
          + f"; loadavg at end {os.getloadavg()[0]:.2f}")
    out = [peak_row("pretrain_step", k, v / 1e9, "start") for k, v in peak.items()]
    out += [peak_row("pretrain_step", k, v / 1e9, "end") for k, v in after.items()]
    for prec, med, best, rate, flops in results:
        out.append(row("pretrain_step", f"{args.arch} {g}px b{B} {L}x{l}px locals {prec}", RATIO_PEAK,
                       rate / peak[prec], rate / 1e9, "GFLOP/s achieved",
                       f"median step {med['total']:.2f} s ({args.steps} timed); "
                       f"{flops / 1e12:.3f} TFLOP/step; {prec} peak {peak[prec] / 1e9:.0f} GFLOP/s before, "
                       f"{after[prec] / 1e9:.0f} after",
                       precision=prec, batch=B, median_step_s=med["total"], best_step_s=best,
                       images_per_s=B / med["total"], tflop_per_step=flops / 1e12,
                       peak_gflops=peak[prec] / 1e9, peak_after_gflops=after[prec] / 1e9,
                       fc1_shaped_gflops=shaped[prec] / 1e9,
                       breakdown_s={k: v for k, v in med.items() if k not in ("total", "loss")}))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
