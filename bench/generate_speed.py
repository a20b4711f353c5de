"""Batched report generation (batch 8, left padding, KV cache) against one image at a time.

Same model, same 8 images, same greedy settings, both through ``ReportGenerator.generate`` (the
call ``radgen generate`` makes, vision encoder included). Each round runs both paths back to back
and the one that goes first alternates, so load drift on a shared machine hits both alike; the
speed-up is measured within this one run (per-round ratio, ratio of medians, ratio of bests).
The script also checks, token for token, that every batched text equals its one-at-a-time text.

Model: by default a fresh one from ``configs/reportgen`` + ``cpu_smollm2``: the built-in
SmolLM2-135M-Instruct behind a random ``vit_tiny`` encoder at 112 px (8 x 8 = 64 image tokens)
and a seeded projector (LoRA B = 0, i.e. the plain LLM). Untrained models stop at random places,
so by default every row generates exactly ``--max-new-tokens`` (``min_new_tokens`` = max): both
paths do equal work. ``--model RUN_DIR`` benches a trained run; ``--stop-at-eos`` lets rows stop
at EOS (the batch then waits for its longest row, as in real use).

This is a benchmark script, not a test: it prints what this run measured and never fails.

    .venv/bin/python bench/generate_speed.py                  # 160 new tokens, 3 rounds (~10 min, 1 thread)
    .venv/bin/python bench/generate_speed.py --quick          # 32 new tokens, 2 rounds (~2 min, 1 thread)
    .venv/bin/python bench/generate_speed.py --model runs/rg --stop-at-eos
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from _common import RATIO_BATCHED, add_json_arg, row, write_json  # noqa: E402  (bench/ is sys.path[0])

from encoder.processor import RadDinoProcessor  # noqa: E402
from radgen.model.run import BuiltModel, generation_kwargs  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr" / "images"
# Mixed lengths, so the batch really is left-padded (as in tests/radgen/test_reportgen.py).
INDICATIONS = ["cough", "fever and shortness of breath for three days", None, "chest pain", "",
               "follow-up", "trauma", "pre-operative assessment"]


def build_fresh(image_size: int, seed: int) -> BuiltModel:
    """SmolLM2 + random vit_tiny at ``image_size`` (the cpu_smollm2 config), untrained."""
    from radgen.config import load_config
    from radgen.model.run import build_model

    cfg = load_config("reportgen", ["cpu_smollm2"], [f"encoder.spec=random:vit_tiny:{image_size}:{seed}",
                                                     f"data.image_size={image_size}", f"seed={seed}"])
    built = build_model(cfg)
    built.model.eval()
    return built


def load_images(folder: Path, n: int, size: int) -> tuple[torch.Tensor, str]:
    """``n`` preprocessed images from ``folder`` (sorted, unreadable ones skipped), else random."""
    from radgen.data.images import ImageLoadError, load_image

    proc = RadDinoProcessor(shortest_edge=size, crop_size=size)
    xs = []
    if folder.is_dir():
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            try:
                xs.append(proc.one(load_image(f)[0]))
            except ImageLoadError:
                continue
            if len(xs) == n:
                return torch.stack(xs), f"{n} images from {folder.resolve()}"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), f"{n} random images ({folder} has fewer than {n})"


def n_generated(row: torch.Tensor, eos: int, pad: int) -> int:
    """Tokens a row really generated: up to and including its first EOS (the rest is padding)."""
    ids = row.tolist()
    return ids.index(eos) + 1 if eos in ids else len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", metavar="RUN_DIR", help="a trained run folder (default: a fresh untrained model)")
    ap.add_argument("--image-size", type=int, default=112, help="fresh model: encoder and image size (default 112)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160, help="default 160, radgen generate's default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    ap.add_argument("--stop-at-eos", action="store_true", help="let rows stop at EOS (default: fixed length)")
    ap.add_argument("--no-indications", action="store_true", help="one prompt length for every row (no padding)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--images", default=str(IMAGES), help="folder of X-rays (default ../shared/data/cxr/images)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    args = ap.parse_args()
    if args.quick:
        args.max_new_tokens, args.rounds = 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, loadavg {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    if args.model:
        from radgen.model.run import load_run

        built = load_run(args.model)
        what = f"trained run {args.model}"
    else:
        built = build_fresh(args.image_size, args.seed)
        what = f"fresh SmolLM2-135M-Instruct + random vit_tiny ({built.image_size} px)"
    model, tok = built.model, built.tokens
    B = args.batch
    pix, src = load_images(Path(args.images), B, built.image_size)
    inds = [None] * B if args.no_indications else [INDICATIONS[i % len(INDICATIONS)] for i in range(B)]
    kw = generation_kwargs({"max_new_tokens": args.max_new_tokens}, tok)  # greedy, as radgen generate
    if not args.stop_at_eos:
        kw["min_new_tokens"] = args.max_new_tokens  # EOS masked until then: equal work on both paths
    eos, pad = tok.tokenizer.eos_token_id, tok.pad_id
    batch = tok.generation_batch(inds)
    singles = [tok.generation_batch([ind]) for ind in inds]
    lens = [int(m.sum()) for m in batch["attention_mask"]]
    print(f"model: {what}, {tok.n_image_tokens} image tokens, built in {time.perf_counter() - t0:.1f} s; {src}")
    print(f"prompt tokens per row {min(lens)}-{max(lens)} (batch padded to {batch['input_ids'].shape[1]}, left); "
          f"greedy, max_new_tokens {args.max_new_tokens}"
          + (", rows stop at EOS" if args.stop_at_eos else f", min_new_tokens {args.max_new_tokens}")
          + f"; {args.precision}; batch {B} against {B} x batch 1, {args.rounds} interleaved rounds")

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def run_batched() -> torch.Tensor:
        with ctx:
            return model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pix, **kw)

    def run_singles() -> list[torch.Tensor]:
        with ctx:
            return [model.generate(s["input_ids"], s["attention_mask"], pixel_values=pix[i:i + 1], **kw)[0]
                    for i, s in enumerate(singles)]

    # warm-up: a few tokens through both paths (first-call allocations, kernels, caches)
    warm = {**kw, "max_new_tokens": 4, **({"min_new_tokens": 4} if "min_new_tokens" in kw else {})}
    with ctx:
        model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pix, **warm)
        model.generate(singles[0]["input_ids"], singles[0]["attention_mask"], pixel_values=pix[:1], **warm)

    times = {"batched": [], "single": []}
    out_b = out_s = None
    for r in range(args.rounds):
        order = ("batched", "single") if r % 2 == 0 else ("single", "batched")
        for path in order:
            t = time.perf_counter()
            if path == "batched":
                out_b = run_batched()
            else:
                out_s = run_singles()
            times[path].append(time.perf_counter() - t)
        print(f"round {r + 1}: batched {times['batched'][-1]:.2f} s, one at a time {times['single'][-1]:.2f} s "
              f"(x{times['single'][-1] / times['batched'][-1]:.2f}); loadavg {os.getloadavg()[0]:.2f}")

    # identical text: token for token (the batched row may only add padding after its EOS)
    same_tokens, same_text = [], []
    for i, alone in enumerate(out_s):
        got = out_b[i]
        same_tokens.append(got[:len(alone)].tolist() == alone.tolist() and bool((got[len(alone):] == pad).all()))
        same_text.append(tok.decode(got) == tok.decode(alone))
    new_b = sum(n_generated(row, eos, pad) for row in out_b)
    new_s = sum(n_generated(row, eos, pad) for row in out_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    paired = statistics.median(s / b for s, b in zip(times["single"], times["batched"]))
    print(f"\nidentical text: {sum(same_text)}/{B} rows; identical tokens: {sum(same_tokens)}/{B} rows"
          + ("" if all(same_tokens) else f" (differ: rows {[i for i, ok in enumerate(same_tokens) if not ok]})"))
    for i in range(min(2, B)):
        text = tok.decode(out_b[i])
        print(f"  row {i}: {text[:110]!r}{'...' if len(text) > 110 else ''}")
    print("\n| path | median s | best s | reports/s (median) | new tokens | tokens/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, n_tok in (("batched (batch %d)" % B, new_b), ("one at a time", new_s)):
        k = "batched" if path.startswith("batched") else "single"
        print(f"| {path} | {med[k]:.2f} | {best[k]:.2f} | {B / med[k]:.3f} | {n_tok} | {n_tok / med[k]:.1f} |")
    print(f"\nspeed-up batch {B} / one at a time: x{paired:.2f} (median of per-round ratios), "
          f"x{med['single'] / med['batched']:.2f} (ratio of medians), x{best['single'] / best['batched']:.2f} "
          f"(ratio of bests); loadavg at end {os.getloadavg()[0]:.2f}")
    write_json(args.json, [row(
        "generate_speed", f"batch {B} vs {B} x batch 1, {args.max_new_tokens} new tokens, {args.precision}",
        RATIO_BATCHED, paired, med["batched"], "s per batch (batched, median)",
        f"median of {args.rounds} per-round ratios; ratio of medians {med['single'] / med['batched']:.2f}, "
        f"of bests {best['single'] / best['batched']:.2f}; identical text {sum(same_text)}/{B}",
        model=what, batch=B, max_new_tokens=args.max_new_tokens, rounds=args.rounds,
        precision=args.precision, stop_at_eos=args.stop_at_eos,
        batched_s=times["batched"], single_s=times["single"],
        ratio_of_medians=med["single"] / med["batched"], ratio_of_bests=best["single"] / best["batched"],
        new_tokens_batched=new_b, new_tokens_single=new_s,
        identical_text=sum(same_text), identical_tokens=sum(same_tokens))])


if __name__ == "__main__":
    main()
