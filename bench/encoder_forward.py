"""Inference speed of our ViT-B/14 encoder against ``transformers.Dinov2Model`` (rad-dino config).

A randomly initialised ``Dinov2Model`` with microsoft/rad-dino's config (hidden 768, 12 layers,
12 heads, patch 14, image size 518, LayerScale 1.0, MLP ratio 4) is saved to a temporary folder
and loaded into our ``ViTEncoder`` with ``encoder.weights.load_hf_dinov2``; the outputs are
compared (max abs difference printed), then both are timed under ``torch.inference_mode()`` in
``eval()`` mode for each (size, batch, dtype) case.

Timing protocol (so machine-load drift hits both implementations alike):
* warm-up: one forward of each implementation (for cases estimated above ``--big-s`` seconds
  per forward the warm-up uses batch 1 at the same size and dtype, which builds the same kernels
  at a fraction of the cost);
* then ``reps`` rounds, each running both implementations back to back, alternating which goes
  first (A B, B A, A B, ...);
* the reported time is the median over rounds; the ratio is median(transformers) / median(ours),
  so > 1 means ours is faster. The ratio of the minima is printed too: on a shared machine the
  fastest round is the one least disturbed by other processes.

``--profile`` then profiles every case (torch.profiler, interleaved) and prints per-op self CPU
time of both implementations side by side, GEMMs split by shape.

This is a benchmark script, not a test: it prints numbers measured in this run and never fails
on them.

    .venv/bin/python bench/encoder_forward.py            # full default set (~10 min on 2 cores)
    .venv/bin/python bench/encoder_forward.py --quick    # 224 px, batch 1 and 8, few reps, bf16 only if native
    .venv/bin/python bench/encoder_forward.py --sizes 224 --batches 1 4 --dtypes fp32 --reps 5
    .venv/bin/python bench/encoder_forward.py --sizes 518 --batches 1 --dtypes bf16 --profile
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from _common import RATIO_OURS_VS_HF, add_json_arg, row, write_json  # noqa: E402  (bench/ is sys.path[0])

from encoder.inference import bf16_supported as native_bf16  # noqa: E402
from encoder.weights import load_hf_dinov2  # noqa: E402

RAD_DINO = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                image_size=518, layerscale_value=1.0, mlp_ratio=4, hidden_act="gelu",
                layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, num_channels=3)


def bf16_supported() -> tuple[bool, str]:
    """Whether bf16 autocast on this CPU works (and why not if it does not)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False, "oneDNN (mkldnn) not available"
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(8, 8))
        if y.dtype != torch.bfloat16:
            return False, f"autocast produced {y.dtype}"
        return True, "native bf16 (avx512_bf16/amx)" if native else "emulated (no native bf16 ISA)"
    except Exception as e:  # noqa: BLE001 - report any failure and go on with fp32
        return False, f"{type(e).__name__}: {e}"


def vit_fwd_flops(n_tokens: int, dim: int = 768, depth: int = 12, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs per image (2 x multiply-adds), matmuls only (see pretrain_step.py)."""
    per_layer = n_tokens * ((4 + 2 * mlp_ratio) * dim * dim + 2 * n_tokens * dim)
    return 2.0 * depth * per_layer


def profile_case(impls: dict, x: torch.Tensor, dt: str, title: str, runs: int = 2) -> None:
    """Per-op self CPU time (mean over ``runs`` interleaved profiled forwards) for each implementation.

    GEMMs and attention are split by input shape, so a fused-qkv GEMM (ours) shows next to the
    three q/k/v GEMMs of transformers.
    """
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    split = ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu")
    tot = {k: defaultdict(float) for k in impls}
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16"
           else torch.autocast("cpu", enabled=False))
    names = list(impls)
    with torch.inference_mode(), ctx:
        for f in impls.values():
            f(x)
        for r in range(runs):
            for name in (names if r % 2 == 0 else names[::-1]):
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    impls[name](x)
                for e in prof.key_averages(group_by_input_shape=True):
                    key = e.key.replace("aten::", "")
                    if e.key in split:
                        shp = ["x".join(map(str, sh)) for sh in e.input_shapes[:3]]
                        key += (f" {shp[1]} @ {shp[2]}" if e.key == split[0] else f" q {shp[0]}")
                        key += f" ({e.count} calls)"
                    tot[name][key] += e.self_cpu_time_total / runs / 1e3
    print(f"\nprofile {title}: self CPU ms per forward (mean of {runs})")
    keys = sorted(set().union(*tot.values()), key=lambda k: -max(t[k] for t in tot.values()))
    print(f"  {'op':<58}" + "".join(f"{n:>14}" for n in names))
    for k in keys[:12]:
        print(f"  {k[:58]:<58}" + "".join(f"{tot[n][k]:14.1f}" for n in names))
    print(f"  {'TOTAL (all ops)':<58}" + "".join(f"{sum(tot[n].values()):14.1f}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[518, 224])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=None,
                    help="timed rounds per case (default: ~20 s of work per case, 3 to 9 rounds)")
    ap.add_argument("--quick", action="store_true",
                    help="only 224 px, batch 1 and 8, 3 rounds; bf16 only where the CPU has it natively")
    ap.add_argument("--big-s", type=float, default=4.0,
                    help="cases slower than this per forward warm up at batch 1")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile each case (2 interleaved forwards per implementation) "
                         "and print per-op self CPU time side by side")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.batches = [224], [1, 8]
        args.reps = args.reps or 3
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"loadavg {os.getloadavg()[0]:.2f}")
    hf = Dinov2Model(Dinov2Config(**RAD_DINO)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_dinov2(d).eval()
    print(f"transformers attn_implementation={hf.config._attn_implementation}")

    use_bf16, why = bf16_supported()
    dtypes = [dt for dt in args.dtypes if dt == "fp32" or use_bf16]
    print(f"bf16 autocast: {'yes' if use_bf16 else 'no'} ({why})")
    # oneDNN reports bf16 support on any AVX-512 CPU; the native ISA (avx512_bf16/amx) is in cpuinfo
    if args.quick and "bf16" in dtypes and len(dtypes) > 1 and not native_bf16("cpu"):
        dtypes.remove("bf16")  # emulated bf16 is 3-4x slower than fp32: most of a quick run's time
        print("--quick: bf16 timing skipped (no avx512_bf16/amx in /proc/cpuinfo, so bf16 is emulated); "
              "run without --quick to time it")

    # --- parity -------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed)
    parity = {}  # "fp32 224px b2" -> max |ours - transformers|
    with torch.inference_mode():
        for size, b in ((224, 2), (518, 1)):
            x = torch.randn(b, 3, size, size, generator=g)
            ref = hf(pixel_values=x).last_hidden_state
            got = ours.forward_tokens(x)
            parity[f"fp32 {size}px b{b}"] = (got - ref).abs().max().item()
            print(f"parity fp32 {size}px batch {b}: max |ours - transformers| = "
                  f"{(got - ref).abs().max().item():.3e} (output max |x| {ref.abs().max().item():.2f})")
            if use_bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    ref_b = hf(pixel_values=x).last_hidden_state.float()
                    got_b = ours.forward_tokens(x).float()
                parity[f"bf16 {size}px b{b}"] = (got_b - ref_b).abs().max().item()
                print(f"parity bf16 {size}px batch {b}: max |ours - transformers| = "
                      f"{(got_b - ref_b).abs().max().item():.3e}, max |bf16 - fp32| (transformers) = "
                      f"{(ref_b - ref).abs().max().item():.3e}")

    # --- timing -------------------------------------------------------------------------------
    impls = {"transformers": lambda x: hf(pixel_values=x), "ours": lambda x: ours(x)}
    # rough fp32 speed for choosing reps; refined from the first measured case
    gflops = {"fp32": 100e9, "bf16": 200e9}
    rows = []
    t_start = time.perf_counter()
    for dt in dtypes:
        for size in args.sizes:
            for b in sorted(args.batches):
                n_tok = 1 + (size // 14) ** 2
                est = b * vit_fwd_flops(n_tok) / gflops[dt]
                reps = args.reps or max(3, min(9, math.ceil(20.0 / (2 * est))))
                ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16"
                       else torch.autocast("cpu", enabled=False))
                x = torch.randn(b, 3, size, size, generator=g)
                times: dict[str, list[float]] = {k: [] for k in impls}
                with torch.inference_mode(), ctx:
                    xw = x[:1] if est > args.big_s else x
                    for f in impls.values():
                        f(xw)
                    names = list(impls)
                    for r in range(reps):
                        for name in (names if r % 2 == 0 else names[::-1]):
                            t0 = time.perf_counter()
                            impls[name](x)
                            times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                best = {k: min(v) for k, v in times.items()}
                gflops[dt] = b * vit_fwd_flops(n_tok) / med["ours"]  # refine the estimate
                rows.append((size, b, dt, reps, med["transformers"], med["ours"],
                             med["transformers"] / med["ours"], best["transformers"] / best["ours"],
                             b * vit_fwd_flops(n_tok) / best["ours"] / 1e9, os.getloadavg()[0]))
                print(f"  done {size}px b{b} {dt}: {reps} rounds, "
                      + "; ".join(f"{k} " + " ".join(f"{t * 1e3:.0f}" for t in v) + " ms"
                                  for k, v in times.items()), flush=True)

    print(f"\ntiming took {time.perf_counter() - t_start:.0f} s")
    print("| size | batch | dtype | rounds | transformers ms/batch (median) | ours ms/batch (median) "
          "| ratio of medians | ratio of minima | ours GFLOP/s (best) | loadavg |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, b, dt, reps, t_hf, t_us, ratio, ratio_min, gf, load in rows:
        print(f"| {size} | {b} | {dt} | {reps} | {t_hf * 1e3:.0f} | {t_us * 1e3:.0f} | {ratio:.3f} "
              f"| {ratio_min:.3f} | {gf:.0f} | {load:.1f} |")
    print("ratio = transformers time / ours time: > 1 means ours is faster. GFLOP/s counts matmul "
          "FLOPs only (2 x multiply-adds). loadavg: 1-min load average after the case (2 cores).")
    out = [row("encoder_forward", f"{size}px b{b} {dt}", RATIO_OURS_VS_HF, ratio, t_us * 1e3,
               "ms/batch (ours, median)",
               f"ratio of minima {ratio_min:.3f}; transformers {t_hf * 1e3:.0f} ms; {reps} rounds; "
               f"loadavg {load:.1f}",
               size=size, batch=b, dtype=dt, rounds=reps, transformers_ms=t_hf * 1e3, ours_ms=t_us * 1e3,
               ratio_of_minima=ratio_min, ours_gflops_best=gf, loadavg=load)
           for size, b, dt, reps, t_hf, t_us, ratio, ratio_min, gf, load in rows]
    out.append(row("encoder_forward", "parity (same weights)", None, None, max(parity.values()),
                   "max |ours - transformers|", "; ".join(f"{k} {v:.1e}" for k, v in parity.items()),
                   detail=parity))
    write_json(args.json, out)
    if args.profile:
        for size, b, dt, *_ in rows:
            profile_case(impls, torch.randn(b, 3, size, size, generator=g), dt, f"{size}px b{b} {dt}")


if __name__ == "__main__":
    main()
