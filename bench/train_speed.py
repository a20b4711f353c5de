"""Training throughput of the report generator's stage-2 step (projector + LoRA), against the matmul peak.

1. Matmul peak: best-of-N time of a 2048 x 2048 x 2048 ``torch.mm`` in fp32 and bf16 (2 n^3 FLOPs),
   measured before the steps and again after them (if it moved, the machine's load changed).
2. The step ``radgen train`` runs in stage 2 (``radgen/jobs/train.py``), on a fresh model from
   ``configs/reportgen`` + ``cpu_smollm2``: SmolLM2-135M-Instruct with LoRA r=16 on every linear
   layer, mlp2x_gelu projector, random ``vit_tiny`` at 112 px (64 image tokens). Encoder tokens are
   computed once beforehand, as training does with ``data.cache_vision: true``, so the step is:
   forward (splice + LLM + summed token cross-entropy), ``backward``, gradient clipping at 1.0,
   AdamW step. Batch: ``--batch`` synthetic findings (``radgen.data.synth``, what the CPU default
   trains on) with the default prompt, right-padded. fp32, then bf16 autocast (``train.precision``).
3. Throughput in three token counts: *target* tokens (the labels the loss predicts), *real* tokens
   (image + prompt + target positions, padding excluded) and *positions* (B x padded length: what
   every GEMM actually processes).
4. FLOPs per step, counted two ways, both printed:
   * ``torch.utils.flop_counter.FlopCounterMode`` on the warm-up step (CPU SDPA ops mapped to
     torch's SDPA formulas, as in ``bench/pretrain_step.py``);
   * analytically (:func:`analytic_flops`), per position: ``4 N_frozen + 6 N_lora`` for the linear
     layers plus attention, and ``6 N_proj`` per image token. The frozen LLM weights (decoder
     linears + the tied ``lm_head``, ``N_frozen``) cost 2N forward and 2N backward: the gradient
     w.r.t. their *inputs* must flow down to the projector, but no weight gradient is formed, so
     the 6N of full fine-tuning overcounts them by a third. The "6N" figure is printed too, for
     comparison with papers that use it.
   Achieved FLOP/s = counted FLOPs / median step time.

``--what-if`` also times a variant that computes ``lm_head`` logits only at target positions
(what ``token_loss_sum`` reads), to size that change; it is not what ``radgen train`` runs. Its
steps alternate with the normal ones, so the paired ratio is measured under the same load.

This is a benchmark script, not a test: it prints what this run measured and never fails.

    .venv/bin/python bench/train_speed.py                # batch 8, fp32 and bf16, 3 timed steps each
    .venv/bin/python bench/train_speed.py --quick        # 2 timed steps each; bf16 only if native (~1-2 min)
    .venv/bin/python bench/train_speed.py --what-if --no-bf16 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from _common import RATIO_PEAK, RATIO_WHAT_IF, add_json_arg, peak_row, row, write_json  # noqa: E402
from _peak import CPU_SDPA_FLOPS, matmul_rate  # noqa: E402  (bench/ is sys.path[0])

from radgen.model.run import BuiltModel  # noqa: E402
from radgen.model.splice import IGNORE_INDEX  # noqa: E402



def build(image_size: int, seed: int) -> BuiltModel:
    from radgen.config import load_config
    from radgen.model.run import build_model

    cfg = load_config("reportgen", ["cpu_smollm2"], [f"encoder.spec=random:vit_tiny:{image_size}:{seed}",
                                                     f"data.image_size={image_size}", f"seed={seed}"])
    return build_model(cfg)


def stage2_params(built: BuiltModel) -> list[nn.Parameter]:
    """What stage 2 trains: the projector and every LoRA matrix (as ``radgen.jobs.train._trainable``)."""
    model = built.model
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    for name, p in model.llm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def synthetic_findings(n: int, seed: int) -> list[str]:
    """Findings texts of the synthetic set (``radgen synth``, seed ``seed``), without rendering pixels."""
    from radgen.data.synth.case import sample_case
    from radgen.data.synth.report import write_report

    out = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        out.append(write_report(sample_case(rng, seed=seed), rng)[0])
    return out


def linear_params(llm: nn.Module) -> tuple[int, int]:
    """``(N_frozen, N_lora)``: weights of every ``nn.Linear`` of the LLM (lm_head included, the
    embedding lookup not: it is a gather), split into LoRA matrices and the rest."""
    frozen = lora = 0
    for name, m in llm.named_modules():
        if isinstance(m, nn.Linear):
            if "lora_" in name:
                lora += m.weight.numel()
            else:
                frozen += m.weight.numel()
    return frozen, lora


def analytic_flops(built: BuiltModel, B: int, L: int, n_img: int) -> dict[str, float]:
    """Matmul FLOPs of one stage-2 step on ``B`` rows padded to ``L`` positions (see the module doc)."""
    tc = built.model.llm.get_base_model().config.get_text_config()
    d_attn = tc.num_attention_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    n_frozen, n_lora = linear_params(built.model.llm)
    n_proj = sum(p.numel() for n, p in built.model.projector.named_parameters() if n.endswith("weight"))
    pos = B * L
    # per query position per layer: scores q.k^T over L keys (2 L d) + weighted sum of values (2 L d);
    # SDPA computes the full L x L (padding and the causal half are masked, not skipped)
    attn_fwd = 4.0 * L * d_attn * tc.num_hidden_layers * pos
    fwd = 2.0 * n_frozen * pos + 2.0 * n_lora * pos + attn_fwd + 2.0 * n_proj * B * n_img
    bwd = (2.0 * n_frozen * pos  # input gradients only: frozen weights get no weight gradient
           + 4.0 * n_lora * pos  # LoRA: input and weight gradients
           + 2.0 * attn_fwd  # gradients w.r.t. q, k and v
           + 4.0 * n_proj * B * n_img)
    six_n = 6.0 * (n_frozen + n_lora) * pos + 3.0 * attn_fwd + 6.0 * n_proj * B * n_img
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd, "six_n": six_n, "n_frozen": n_frozen,
            "n_lora": n_lora, "n_proj": n_proj}


def target_only_forward(built: BuiltModel, batch: dict, vision_tokens: torch.Tensor) -> dict:
    """What-if: the LLM body on every position, ``lm_head`` only where a label is predicted."""
    model = built.model
    base = model.llm.get_base_model()  # LoRA layers are injected in place: base.model runs them
    embeds = model.embed(batch["input_ids"], vision_tokens=vision_tokens)
    hidden = base.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = base.lm_head(hidden[:, :-1][keep]).float()
    return {"loss_sum": F.cross_entropy(logits, labels[keep], reduction="sum"), "n_tokens": int(keep.sum())}


def run_step(built: BuiltModel, params, opt, batch: dict, vision_tokens: torch.Tensor, bf16: bool,
             n_tok: int, seed: int, what_if: bool = False) -> dict[str, float]:
    model = built.model
    torch.manual_seed(seed)  # LoRA dropout draws, as train.py reseeds every step
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if what_if:
            res = target_only_forward(built, batch, vision_tokens)
        else:
            res = model(**batch, vision_tokens=vision_tokens)
    loss = res["loss_sum"] / n_tok
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward (LLM + loss)": t1 - t0, "backward": t2 - t1, "clip + AdamW": t3 - t2, "total": t3 - t0,
            "loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=112, help="encoder and image size (default 112: 64 tokens)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per precision (after 1 warm-up)")
    ap.add_argument("--quick", action="store_true",
                    help="2 timed steps per precision; bf16 only where the CPU has it natively")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 run")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast run")
    ap.add_argument("--what-if", action="store_true", help="also time lm_head on target positions only")
    ap.add_argument("--peak-tries", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ([] if args.no_fp32 else ["fp32"]) + ([] if args.no_bf16 else ["bf16"])
    if not precisions:
        ap.error("nothing to run: --no-fp32 and --no-bf16")
    if args.quick and "bf16" in precisions and len(precisions) > 1:
        from encoder.inference import bf16_supported

        if not bf16_supported("cpu"):  # emulated bf16: ~3x slower than fp32, most of a quick run's time
            precisions.remove("bf16")
            print("--quick: bf16 autocast skipped (emulated on this CPU); --steps 2 without --quick times it")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, loadavg {os.getloadavg()[0]:.2f}")

    peak = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            peak[name] = matmul_rate(2048, 2048, 2048, dt, args.peak_tries)
        except RuntimeError as e:
            print(f"{name} matmul failed ({e}); skipping {name}")
            precisions = [p for p in precisions if p != name]
            continue
        print(f"matmul peak {name}: {peak[name] / 1e9:.1f} GFLOP/s (2048^3, best of {args.peak_tries})")

    t0 = time.perf_counter()
    built = build(args.image_size, args.seed)
    model, tok = built.model, built.tokens
    model.train()
    params = stage2_params(built)
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999))
    B = args.batch
    texts = synthetic_findings(B, args.seed)
    batch = tok.train_batch(texts)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # cached encoder tokens, as training with data.cache_vision
        vision_tokens = model.vision(torch.rand(B, 3, built.image_size, built.image_size, generator=g))
    n_target = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    n_real = int(batch["attention_mask"].sum())
    L = batch["input_ids"].shape[1]
    n_img = tok.n_image_tokens
    ana = analytic_flops(built, B, L, n_img)
    n_train = sum(p.numel() for p in params)
    print(f"model: SmolLM2-135M-Instruct + LoRA r={built.info['lora']['r']} ({ana['n_lora'] / 1e6:.2f} M) + "
          f"{built.info['projector']['name']} ({ana['n_proj'] / 1e6:.2f} M), {n_train / 1e6:.2f} M trainable, "
          f"{ana['n_frozen'] / 1e6:.1f} M frozen linear weights (lm_head included); built in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"batch {B}: {n_img} image tokens + {len(tok.prompt_ids(None)) - n_img} prompt tokens per row, "
          f"targets {min(len(tok.target_ids(t)) for t in texts)}-{max(len(tok.target_ids(t)) for t in texts)} "
          f"tokens; {n_target} target / {n_real} real tokens / {B * L} positions (padded length {L})")
    print("timing excludes image loading and the encoder (its tokens are cached, as in training)")

    from torch.utils.flop_counter import FlopCounterMode

    results = []
    what_if_ratios = {}
    step_no = 0
    for prec in precisions:
        bf16 = prec == "bf16"
        # with --what-if the two variants alternate step by step (the one going first alternates
        # too), so load drift on a shared machine hits both alike
        kinds = [False, True] if args.what_if else [False]
        counted, warm = {}, {}
        for what_if in kinds:
            try:
                with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
                    warm[what_if] = run_step(built, params, opt, batch, vision_tokens, bf16, n_target, step_no, what_if)
                counted[what_if] = float(fc.get_total_flops())
            except Exception as e:  # noqa: BLE001 - fall back to the analytic count
                print(f"FlopCounterMode failed ({type(e).__name__}: {e}); using the analytic count")
                warm[what_if] = run_step(built, params, opt, batch, vision_tokens, bf16, n_target, step_no, what_if)
                counted[what_if] = float("nan")
            step_no += 1
        steps: dict[bool, list[dict]] = {k: [] for k in kinds}
        for i in range(args.steps):
            for what_if in (kinds if i % 2 == 0 else kinds[::-1]):
                steps[what_if].append(run_step(built, params, opt, batch, vision_tokens, bf16, n_target, step_no,
                                               what_if))
                step_no += 1
        for what_if in kinds:
            label = prec + (" autocast" if bf16 else "") + (", lm_head on targets only (what-if)" if what_if else "")
            st = steps[what_if]
            med = {k: statistics.median(s[k] for s in st) for k in st[0]}
            flops = counted[what_if] if counted[what_if] == counted[what_if] else ana["total"]
            rate = flops / med["total"]
            times = ", ".join(f"{s['total']:.2f}" for s in st)
            results.append((label, prec, med, min(s["total"] for s in st), rate, flops))
            print(f"\n== {label}: warm-up {warm[what_if]['total']:.1f} s (under the counter), timed steps "
                  f"{times} s, loss {st[-1]['loss']:.3f}; loadavg {os.getloadavg()[0]:.2f}")
            if not what_if:
                print(f"FLOPs/step: FlopCounterMode {counted[what_if] / 1e12:.3f} TFLOP, analytic "
                      f"{ana['total'] / 1e12:.3f} TFLOP (ratio {counted[what_if] / ana['total']:.3f}; fwd "
                      f"{ana['fwd'] / 1e12:.3f}, bwd {ana['bwd'] / 1e12:.3f}); the 6N convention would say "
                      f"{ana['six_n'] / 1e12:.3f} TFLOP")
            else:
                print(f"FLOPs/step: FlopCounterMode {counted[what_if] / 1e12:.3f} TFLOP")
            print(f"median step {med['total']:.2f} s: {n_target / med['total']:.0f} target tokens/s, "
                  f"{n_real / med['total']:.0f} real tokens/s, {B * L / med['total']:.0f} positions/s; "
                  f"{rate / 1e9:.1f} GFLOP/s = {100 * rate / peak[prec]:.1f}% of the {prec} 2048^3 peak")
            print("breakdown (median s, % of step): " + ", ".join(
                f"{k} {v:.2f} ({100 * v / med['total']:.0f}%)" for k, v in med.items() if k not in ("total", "loss")))
        if args.what_if:
            ratios = [a["total"] / b["total"] for a, b in zip(steps[False], steps[True])]
            what_if_ratios[prec] = ratios
            print(f"what-if speed-up ({prec}): x{statistics.median(ratios):.2f} (median of paired step ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})")

    print("\n| step | batch | median s | best s | target tok/s | real tok/s | TFLOP/step (counted) | "
          "GFLOP/s | 2048^3 peak GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, prec, med, best, rate, flops in results:
        print(f"| {label} | {B} | {med['total']:.2f} | {best:.2f} | {n_target / med['total']:.0f} | "
              f"{n_real / med['total']:.0f} | {flops / 1e12:.3f} | {rate / 1e9:.1f} | {peak[prec] / 1e9:.1f} | "
              f"{100 * rate / peak[prec]:.1f}% |")
    after = {name: matmul_rate(2048, 2048, 2048, dt, args.peak_tries)
             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if name in peak}
    print("matmul peak re-measured after the steps: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s ({100 * v / peak[k]:.0f}% of before)" for k, v in after.items())
          + f"; loadavg at end {os.getloadavg()[0]:.2f}")
    out = [peak_row("train_speed", k, v / 1e9, "start") for k, v in peak.items()]
    out += [peak_row("train_speed", k, v / 1e9, "end") for k, v in after.items()]
    for label, prec, med, best, rate, flops in results:
        out.append(row("train_speed", f"stage 2 b{B} {label}", RATIO_PEAK, rate / peak[prec], rate / 1e9,
                       "GFLOP/s achieved",
                       f"median step {med['total']:.2f} s ({args.steps} timed); {flops / 1e12:.3f} TFLOP/step; "
                       f"{prec} peak {peak[prec] / 1e9:.0f} GFLOP/s before, {after[prec] / 1e9:.0f} after",
                       precision=prec, batch=B, median_step_s=med["total"], best_step_s=best,
                       target_tokens_per_s=n_target / med["total"], real_tokens_per_s=n_real / med["total"],
                       tflop_per_step=flops / 1e12, peak_gflops=peak[prec] / 1e9,
                       peak_after_gflops=after[prec] / 1e9,
                       breakdown_s={k: v for k, v in med.items() if k not in ("total", "loss")}))
    for prec, ratios in what_if_ratios.items():
        out.append(row("train_speed", f"stage 2 b{B} {prec}: lm_head on targets only", RATIO_WHAT_IF,
                       statistics.median(ratios), None, None,
                       "median of paired step ratios " + ", ".join(f"{r:.2f}" for r in ratios),
                       precision=prec, paired_ratios=ratios))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
