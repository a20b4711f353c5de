"""Frozen-feature inference, model level: our encoder path against ``transformers.Dinov2Model``.

A randomly initialised ``Dinov2Model`` with microsoft/rad-dino's config is saved to a temporary
folder and loaded into our ``ViTEncoder`` (``encoder.weights.load_hf_dinov2``): the same weights.
Each side produces the CLS feature (transformers: ``pooler_output``, which is the normed CLS) of
the same preprocessed images, under ``torch.inference_mode()`` in eval mode:

* fp32: ``transformers`` (SDPA attention) against ``ours`` =
  ``encode(prepare_encoder(model, "fp32"), x)`` (fused qkv, CLS-only last block);
* bf16: ``ours bf16`` = ``encode(prepare_encoder(model, "bf16"), x)`` (weights cast once) against
  ``transformers bf16`` (``model.to(torch.bfloat16)``) and ``transformers autocast`` (fp32 weights
  under ``torch.autocast(dtype=bfloat16)``);
* ``--compile`` adds ``ours compiled`` (``prepare_encoder(..., compile=True)``) per precision.

Timing: one warm-up call of each variant, then ``reps`` rounds running every variant of the
precision back to back, rotating which goes first; reported: the median per variant, the ratio
of medians (other / ours, > 1 means ours is faster) and the ratio of the fastest rounds (the
least disturbed on a shared machine). Features: cosine similarity and max |difference| of each
variant's CLS against transformers fp32 on the same images. GFLOP/s counts the matmul FLOPs of a
*full* forward (``vit_fwd_flops``), so the CLS shortcut shows as speed, against a 2048³ matmul
peak of each precision measured at the start and again at the end of the run.

Images: the first images of ``../shared/data/cxr/images`` preprocessed like rad-dino when
present, else standard-normal tensors. A benchmark script, not a test: it never fails on numbers.

    .venv/bin/python bench/features_model.py --quick     # 224 px, batch 2, fp32 + bf16, 2 rounds
    .venv/bin/python bench/features_model.py             # 224 and 518 px (see bench/README.md)
    .venv/bin/python bench/features_model.py --sizes 518 --batch 1 --precisions fp32 --reps 5
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

from _common import RATIO_OURS_VS_HF, add_json_arg, peak_row, row, write_json  # noqa: E402  (bench/ is sys.path[0])

from encoder.features import encode  # noqa: E402
from encoder.inference import bf16_supported, cpu_bf16_flags, prepare_encoder  # noqa: E402
from encoder.processor import RadDinoProcessor  # noqa: E402
from encoder.weights import load_hf_dinov2  # noqa: E402

RAD_DINO = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                image_size=518, layerscale_value=1.0, mlp_ratio=4, hidden_act="gelu",
                layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, num_channels=3)
IMAGES = REPO / ".." / "shared" / "data" / "cxr" / "images"


def vit_fwd_flops(n_tokens: int, dim: int = 768, depth: int = 12, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs (2 x multiply-adds) of one full ViT forward per image (as encoder_forward.py)."""
    return 2.0 * depth * n_tokens * ((4 + 2 * mlp_ratio) * dim * dim + 2 * n_tokens * dim)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n³ ``torch.mm`` in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` preprocessed shared radiographs (cycled), or random tensors if the folder is absent."""
    files = sorted(p for p in IMAGES.iterdir() if p.is_file())[:n] if IMAGES.is_dir() else []
    if files:
        from radgen.data.images import load_image  # bench only: the encoder package reads no files

        proc = RadDinoProcessor(size, size)
        xs = [proc.one(load_image(files[i % len(files)])[0]) for i in range(n)]
        return torch.stack(xs), f"{len(files)} radiographs from {IMAGES.resolve()}"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), "standard-normal tensors"


def run_case(variants: dict, x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Warm up each variant once, then ``reps`` rotated rounds; seconds per call per variant."""
    names = list(variants)
    for f in variants.values():
        f(x)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(_time(lambda: variants[name](x)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch per size (one value, or one per size; default 8 at 224, 1 at 518)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per case (default 3)")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    ap.add_argument("--quick", action="store_true", help="224 px, batch 2, 2 rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_json_arg(ap)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.batch, args.reps = [224], [2], min(args.reps, 2)
    batches = args.batch or [8 if s <= 224 else 1 for s in args.sizes]
    if len(batches) == 1:
        batches = batches * len(args.sizes)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} "
          f"threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"cpu bf16 flags {list(cpu_bf16_flags()) or 'none'} (native bf16: {bf16_supported('cpu')}), "
          f"loadavg {os.getloadavg()[0]:.2f}")
    peak0 = {p: matmul_peak(dt) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak (2048^3, start): fp32 {peak0['fp32']:.0f} GFLOP/s, bf16 {peak0['bf16']:.0f} GFLOP/s")
    hf = Dinov2Model(Dinov2Config(**RAD_DINO)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        base = load_hf_dinov2(d).eval()
    print(f"transformers attn_implementation={hf.config._attn_implementation}")
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16) if "bf16" in args.precisions else None

    def hf_cls(model, dtype=None, autocast=False):
        def f(x):
            ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
                   else torch.autocast("cpu", enabled=False))
            with torch.inference_mode(), ctx:
                return model(pixel_values=x if dtype is None else x.to(dtype)).pooler_output.float()
        return f

    ours = {p: prepare_encoder(copy.deepcopy(base), p, "cpu") for p in args.precisions}
    compiled = ({p: prepare_encoder(copy.deepcopy(base), p, "cpu", compile=True) for p in args.precisions}
                if args.compile else {})

    rows = []
    t_start = time.perf_counter()
    for size, b in zip(args.sizes, batches):
        x, source = load_images(b, size, args.seed)
        ref = hf_cls(hf)(x)  # transformers fp32: the reference for every feature difference
        for prec in args.precisions:
            variants = {f"ours {prec}": lambda x, m=ours[prec]: encode(m, x)}
            if prec in compiled:
                variants[f"ours compiled {prec}"] = lambda x, m=compiled[prec]: encode(m, x)
            if prec == "fp32":
                variants["transformers fp32"] = hf_cls(hf)
            else:
                variants["transformers bf16"] = hf_cls(hf_bf16, torch.bfloat16)
                variants["transformers autocast"] = hf_cls(hf, autocast=True)
            t_compile = {}
            for name in variants:
                if "compiled" in name:  # first call compiles: time it separately
                    t_compile[name] = _time(lambda: variants[name](x))
            times = run_case(variants, x, args.reps)
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            flops = b * vit_fwd_flops(1 + (size // 14) ** 2)
            me = f"ours {prec}"
            for name in variants:
                f = variants[name](x)
                cos = torch.nn.functional.cosine_similarity(f, ref, dim=-1)
                rows.append(dict(size=size, batch=b, precision=prec, variant=name, reps=args.reps,
                                 median_s=med[name], best_s=best[name],
                                 ratio_median=med[name] / med[me], ratio_best=best[name] / best[me],
                                 gflops_best=flops / best[name] / 1e9,
                                 cos_min=cos.min().item(), max_abs=(f - ref).abs().max().item(),
                                 compile_s=t_compile.get(name), loadavg=os.getloadavg()[0]))
            print(f"  done {size}px b{b} {prec}: " + "; ".join(
                f"{k} " + " ".join(f"{t * 1e3:.0f}" for t in v) + " ms" for k, v in times.items()),
                flush=True)
        print(f"  images: {source}; CLS max |x| (transformers fp32) {ref.abs().max().item():.2f}")
    peak1 = {p: matmul_peak(dt) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"\ntiming took {time.perf_counter() - t_start:.0f} s; matmul peak (end): "
          f"fp32 {peak1['fp32']:.0f}, bf16 {peak1['bf16']:.0f} GFLOP/s; loadavg {os.getloadavg()[0]:.2f}")
    print("| size | batch | variant | ms/batch (median) | ours faster by (ratio of medians) | "
          "(ratio of minima) | GFLOP/s (best) | % of matmul peak | CLS cos vs transformers fp32 (min) "
          "| CLS max abs diff | loadavg |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ours_row = r["variant"].startswith("ours ") and "compiled" not in r["variant"]
        ratio = "—" if ours_row else f"{r['ratio_median']:.3f}"
        ratio_b = "—" if ours_row else f"{r['ratio_best']:.3f}"
        comp = f" (compile {r['compile_s']:.0f} s)" if r["compile_s"] else ""
        print(f"| {r['size']} | {r['batch']} | {r['variant']}{comp} | {r['median_s'] * 1e3:.0f} | {ratio} "
              f"| {ratio_b} | {r['gflops_best']:.0f} | {100 * r['gflops_best'] / peak0[r['precision']]:.0f}% "
              f"| {r['cos_min']:.6f} | {r['max_abs']:.2e} | {r['loadavg']:.1f} |")
    print("ratio = that variant's time / ours (same precision): > 1 means ours is faster. GFLOP/s: "
          "matmul FLOPs of a full forward / best round (ours skips most of the last block for CLS). "
          "% of peak: against the 2048^3 matmul peak at the start of the run.")
    out = [peak_row("features_model", p, v, when) for when, pk in (("start", peak0), ("end", peak1))
           for p, v in pk.items()]
    for r in rows:
        name = r["variant"]
        if name.startswith("ours ") and "compiled" not in name:
            continue  # the reference side of every ratio: its numbers are in the other rows' detail
        me = next(o for o in rows if (o["size"], o["batch"], o["variant"]) == (r["size"], r["batch"],
                                                                                  f"ours {r['precision']}"))
        kind, ratio, ratio_min = RATIO_OURS_VS_HF, r["ratio_median"], r["ratio_best"]
        if "compiled" in name:  # compiled against eager ours: > 1 means compiling paid
            kind = "torch.compile vs eager ours (time ratio, >1 = compiled faster)"
            ratio, ratio_min = 1 / ratio, 1 / ratio_min
        out.append(row("features_model", f"{r['size']}px b{r['batch']} {r['precision']}: {name}", kind, ratio,
                       me["median_s"] * 1e3, "ms/batch (ours, median)",
                       f"ratio of minima {ratio_min:.3f}; {name} {r['median_s'] * 1e3:.0f} ms; "
                       f"CLS cos min {r['cos_min']:.6f}; {r['reps']} rounds; loadavg {r['loadavg']:.1f}",
                       detail=r, ours_median_s=me["median_s"], ours_best_s=me["best_s"],
                       ours_gflops_best=me["gflops_best"]))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
