"""Training throughput of the report generator's stage-2 step, before and after this week's changes.

Two variants of the step ``radgen train`` runs in stage 2 (``radgen/train/loop.py``), each on a
fresh model from ``configs/reportgen`` + ``cpu_smollm2`` (SmolLM2-135M-Instruct with LoRA r=16 on
every linear layer, mlp2x_gelu projector, random ``vit_tiny`` at 112 px: 64 image tokens):

* **before**: ``prompt.system=default`` (SmolLM2's chat template adds its default system turn,
  ~20 tokens, to every row), the 16-token instruction of ``configs/reportgen/default.yaml``,
  shuffled batches (``data.group_by_length=false``), fp32;
* **after**: the current defaults: no system turn (``prompt.system: null``), batches of rows of
  similar length (``data.group_by_length: true``), ``train.precision: auto`` resolved on this
  machine (bf16 autocast where ``encoder.inference.bf16_supported("cpu")``, else fp32).

1. One pool of ``--pool`` synthetic findings (``radgen.data.synth``, what the CPU default trains
   on), the same for both. Each row's length is its prompt ids (image positions included) plus its
   target ids (EOS included); each variant cuts one epoch into global batches of ``--batch`` with
   ``radgen.data.batching.epoch_batches``, shuffled or grouped by length (window
   ``data.length_window``), as ``radgen train`` does (one micro-batch per step, right-padded).
2. Steps: a warm-up on each variant's batch 0, then ``--steps`` timed steps on its batches 1, 2,
   ...; the variants alternate step by step (the one going first alternates too), so load drift
   on a shared machine hits both. Encoder tokens are computed once beforehand, as training does
   with ``data.cache_vision: true``, so a step is: forward (splice + LLM + summed token
   cross-entropy), ``backward``, gradient clipping at 1.0, AdamW step.
3. Token accounting per row, over the timed batches and over the whole epoch: prompt tokens
   (image tokens excluded), image tokens, target tokens, padding, and padding as % of positions.
   Throughput in three counts, summed over the timed steps and divided by their summed time:
   *target* tokens (the labels the loss predicts; the headline), *real* tokens (image + prompt +
   target, no padding) and *positions* (rows x padded length: what every GEMM processes). The
   headline ratio is after / before target tokens/s. The variants train on different batches, so
   an epoch projection is printed too: each variant's measured seconds per position times its
   epoch's positions (both epochs hold the same target tokens).
4. Matmul peak: best-of-N 2048^3 ``torch.mm`` in each precision used (2 n^3 FLOPs), measured
   before the steps and again after them (if it moved, the machine's load changed).
5. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` runs on each variant's warm-up step (CPU
   SDPA mapped to torch's SDPA formulas, as in ``bench/pretrain_step.py``); a timed batch's FLOPs
   are its analytic count (:func:`analytic_flops`) times the counted / analytic ratio of the
   warm-up step (counting every step would slow it down). Analytic: per position ``4 N_frozen +
   6 N_lora`` for the decoder's linear layers plus attention over the padded length; ``4 N_head``
   per *target* position (the model applies the tied ``lm_head`` only where a label is predicted);
   ``6 N_proj`` per image token. Frozen weights cost 2N forward and 2N backward: the input
   gradient must reach the projector, but no weight gradient is formed.
   Achieved FLOP/s = FLOPs of the timed steps / their time; % of peak uses the variant's precision.

This is a benchmark script, not a test: it prints what this run measured and never fails.

    .venv/bin/python bench/train_speed.py                 # batch 8, 6 timed steps per variant
    .venv/bin/python bench/train_speed.py --quick         # 3 timed steps per variant (a few minutes)
    .venv/bin/python bench/train_speed.py --quick --threads 1 --json /tmp/train_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from _common import RATIO_PEAK, add_json_arg, peak_row, row, write_json  # noqa: E402
from _peak import CPU_SDPA_FLOPS, matmul_rate  # noqa: E402  (bench/ is sys.path[0])

from radgen.model.run import BuiltModel  # noqa: E402
from radgen.model.splice import IGNORE_INDEX  # noqa: E402

RATIO_AFTER_BEFORE = "after vs before (target tokens/s ratio, >1 = after faster)"
# config overrides of each variant on top of configs/reportgen + cpu_smollm2
# "before" is main's step before issue 19: the template's system turn, shuffled rows, fp32, and the
# default config's 16-token instruction (cpu_smollm2 now has a 4-token one)
_LONG_INSTRUCTION = "Write the findings section of the radiology report for this chest X-ray."
VARIANTS = {"before": ("prompt.system=default", "data.group_by_length=false", "train.precision=fp32",
                       f"prompt.instruction={_LONG_INSTRUCTION}"),
            "after": ()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(image_size: int, seed: int, overrides=()):
    from radgen.config import load_config
    from radgen.model.run import build_model

    cfg = load_config("reportgen", ["cpu_smollm2"], [f"encoder.spec=random:vit_tiny:{image_size}:{seed}",
                                                     f"data.image_size={image_size}", f"seed={seed}", *overrides])
    return cfg, build_model(cfg)


def stage2_params(built: BuiltModel) -> list[nn.Parameter]:
    """What stage 2 trains: the projector and every LoRA matrix (as ``radgen.train.loop._trainable``)."""
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


def analytic_flops(built: BuiltModel, B: int, L: int, n_img: int, n_target: int) -> dict[str, float]:
    """Matmul FLOPs of one stage-2 step on ``B`` rows padded to ``L`` positions, ``n_target`` of
    them predicted (see the module doc)."""
    base = built.model.llm.get_base_model()
    tc = base.config.get_text_config()
    d_attn = tc.num_attention_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    n_frozen, n_lora = linear_params(built.model.llm)
    n_head = base.get_output_embeddings().weight.numel()
    n_proj = sum(p.numel() for n, p in built.model.projector.named_parameters() if n.endswith("weight"))
    pos = B * L
    # per query position per layer: scores q.k^T over L keys (2 L d) + weighted sum of values (2 L d);
    # SDPA computes the full L x L (padding and the causal half are masked, not skipped)
    attn_fwd = 4.0 * L * d_attn * tc.num_hidden_layers * pos
    # frozen weights: 2N forward + 2N backward (input gradients only: no weight gradient is formed);
    # the decoder's at every position, lm_head only at the predicted ones (ReportGenerator.forward)
    frozen = 4.0 * ((n_frozen - n_head) * pos + n_head * n_target)
    total = frozen + 6.0 * n_lora * pos + 3.0 * attn_fwd + 6.0 * n_proj * B * n_img
    return {"total": total, "n_frozen": n_frozen, "n_head": n_head, "n_lora": n_lora, "n_proj": n_proj}


@dataclass
class Variant:
    name: str
    cfg: object
    built: BuiltModel
    params: list
    opt: torch.optim.Optimizer
    precision: str
    why: str
    batches: list[list[int]]
    lengths: list[int]
    steps: list[dict] = field(default_factory=list)
    flop_scale: float = 1.0  # counted / analytic FLOPs of the warm-up step


def resolve(cfg) -> tuple[str, str]:
    """The precision ``train.precision`` gives on this CPU, and why."""
    from encoder.inference import bf16_supported, cpu_bf16_flags, resolve_precision

    asked = str(cfg.train.precision)
    prec = resolve_precision(asked, "cpu")
    if asked != "auto":
        return prec, f"train.precision={asked}"
    flags = ", ".join(cpu_bf16_flags()) or "none"
    return prec, (f"train.precision=auto -> {prec}: bf16_supported('cpu') is {bf16_supported('cpu')} "
                  f"(bf16 flags in /proc/cpuinfo: {flags})")


def accounting(v: Variant, batches: list[list[int]], n_img: int, n_prompt: int) -> dict[str, float]:
    """Per-row token counts of ``batches`` (each right-padded to its longest row)."""
    from radgen.data.batching import padding_fraction

    lens = [[v.lengths[i] for i in b] for b in batches]
    rows = sum(len(b) for b in batches)
    pos = sum(max(ls) * len(ls) for ls in lens)
    real = sum(sum(ls) for ls in lens)
    target = real - rows * n_prompt
    return {"rows": rows, "prompt": n_prompt - n_img, "image": n_img, "target": target / rows,
            "padding": (pos - real) / rows, "positions": pos / rows, "padding_pct": 100 * padding_fraction(lens),
            "n_target": target, "n_real": real, "n_positions": pos}


def run_step(v: Variant, texts: list[str], idx: list[int], vision_tokens: torch.Tensor, seed: int) -> dict:
    model, tok = v.built.model, v.built.tokens
    batch = tok.train_batch([texts[i] for i in idx])
    n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.manual_seed(seed)  # LoRA dropout draws, as train.py reseeds every step
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.precision == "bf16"):
        res = model(**batch, vision_tokens=vision_tokens[:len(idx)])
    loss = res["loss_sum"] / n_tok
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(v.params, 1.0)
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    B, L = batch["input_ids"].shape
    return {"forward": t1 - t0, "backward": t2 - t1, "clip + AdamW": t3 - t2, "total": t3 - t0,
            "loss": float(loss.detach()), "rows": B, "L": L, "n_target": n_tok,
            "n_real": int(batch["attention_mask"].sum()), "n_positions": B * L}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="global batch (one micro-batch per step)")
    ap.add_argument("--image-size", type=int, default=112, help="encoder and image size (default 112: 64 tokens)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up each)")
    ap.add_argument("--quick", action="store_true", help="3 timed steps per variant")
    ap.add_argument("--pool", type=int, default=256, help="synthetic findings in the epoch (default 256)")
    ap.add_argument("--peak-tries", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps = 3
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, loadavg {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    texts = synthetic_findings(args.pool, args.seed)
    from radgen.data.batching import epoch_batches

    variants: dict[str, Variant] = {}
    for name, overrides in VARIANTS.items():
        cfg, built = build(args.image_size, args.seed, overrides)
        built.model.train()
        params = stage2_params(built)
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999))
        tok = built.tokens
        n_prompt = len(tok.prompt_ids(None))
        lengths = [n_prompt + len(tok.target_ids(t)) for t in texts]
        grouped = bool(cfg.data.group_by_length)
        batches = epoch_batches(len(texts), args.batch, args.seed, lengths=lengths if grouped else None,
                                window=int(cfg.data.length_window))
        prec, why = resolve(cfg)
        variants[name] = Variant(name, cfg, built, params, opt, prec, why, batches, lengths)
        print(f"{name}: prompt.system={cfg.prompt.system!r} ({n_prompt - tok.n_image_tokens} prompt + "
              f"{tok.n_image_tokens} image tokens per row), "
              + (f"batches grouped by length (window {int(cfg.data.length_window)} batches)" if grouped
                 else "shuffled batches") + f", {len(batches)} batches of {args.batch}; precision {prec} ({why})")
    before = variants["before"]
    n_img = before.built.tokens.n_image_tokens
    ana0 = analytic_flops(before.built, 1, 1, n_img, 1)
    n_train = sum(p.numel() for p in before.params)
    print(f"model: SmolLM2-135M-Instruct + LoRA r={before.built.info['lora']['r']} ({ana0['n_lora'] / 1e6:.2f} M) + "
          f"{before.built.info['projector']['name']} ({ana0['n_proj'] / 1e6:.2f} M), {n_train / 1e6:.2f} M trainable, "
          f"{ana0['n_frozen'] / 1e6:.1f} M frozen linear weights (lm_head included); {args.pool} findings, "
          f"2 models built in {time.perf_counter() - t0:.1f} s")
    print("timing excludes image loading and the encoder (its tokens are cached, as in training)")
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # cached encoder tokens (same random encoder in both variants), reused for every batch
        vision_tokens = before.built.model.vision(
            torch.rand(args.batch, 3, before.built.image_size, before.built.image_size, generator=g))

    peak = {}
    for prec in sorted({v.precision for v in variants.values()}):
        try:
            peak[prec] = matmul_rate(2048, 2048, 2048, DTYPES[prec], args.peak_tries)
            print(f"matmul peak {prec}: {peak[prec] / 1e9:.1f} GFLOP/s (2048^3, best of {args.peak_tries})")
        except RuntimeError as e:
            print(f"{prec} matmul failed ({e}); no % of peak for {prec}")
            peak[prec] = float("nan")

    from torch.utils.flop_counter import FlopCounterMode

    step_no = 0
    for v in variants.values():  # warm-up on batch 0, under the FLOP counter
        idx = v.batches[0]
        L = max(v.lengths[i] for i in idx)
        n_tgt = sum(v.lengths[i] for i in idx) - len(idx) * len(v.built.tokens.prompt_ids(None))
        ana = analytic_flops(v.built, len(idx), L, n_img, n_tgt)["total"]
        try:
            with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
                warm = run_step(v, texts, idx, vision_tokens, step_no)
            v.flop_scale = float(fc.get_total_flops()) / ana
        except Exception as e:  # noqa: BLE001 - fall back to the analytic count
            print(f"FlopCounterMode failed ({type(e).__name__}: {e}); using the analytic count")
            warm = run_step(v, texts, idx, vision_tokens, step_no)
        if warm["L"] != L:
            print(f"note: {v.name} batch padded to {warm['L']}, the lengths say {L}")
        print(f"{v.name} warm-up: {warm['total']:.1f} s under the counter, {ana * v.flop_scale / 1e12:.3f} TFLOP "
              f"counted, analytic {ana / 1e12:.3f} (counted / analytic {v.flop_scale:.3f}), padded length {L}")
        step_no += 1
    order = list(variants.values())
    for i in range(args.steps):
        for v in (order if i % 2 == 0 else order[::-1]):
            idx = v.batches[(1 + i) % len(v.batches)]
            s = run_step(v, texts, idx, vision_tokens, step_no)
            s["flops"] = analytic_flops(v.built, s["rows"], s["L"], n_img, s["n_target"])["total"] * v.flop_scale
            v.steps.append(s)
            step_no += 1
    print(f"loadavg after the steps {os.getloadavg()[0]:.2f}")

    res = {}
    for v in variants.values():
        st = v.steps
        T = sum(s["total"] for s in st)
        timed = [v.batches[(1 + i) % len(v.batches)] for i in range(args.steps)]
        n_prompt = len(v.built.tokens.prompt_ids(None))
        r = {"time_s": T, "median_s": statistics.median(s["total"] for s in st), "best_s": min(s["total"] for s in st),
             "flops": sum(s["flops"] for s in st), "timed": accounting(v, timed, n_img, n_prompt),
             "epoch": accounting(v, v.batches, n_img, n_prompt)}
        for k in ("n_target", "n_real", "n_positions"):
            r[k.removeprefix("n_") + "_per_s"] = sum(s[k] for s in st) / T
        r["gflops"] = r["flops"] / T / 1e9
        r["pct_peak"] = 100 * r["flops"] / T / peak[v.precision]
        r["s_per_position"] = T / sum(s["n_positions"] for s in st)
        r["epoch_s"] = r["s_per_position"] * r["epoch"]["n_positions"]
        res[v.name] = r
        br = {k: sum(s[k] for s in st) / T for k in ("forward", "backward", "clip + AdamW")}
        print(f"\n== {v.name} ({v.precision}): timed steps "
              + ", ".join(f"{s['total']:.2f} s (L {s['L']})" for s in st)
              + f"; loss {st[-1]['loss']:.3f}; time split " + ", ".join(f"{k} {100 * x:.0f}%" for k, x in br.items()))

    print("\nToken accounting, per row (prompt excludes the image tokens; target includes EOS):\n")
    print("| variant | over | rows | prompt | image | target | padding | positions | padding % of positions |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        for over, a in (("timed batches", r["timed"]), ("whole epoch", r["epoch"])):
            print(f"| {name} | {over} | {a['rows']} | {a['prompt']} | {a['image']} | {a['target']:.1f} | "
                  f"{a['padding']:.1f} | {a['positions']:.1f} | {a['padding_pct']:.1f}% |")

    b, a = res["before"], res["after"]
    print(f"\n| variant | precision | timed steps | median s | target tok/s | real tok/s | positions/s | "
          f"TFLOP/step (mean) | GFLOP/s | 2048^3 peak GFLOP/s | % of peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        v = variants[name]
        print(f"| {name} | {v.precision} | {args.steps} | {r['median_s']:.2f} | {r['target_per_s']:.1f} | "
              f"{r['real_per_s']:.0f} | {r['positions_per_s']:.0f} | {r['flops'] / len(v.steps) / 1e12:.3f} | "
              f"{r['gflops']:.1f} | {peak[v.precision] / 1e9:.1f} | {r['pct_peak']:.1f}% |")
    ratio = a["target_per_s"] / b["target_per_s"]
    print(f"| **after / before** | | | | **x{ratio:.2f}** | "
          f"x{a['real_per_s'] / b['real_per_s']:.2f} | x{a['positions_per_s'] / b['positions_per_s']:.2f} | "
          f"x{a['flops'] / b['flops']:.2f} | x{a['gflops'] / b['gflops']:.2f} | | |")
    proj = b["epoch_s"] / a["epoch_s"]
    print(f"\nepoch projection (measured s/position x the epoch's positions, {b['epoch']['n_target']} target tokens "
          f"in each): before {b['epoch_s']:.0f} s, after {a['epoch_s']:.0f} s: x{proj:.2f} target tokens/s "
          f"(positions per epoch x{b['epoch']['n_positions'] / a['epoch']['n_positions']:.2f} fewer, "
          f"s/position x{b['s_per_position'] / a['s_per_position']:.2f} faster)")
    after_peak = {k: matmul_rate(2048, 2048, 2048, DTYPES[k], args.peak_tries) for k in peak}
    print("matmul peak re-measured after the steps: "
          + ", ".join(f"{k} {x / 1e9:.1f} GFLOP/s ({100 * x / peak[k]:.0f}% of before)" for k, x in after_peak.items())
          + f"; loadavg at end {os.getloadavg()[0]:.2f}")

    out = [peak_row("train_speed", k, x / 1e9, "start") for k, x in peak.items()]
    out += [peak_row("train_speed", k, x / 1e9, "end") for k, x in after_peak.items()]
    B = args.batch
    for name, r in res.items():
        v = variants[name]
        out.append(row("train_speed", f"stage 2 b{B} {name} ({v.precision})", RATIO_PEAK, r["pct_peak"] / 100,
                       r["gflops"], "GFLOP/s achieved",
                       f"{r['target_per_s']:.1f} target tok/s over {args.steps} timed steps ({r['time_s']:.1f} s); "
                       f"padding {r['timed']['padding_pct']:.1f}% (epoch {r['epoch']['padding_pct']:.1f}%); "
                       f"{v.precision} peak {peak[v.precision] / 1e9:.0f} GFLOP/s before, "
                       f"{after_peak[v.precision] / 1e9:.0f} after",
                       variant=name, precision=v.precision, precision_why=v.why, system=v.cfg.prompt.system,
                       group_by_length=bool(v.cfg.data.group_by_length), batch=B, steps=args.steps,
                       step_s=[s["total"] for s in v.steps], padded_lengths=[s["L"] for s in v.steps],
                       median_step_s=r["median_s"], best_step_s=r["best_s"],
                       target_tokens_per_s=r["target_per_s"], real_tokens_per_s=r["real_per_s"],
                       positions_per_s=r["positions_per_s"], tflop_timed=r["flops"] / 1e12,
                       flop_scale=v.flop_scale, peak_gflops=peak[v.precision] / 1e9,
                       peak_after_gflops=after_peak[v.precision] / 1e9, tokens_per_row_timed=r["timed"],
                       tokens_per_row_epoch=r["epoch"], epoch_projection_s=r["epoch_s"]))
    out.append(row("train_speed", f"stage 2 b{B} after vs before", RATIO_AFTER_BEFORE, ratio, a["target_per_s"],
                   "target tokens/s (after)",
                   f"before {b['target_per_s']:.1f} target tok/s; real tok/s x{a['real_per_s'] / b['real_per_s']:.2f}, "
                   f"positions/s x{a['positions_per_s'] / b['positions_per_s']:.2f}; epoch projection x{proj:.2f}",
                   before_target_tokens_per_s=b["target_per_s"], epoch_projection_ratio=proj,
                   after_precision=variants["after"].precision))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
