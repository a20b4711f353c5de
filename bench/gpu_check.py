"""The one-command GPU check (issue 21): matmul peaks, the SSL step, the generator's LLM step and
generation, on one GPU in a few minutes, as one table.

    python bench/gpu_check.py --out runs/gpu_check.md     # on a GPU
    radgen bench --gpu                                    # the same, through radgen bench
    python bench/gpu_check.py --dry-run                   # CPU, tiny sizes, seconds (the test suite runs it)

Each step runs in its own process (``--step NAME``) under its own timeout; a step that fails or
times out is recorded with the reason and the next one runs. Steps:

* ``matmul``: torch.mm peaks in bf16, TF32 and fp32, measured in this run (MFU is against the
  bf16 one);
* ``ssl_vitb14_224``: the SSL step (DINO + iBOT + KoLeo, AdamW, EMA) of ViT-B/14 at 224 px
  (2 global 224 + 8 local 98 crops, 65,536 prototypes), bf16 autocast: images/s, model FLOPs per
  step (counted with ``FlopCounterMode`` on 2 images, scaled to the batch), MFU, peak memory;
* ``ssl_rad_dino_vitb14``: the same for the paper recipe (``configs/encoder/rad_dino_vitb14.yaml``:
  518 px, 8 local 224 crops, batch 40 per GPU, activation checkpointing): does it fit 80 GB?
* ``ssl_deterministic``: the ``ssl_vitb14_224`` step with the default kernels and then under
  ``train.deterministic`` (what exact resume on CUDA needs), in one process: the time ratio;
* ``generator_train``: a training step of a randomly initialised LLM of SmolLM2-135M's shape
  (transformers ``LlamaConfig``; no weights needed), every token trained, bf16: tokens/s, MFU.
  Only the LLM's share of ``radgen train`` (no frozen encoder, projector or LoRA);
* ``generator_lora``: ``radgen train``'s own step (``ReportGenerator``): a frozen ViT-B/14 at 518 px
  (1,369 patch tokens, random weights) -> mlp2x_gelu -> LoRA r=16 on that LLM, loss on 128 target
  tokens per row, bf16: tokens/s, MFU (encoder forward + LLM forward and backward);
* ``generate``: greedy generation with that LLM, every report run to ``max_new_tokens``
  (random weights): reports/s;
* ``pretrain_phantoms``: ``radgen synth`` (20,000 phantoms, 128 px), then ``radgen
  pretrain-encoder`` on them (``cpu_tiny`` recipe at batch 256, DataLoader workers) for
  ``--pretrain-seconds`` after its first step, ended by SIGTERM to its process group (as SLURM
  or ``timeout`` send it): images/s (median of the logged steps), GPU busy (NVML samples through
  ``torch.cuda.utilization``, else ``nvidia-smi``; and always the model step's share of the step
  interval: the same SSL step on a random batch in this process against the logged interval),
  and whether it exited 143 with a checkpoint written after the signal;
* ``probe``: ``radgen probe`` of that checkpoint against random inits of the same ViT on a
  separate phantom set (logistic and kNN macro AUROC);
* ``features_vs_card``: ``radgen features`` of that encoder (exported as a HF Dinov2 folder) on
  the phantoms against the rad-dino model card's loop on the same folder (``AutoImageProcessor``
  + ``AutoModel``, one image at a time: open, preprocess, forward, on the same device).

The last three run radgen's own commands (``python -m radgen ...``), each in its own process group
with its own timeout. The others need torch, timm and transformers only (what the lent GPU machines
have), except ``generator_lora`` (peft) and the last three (radgen's dependencies: omegaconf,
scikit-learn, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

from _common import RATIO_OURS_VS_CARD, RATIO_PEAK, RATIO_WHAT_IF, add_json_arg, row, write_json  # noqa: E402  (bench/ is sys.path[0])

BENCH = "gpu_check"
GIB = 2**30

# Sizes of each step, on a GPU and in the CPU dry run. The rad_dino_vitb14 values are those of
# configs/encoder/rad_dino_vitb14.yaml (tests/test_bench.py checks they agree).
RAD_DINO = {"arch": "vit_base", "img_size": 518, "global_size": 518, "local_size": 224, "n_local": 8,
            "batch": 40, "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "grad_checkpointing": True}
SIZES = {
    "gpu": {
        "matmul_n": 8192, "tries": 5, "reps": 10, "steps": 5, "warmup": 2,
        "ssl_vitb14_224": {**RAD_DINO, "img_size": 224, "global_size": 224, "local_size": 98, "batch": 64,
                           "grad_checkpointing": False},
        "ssl_rad_dino_vitb14": RAD_DINO,
        # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
        "llm": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True},
        "train_batch": 16, "train_seq": 1536,  # a LLaVA-Rad row: 1,369 image tokens + prompt + findings
        "generator_lora": {"arch": "vit_base", "img_size": 518, "prompt": 16, "target": 128, "batch": 16},
        "gen_batch": 32, "gen_prompt": 400, "gen_new": 128,
        # radgen pretrain-encoder --config cpu_tiny with these (the keys of the SSL steps above)
        "pretrain": {"arch": "vit_tiny", "img_size": 112, "global_size": 112, "local_size": 56, "n_local": 4,
                     "batch": 256, "out_dim": 128, "hidden_dim": 512, "bottleneck_dim": 128,
                     "grad_checkpointing": False},
        "phantoms": {"n": 20000, "size": 128, "probe_n": 2000, "pretrain_s": 120, "min_steps": 20, "log_every": 10,
                     "workers": max(2, min(12, (os.cpu_count() or 4) - 2)), "probe_seeds": 2, "resamples": 200,
                     "min_pos": 5, "card_n": 300, "synth_timeout": 240, "run_timeout": 150},
    },
    "dry": {
        "matmul_n": 256, "tries": 2, "reps": 2, "steps": 2, "warmup": 1,
        "ssl_vitb14_224": {"arch": "vit_tiny", "img_size": 56, "global_size": 56, "local_size": 28, "n_local": 2,
                           "batch": 2, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
                           "grad_checkpointing": False, "depth": 2},
        "ssl_rad_dino_vitb14": {"arch": "vit_tiny", "img_size": 56, "global_size": 56, "local_size": 28,
                                "n_local": 2, "batch": 2, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
                                "grad_checkpointing": True, "depth": 2},
        "llm": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                "rope_theta": 100000.0, "tie_word_embeddings": True},
        "train_batch": 2, "train_seq": 64, "gen_batch": 2, "gen_prompt": 16, "gen_new": 8,
        "generator_lora": {"arch": "vit_tiny", "depth": 2, "img_size": 56, "prompt": 8, "target": 8, "batch": 2},
        "pretrain": {"arch": "vit_tiny", "depth": 2, "img_size": 56, "global_size": 56, "local_size": 28,
                     "n_local": 2, "batch": 8, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
                     "grad_checkpointing": False},
        "phantoms": {"n": 40, "size": 64, "probe_n": 100, "pretrain_s": 0, "min_steps": 3, "log_every": 1,
                     "workers": 1, "probe_seeds": 1, "resamples": 20, "min_pos": 1, "card_n": 8,
                     "synth_timeout": 60, "run_timeout": 90},
    },
}
TIMEOUT_S = {"matmul": 90, "ssl_vitb14_224": 150, "ssl_rad_dino_vitb14": 210, "ssl_deterministic": 150,
             "generator_train": 120, "generator_lora": 150,
             "generate": 120, "pretrain_phantoms": 480, "probe": 420, "features_vs_card": 420}
# (pretrain_phantoms: plus --pretrain-seconds; the dry run halves these, as the others)


# ----------------------------------------------------------------------------------------------
# Timing and counting
# ----------------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, steps: int, warmup: int, best: bool = False) -> float:
    """Median (or with ``best`` the least) seconds of ``fn()`` over ``steps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times) if best else sorted(times)[len(times) // 2]


def _flops(fn) -> int:
    """FLOPs of one ``fn()`` as ``FlopCounterMode`` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from _peak import CPU_SDPA_FLOPS

    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
        fn()
    return int(fc.get_total_flops())


def _memory(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / GIB}


def _amp(dev: torch.device) -> torch.dtype | None:
    """bf16 autocast on the GPU; the CPU dry run stays fp32 (emulated bf16 is slow)."""
    return torch.bfloat16 if dev.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# Steps (each returns rows in the shape of bench/_common.py)
# ----------------------------------------------------------------------------------------------
def step_matmul(dev: torch.device, sz: dict) -> list[dict]:
    n, rows = sz["matmul_n"], []
    for prec, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        if prec == "tf32" and dev.type != "cuda":
            continue  # TF32 is a tensor-core mode
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)

        def mm():
            for _ in range(sz["reps"]):
                torch.mm(a, b)

        t = _timed(mm, dev, sz["tries"], 1, best=True)
        rows.append(row(BENCH, f"matmul peak {prec} ({n}³ torch.mm, best of {sz['tries']})",
                        value=2.0 * n**3 * sz["reps"] / t / 1e9, unit="GFLOP/s", matmul_peak=prec, when="start",
                        step="matmul"))
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def _ssl_model(c: dict, dev: torch.device, grad_checkpointing: bool):
    from encoder.ssl import SSLConfig, SSLMetaArch
    from encoder.vit import ViTConfig, ViTEncoder

    torch.manual_seed(0)
    vit = ViTEncoder(ViTConfig(arch=c["arch"], depth=c.get("depth"), img_size=c["img_size"], patch_size=14,
                               drop_path_rate=0.1, layerscale_init=1e-5))
    vit.set_grad_checkpointing(grad_checkpointing)
    return SSLMetaArch(vit, SSLConfig(out_dim=c["out_dim"], hidden_dim=c["hidden_dim"],
                                      bottleneck_dim=c["bottleneck_dim"])).to(dev)


def _ssl_batch(c: dict, B: int, dev: torch.device) -> dict:
    """Random 1-channel crops and DINOv2 masks, as the loader collates them."""
    from encoder.masking import masked_indices, sample_masks

    g, gl, ll = torch.Generator().manual_seed(0), c["global_size"], c["local_size"]
    grid = (gl // 14, gl // 14)
    masks = sample_masks(2 * B, grid, generator=g, img_size=gl, patch_size=14)
    idx, w = masked_indices(masks)
    batch = {"global_crops": torch.randn(2 * B, 1, gl, gl, generator=g),
             "local_crops": torch.randn(c["n_local"] * B, 1, ll, ll, generator=g) if c["n_local"] else None,
             "masks": masks, "mask_indices": idx, "mask_weights": w, "n_masked": int(idx.numel())}
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def _ssl_step_fn(model, batch: dict, dev: torch.device):
    opt = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-4)
    amp = _amp(dev)

    def step():
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = model(batch, 0.07)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.student.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_teacher(0.996)

    return step


def _step_ssl(name: str, dev: torch.device, sz: dict) -> list[dict]:
    c = sz[name]
    B = c["batch"]
    # Model FLOPs: counted on 2 images without checkpointing (no recompute), scaled to the batch.
    counted = min(B, 2)
    small = _ssl_model(c, dev, grad_checkpointing=False)
    flops = _flops(_ssl_step_fn(small, _ssl_batch(c, counted, dev), dev)) * B / counted
    del small
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    model = _ssl_model(c, dev, c["grad_checkpointing"])
    t = _timed(_ssl_step_fn(model, _ssl_batch(c, B, dev), dev), dev, sz["steps"], sz["warmup"])
    mem = _memory(dev)
    fits = (f"; fits 80 GB: {'yes' if mem['peak_reserved_gib'] * GIB < 80e9 * 0.95 else 'no'} "
            f"(peak reserved {mem['peak_reserved_gib']:.1f} GiB)") if mem else ""
    case = (f"SSL step {c['arch']} {c['global_size']} px + {c['n_local']}x{c['local_size']}, batch {B}, "
            f"K={c['out_dim']}{', grad ckpt' if c['grad_checkpointing'] else ''}")
    return [row(BENCH, case, RATIO_PEAK, None, value=B / t, unit="images/s",
                notes=f"{t * 1e3:.0f} ms/step, {flops / 1e9:,.1f} GFLOP/step (model FLOPs){fits}",
                step=name, flops_per_step=flops, seconds_per_step=t,
                precision="bf16" if _amp(dev) else "fp32", **mem)]


def step_ssl_vitb14_224(dev, sz):
    return _step_ssl("ssl_vitb14_224", dev, sz)


def step_ssl_rad_dino_vitb14(dev, sz):
    return _step_ssl("ssl_rad_dino_vitb14", dev, sz)


def _train_step(dev: torch.device, opt, loss_fn):
    """One training step as a function: ``loss_fn()`` under bf16 autocast on the GPU, backward,
    optimiser step."""
    amp = _amp(dev)

    def step():
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _flops_and_time(make_step, B: int, dev: torch.device, sz: dict) -> tuple[float, float]:
    """Model FLOPs of ``make_step(B)`` (counted at batch 1, scaled) and its median seconds."""
    flops = _flops(make_step(1)) * B
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return flops, _timed(make_step(B), dev, sz["steps"], sz["warmup"])


def _llm(sz: dict, dev: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**sz["llm"], attn_implementation="sdpa")).to(dev)


def step_generator_train(dev: torch.device, sz: dict) -> list[dict]:
    model = _llm(sz, dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = _amp(dev)
    V = sz["llm"]["vocab_size"]

    def make_step(B: int):
        ids = torch.randint(0, V, (B, sz["train_seq"]), device=dev)

        return _train_step(dev, opt, lambda: model(input_ids=ids, labels=ids).loss)

    B = sz["train_batch"]
    flops, t = _flops_and_time(make_step, B, dev, sz)
    tokens = B * sz["train_seq"]
    return [row(BENCH, f"LLM train step, SmolLM2-135M shape (random init), {B} x {sz['train_seq']} tokens",
                RATIO_PEAK, None, value=tokens / t, unit="tokens/s",
                notes=f"{t * 1e3:.0f} ms/step, {flops / 1e9:,.1f} GFLOP/step; full fine-tune of the LLM only "
                      "(no encoder, projector or LoRA)",
                step="generator_train", flops_per_step=flops, seconds_per_step=t,
                precision="bf16" if amp else "fp32", **_memory(dev))]


def step_ssl_deterministic(dev: torch.device, sz: dict) -> list[dict]:
    """The ``ssl_vitb14_224`` step with default kernels, then under ``train.deterministic``
    (:func:`encoder.inference.set_deterministic`), in one process: the cost of exact resume."""
    from encoder.inference import set_deterministic

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS handle
    c = sz["ssl_vitb14_224"]
    B = c["batch"]
    model = _ssl_model(c, dev, c["grad_checkpointing"])
    batch = _ssl_batch(c, B, dev)
    times = {}
    for mode in (False, True):
        set_deterministic(mode)
        times[mode] = _timed(_ssl_step_fn(model, batch, dev), dev, sz["steps"], sz["warmup"])
    set_deterministic(False)
    return [row(BENCH, f"SSL step {c['arch']} {c['global_size']} px, batch {B}: train.deterministic on / off",
                RATIO_WHAT_IF, times[False] / times[True], value=B / times[True], unit="images/s",
                notes=f"{times[False] * 1e3:.0f} ms/step default kernels, {times[True] * 1e3:.0f} ms/step "
                      "deterministic (same process, same batch; ratio < 1: deterministic is slower)",
                step="ssl_deterministic", seconds_default=times[False], seconds_deterministic=times[True],
                precision="bf16" if _amp(dev) else "fp32")]


def step_generator_lora(dev: torch.device, sz: dict) -> list[dict]:
    """radgen's own training step: frozen ViT-B/14 (random, RAD-DINO's shape and image size) ->
    mlp2x_gelu projector -> LoRA (r=16, all linear layers) on an LLM of SmolLM2-135M's shape,
    loss on the target tokens only (:class:`radgen.model.model.ReportGenerator`), bf16 autocast."""
    from encoder.vit import ViTConfig, ViTEncoder
    from radgen.model.llm import apply_lora
    from radgen.model.model import ReportGenerator
    from radgen.model.projector import build_projector
    from radgen.model.splice import IGNORE_INDEX
    from radgen.model.vision import FrozenVision, VisionFeatures

    c = sz["generator_lora"]
    torch.manual_seed(0)
    vit = ViTEncoder(ViTConfig(arch=c["arch"], depth=c.get("depth"), img_size=c["img_size"], patch_size=14))
    vision = FrozenVision(vit, VisionFeatures(layer=-1, select="patch", norm=False))
    llm = apply_lora(_llm(sz, dev), r=16, alpha=32, dropout=0.05)
    V, hidden = sz["llm"]["vocab_size"], sz["llm"]["hidden_size"]
    image_id = V - 1
    model = ReportGenerator(vision, build_projector("mlp2x_gelu", vit.embed_dim, hidden), llm, image_id).to(dev)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = _amp(dev)
    n_img, P, T = vision.num_tokens(c["img_size"]), c["prompt"], c["target"]

    def make_step(B: int):
        g = torch.Generator().manual_seed(0)
        text = torch.randint(0, V - 1, (B, P + T), generator=g)
        ids = torch.cat([text[:, :4], torch.full((B, n_img), image_id), text[:, 4:]], dim=1).to(dev)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -T:] = ids[:, -T:]
        pixels = torch.randn(B, 3, c["img_size"], c["img_size"], generator=g).to(dev)
        mask = torch.ones_like(ids)

        def loss():
            out = model(ids, mask, pixel_values=pixels, labels=labels)
            return out["loss_sum"] / out["n_tokens"]

        return _train_step(dev, opt, loss)

    B = c["batch"]
    flops, t = _flops_and_time(make_step, B, dev, sz)
    L = n_img + P + T
    return [row(BENCH, f"radgen train step: frozen {c['arch']}/14 at {c['img_size']} px ({n_img} image tokens) -> "
                       f"mlp2x_gelu -> LoRA r=16 on SmolLM2-135M shape, {B} x {L} tokens ({T} target)",
                RATIO_PEAK, None, value=B * L / t, unit="tokens/s",
                notes=f"{t * 1e3:.0f} ms/step, {flops / 1e9:,.1f} GFLOP/step (encoder forward + LLM forward and "
                      f"backward); {B * T / t:,.0f} target tokens/s",
                step="generator_lora", flops_per_step=flops, seconds_per_step=t,
                precision="bf16" if amp else "fp32", **_memory(dev))]


def step_generate(dev: torch.device, sz: dict) -> list[dict]:
    model = _llm(sz, dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    B, P, N = sz["gen_batch"], sz["gen_prompt"], sz["gen_new"]
    ids = torch.randint(0, sz["llm"]["vocab_size"], (B, P), device=dev)

    def gen():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                 min_new_tokens=N, do_sample=False, pad_token_id=0)
        assert out.shape[1] == P + N

    t = _timed(gen, dev, max(1, sz["steps"] // 2), 1)
    return [row(BENCH, f"generate, SmolLM2-135M shape (random init), batch {B}, prompt {P}, {N} new tokens",
                None, None, value=B / t, unit="reports/s",
                notes=f"{t:.2f} s per batch; every report runs to max_new_tokens (random weights), greedy, KV cache",
                step="generate", seconds_per_batch=t, precision="bf16" if dev.type == "cuda" else "fp32",
                **_memory(dev))]


# ---- radgen's own commands on phantoms (each step's commands share the run's --work folder) ----
def _radgen(args: list[str], log: Path, timeout_s: float, ok=(0,), poll=None) -> int:
    """``python -m radgen ARGS`` in its own process group, output to ``log``; ``poll()`` is called
    every 0.2 s while it runs. On a timeout the whole group is killed. Returns the exit code;
    raises RuntimeError (with the log's last line) for one not in ``ok``."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "radgen", *args], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=str(ROOT), start_new_session=True)
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"radgen {args[0]}: stopped after its {timeout_s:.0f} s timeout (log {log})")
            if poll:
                poll(proc)
            time.sleep(0.2)
    if proc.returncode not in ok:
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"radgen {args[0]}: exit code {proc.returncode}: {last[0][-300:]}")
    return proc.returncode


def _phantoms(sz: dict, name: str) -> tuple[Path, float]:
    """The run's phantom set ``name`` (``phantoms``: pretraining, seed 0; ``probe_set``: seed 1),
    written by ``radgen synth`` unless an earlier step did; returns its folder and the seconds taken."""
    ph, folder = sz["phantoms"], sz["work"] / name
    if (folder / "manifest.jsonl").is_file():
        return folder, 0.0
    n, seed = (ph["n"], 0) if name == "phantoms" else (ph["probe_n"], 1)
    t0 = time.perf_counter()
    _radgen(["synth", "--out", str(folder), "--n", str(n), "--size", str(ph["size"]), "--seed", str(seed),
             "--workers", str(max(1, min(16, os.cpu_count() or 1))), "--quiet"],
            sz["work"] / f"synth_{name}.log", ph["synth_timeout"])
    return folder, time.perf_counter() - t0


def _checkpoint(sz: dict) -> Path:
    ckpt = sz["work"] / "pretrain" / "checkpoint.pt"
    if not ckpt.is_file():
        raise RuntimeError("no encoder: the pretrain_phantoms step wrote no checkpoint")
    return ckpt


def _log_rows(path: Path) -> list[dict]:
    """The pretraining log's complete rows so far (the last line may be half written)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("images_per_s") and r.get("nonfinite_skipped") is not None]


def _busy_sampler(dev: torch.device):
    """(GPU utilization % now, how it is read), or (None, None): NVML through
    ``torch.cuda.utilization`` (needs pynvml), else ``nvidia-smi``."""
    if dev.type != "cuda":
        return None, None
    try:
        torch.cuda.utilization(dev)
        return (lambda: float(torch.cuda.utilization(dev))), "NVML samples (torch.cuda.utilization)"
    except Exception:  # no pynvml
        pass
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={dev.index or 0}"]

    def smi() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()[0])

    try:
        smi()
        return smi, "nvidia-smi samples (utilization.gpu)"
    except Exception:
        return None, None


def step_pretrain_phantoms(dev: torch.device, sz: dict) -> list[dict]:
    ph, c, work = sz["phantoms"], sz["pretrain"], sz["work"]
    data, synth_s = _phantoms(sz, "phantoms")
    out = work / "pretrain"
    over = [f"model.arch={c['arch']}", f"model.img_size={c['img_size']}", f"crops.global_size={c['global_size']}",
            f"crops.local_size={c['local_size']}", f"crops.n_local={c['n_local']}", f"optim.batch_size={c['batch']}",
            f"ssl.out_dim={c['out_dim']}", f"ssl.hidden_dim={c['hidden_dim']}",
            f"ssl.bottleneck_dim={c['bottleneck_dim']}", f"data.image_size={ph['size']}", "data.cache=false",
            f"data.num_workers={ph['workers']}", "optim.epochs=1000", "train.checkpoint_every=0",
            "train.progress=false", f"train.log_every={ph['log_every']}", f"train.device={dev.type}"]
    over += [f"model.depth={c['depth']}"] if c.get("depth") else []
    sample, how = _busy_sampler(dev)
    st = {"first": None, "signal": None, "busy": [], "last_sample": 0.0}

    def poll(proc):  # SIGTERM to the group once it has trained pretrain_s seconds (and min_steps steps)
        now = time.perf_counter()
        if st["signal"] is not None:
            return
        rows = _log_rows(out / "log.csv")
        if rows and st["first"] is None:
            st["first"] = now
        if st["first"] is None:
            return
        if sample and now - st["last_sample"] >= 1.0:
            st["busy"].append(sample())
            st["last_sample"] = now
        if len(rows) >= ph["min_steps"] and now - st["first"] >= ph["pretrain_s"]:
            os.killpg(proc.pid, signal.SIGTERM)
            st["signal"] = time.time()

    rc = _radgen(["pretrain-encoder", "--config", "cpu_tiny", "--data", str(data), "--out", str(out), *over],
                 work / "pretrain.log", ph["pretrain_s"] + ph["run_timeout"], ok=(0, 143), poll=poll)
    rows = _log_rows(out / "log.csv")
    ips = sorted(float(r["images_per_s"]) for r in rows[1:] or rows)  # the first step pays for warm-up
    med = ips[len(ips) // 2]
    ckpt = out / "checkpoint.pt"
    ckpt_ok = st["signal"] is not None and ckpt.is_file() and ckpt.stat().st_mtime >= st["signal"]
    # the model step alone on a random batch of the same shape, in this process (the GPU is free now)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model = _ssl_model(c, dev, c["grad_checkpointing"])
    t_model = _timed(_ssl_step_fn(model, _ssl_batch(c, c["batch"], dev), dev), dev, sz["steps"], sz["warmup"])
    share = t_model / (c["batch"] / med)
    busy = ("" if dev.type != "cuda" else "GPU busy: no NVML or nvidia-smi; " if not st["busy"] else
            f"GPU busy {sum(st['busy']) / len(st['busy']):.0f} % ({how}, {len(st['busy'])} samples); ")
    case = (f"radgen pretrain-encoder, {ph['n']:,} phantoms at {ph['size']} px, {c['arch']} {c['global_size']} px "
            f"+ {c['n_local']}x{c['local_size']}, batch {c['batch']}, data.num_workers={ph['workers']}")
    steps = int(rows[-1]["step"]) + 1 if rows else 0
    return [row(BENCH, case, value=med, unit="images/s",
                notes=f"median of {len(ips)} logged steps; {steps} steps; {busy}model step alone "
                      f"{t_model * 1e3:.0f} ms = {100 * share:.0f} % of the logged step interval; "
                      f"synth {synth_s:.0f} s",
                step="pretrain_phantoms", images_per_s=med, steps=steps, gpu_busy_pct=st["busy"],
                gpu_busy_how=how, model_step_share=share, seconds_model_step=t_model, synth_seconds=synth_s),
            row(BENCH, f"SIGTERM to the process group -> exit {rc}, checkpoint written after it: "
                       f"{'yes' if ckpt_ok else 'no'}",
                notes="as SLURM pre-emption or `timeout` sends it; the README promises exit 143 + a checkpoint",
                step="pretrain_phantoms", sigterm_exit=rc, sigterm_checkpoint=ckpt_ok)]


def step_probe(dev: torch.device, sz: dict) -> list[dict]:
    ph, work = sz["phantoms"], sz["work"]
    ckpt = _checkpoint(sz)
    data, _ = _phantoms(sz, "probe_set")
    out = work / "probe"
    t0 = time.perf_counter()
    _radgen(["probe", "--encoder", f"pretrained={ckpt}", "--random-seeds", str(ph["probe_seeds"]), "--data",
             str(data), "--out", str(out), "--probes", "logistic,knn", "--pixel-size", "0", "--resamples",
             str(ph["resamples"]), "--min-pos", str(ph["min_pos"]), "--device", dev.type, "--quiet"],
            work / "probe.log", ph["run_timeout"])
    secs = time.perf_counter() - t0
    summary = json.loads((out / "probe.json").read_text())["summary"]
    rows = []
    for probe in ("logistic", "knn"):
        s = next((s for s in summary if (s["probe"], s["target"], s["metric"]) == (probe, "macro", "auroc")), None)
        case = f"radgen probe, {probe} macro AUROC: pretrained vs {ph['probe_seeds']} random init(s)"
        if s is None or s["value"] is None or s["random_mean"] is None:
            rows.append(row(BENCH, case, notes=f"no macro AUROC (too few positives per split in {ph['probe_n']} "
                                               "phantoms?); see probe.md", step="probe"))
            continue
        beyond = "—" if s["beyond_ci"] is None else ("yes" if s["beyond_ci"] else "no")
        rows.append(row(BENCH, case, value=s["value"], unit="AUROC",
                        notes=f"random init {s['random_mean']:.3f}"
                              + (f" (spread {s['random_spread']:.3f})" if s["n_random"] > 1 else "") + ", "
                              f"delta {s['delta']:+.3f}, beyond the 95 % CI: {beyond}; {ph['probe_n']:,} phantoms "
                              f"(seed 1), {ph['resamples']} resamples; {secs:.0f} s",
                        step="probe", pretrained=s["value"], random_mean=s["random_mean"], delta=s["delta"],
                        beyond_ci=s["beyond_ci"]))
    return rows


def step_features_vs_card(dev: torch.device, sz: dict) -> list[dict]:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from encoder.weights import save_hf_dinov2
    from encoder.specs import load_encoder_spec

    ph, work = sz["phantoms"], sz["work"]
    hf = save_hf_dinov2(load_encoder_spec(str(_checkpoint(sz))), work / "encoder_hf")  # the teacher
    size = sz["pretrain"]["img_size"]
    data, _ = _phantoms(sz, "phantoms")
    # the rad-dino model card's loop, on the same device: one image at a time
    processor = AutoImageProcessor.from_pretrained(hf)
    model = AutoModel.from_pretrained(hf).to(dev).eval()
    paths = sorted((data / "images").glob("*.png"))[:ph["card_n"] + 1]

    def card(p):
        inputs = processor(images=Image.open(p), return_tensors="pt").to(dev)
        with torch.inference_mode():
            return model(**inputs).pooler_output.cpu()

    card(paths[0])  # untimed: first-call costs
    t0 = time.perf_counter()
    for p in paths[1:]:
        card(p)
    card_ips = (len(paths) - 1) / (time.perf_counter() - t0)
    del model
    t0 = time.perf_counter()
    _radgen(["features", "--encoder", str(hf), "--data", str(data), "--out", str(work / "features"),
             "--image-size", str(size), "--device", dev.type, "--quiet"], work / "features.log", ph["run_timeout"])
    wall = time.perf_counter() - t0
    meta = json.loads((work / "features" / "meta.json").read_text())
    ours = float(meta["images_per_s"])
    return [row(BENCH, f"radgen features vs the model card's loop, {sz['pretrain']['arch']} {size} px, "
                       f"{meta['n_features']:,} phantoms",
                RATIO_OURS_VS_CARD, ours / card_ips, value=ours, unit="images/s",
                notes=f"model card loop {card_ips:,.1f} images/s over {len(paths) - 1} images (fp32, batch 1, "
                      f"{dev.type}); radgen features {meta.get('precision')}, batch {meta.get('batch_size')}, "
                      f"{meta.get('workers')} workers, {wall:.0f} s for the whole command",
                step="features_vs_card", card_images_per_s=card_ips, features_wall_s=wall, features_meta=meta)]


STEPS = {"matmul": step_matmul, "ssl_vitb14_224": step_ssl_vitb14_224,
         "ssl_rad_dino_vitb14": step_ssl_rad_dino_vitb14, "ssl_deterministic": step_ssl_deterministic,
         "generator_train": step_generator_train, "generator_lora": step_generator_lora,
         "generate": step_generate, "pretrain_phantoms": step_pretrain_phantoms, "probe": step_probe,
         "features_vs_card": step_features_vs_card}


# ----------------------------------------------------------------------------------------------
# The run: every step in its own process, then MFU and the table
# ----------------------------------------------------------------------------------------------
def _status_row(step: str, status: str, reason: str) -> dict:
    return row(BENCH, f"{step}: {status}", notes=reason, step=step, step_status=status)


def run_step(step: str, dry_run: bool, timeout_s: float, work: Path, extra: tuple = ()) -> list[dict]:
    """``python gpu_check.py --step STEP`` under ``timeout_s``; its rows, or one status row."""
    out = work / f"{step}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--json", str(out), "--work", str(work),
           *extra]
    cmd += ["--dry-run"] if dry_run else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return [_status_row(step, "timed out", f"stopped after its {timeout_s:.0f} s timeout")]
    if proc.returncode != 0 or not out.is_file():
        last = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()][-1:] or ["no output"]
        return [_status_row(step, "failed", f"exit code {proc.returncode}: {last[0][-300:]}")]
    rows = json.loads(out.read_text())
    for r in rows:
        r["detail"].update(step_status="ok", step_seconds=round(time.perf_counter() - t0, 1))
    return rows


def add_mfu(rows: list[dict]) -> None:
    """ratio = achieved FLOP/s / measured matmul peak of the step's precision (bf16 on a GPU)."""
    peaks = {r["detail"]["matmul_peak"]: r["value"] * 1e9 for r in rows if r["detail"].get("matmul_peak")}
    for r in rows:
        d = r["detail"]
        if d.get("flops_per_step") and d.get("seconds_per_step") and peaks.get(d.get("precision")):
            r["ratio"] = d["flops_per_step"] / d["seconds_per_step"] / peaks[d["precision"]]


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| step | case | status | value | MFU / ratio | peak memory | notes |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        d = r["detail"]
        value = "" if r["value"] is None else f"{r['value']:,.{3 if r['unit'] == 'AUROC' else 1}f} {r['unit']}"
        mfu = ("" if r["ratio"] is None else f"{100 * r['ratio']:.1f} %" if r["ratio_kind"] == RATIO_PEAK
               else f"{r['ratio']:.2f}x")
        mem = f"{d['peak_allocated_gib']:.1f} GiB" if d.get("peak_allocated_gib") is not None else ""
        lines.append(f"| {d.get('step', '')} | {r['case']} | {d.get('step_status', '')} | {value} | {mfu} | {mem} "
                     f"| {r['notes']} |")
    return "\n".join(lines) + "\n"


def run_all(dry_run: bool, pretrain_s: float | None = None) -> tuple[list[dict], str]:
    device = "cpu (dry run, tiny sizes)" if dry_run else (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
    header = (f"# GPU check ({'dry run' if dry_run else 'full'})\n\n* device: {device}\n* torch {torch.__version__}"
              f"\n* MFU: model FLOPs per step / step time / the bf16 matmul peak measured here "
              f"(dry run: the fp32 CPU peak); the features ratio: radgen features / the model card's loop")
    rows: list[dict] = []
    if not dry_run and not torch.cuda.is_available():
        rows = [_status_row(s, "skipped", "no CUDA device (--dry-run checks the script on the CPU)") for s in STEPS]
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            extra = ("--pretrain-seconds", str(pretrain_s)) if pretrain_s is not None else ()
            for step in STEPS:
                print(f"gpu_check: {step} ...", flush=True)
                timeout = TIMEOUT_S[step] * (0.5 if dry_run else 1.0)
                if step == "pretrain_phantoms":
                    timeout += SIZES["dry" if dry_run else "gpu"]["phantoms"]["pretrain_s"] if pretrain_s is None \
                        else pretrain_s
                rows += run_step(step, dry_run, timeout, Path(tmp), extra)
        add_mfu(rows)
    return rows, format_table(rows, header)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script in seconds")
    ap.add_argument("--quick", action="store_true", help="the same as --dry-run (radgen bench --quick passes it)")
    ap.add_argument("--out", metavar="FILE.md", help="write the markdown table here")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    ap.add_argument("--threads", type=int, help="torch threads (radgen bench passes it)")
    ap.add_argument("--pretrain-seconds", type=float, metavar="S",
                    help=f"train on phantoms this long before SIGTERM (default {SIZES['gpu']['phantoms']['pretrain_s']}"
                         f"; the dry run: a few steps)")
    ap.add_argument("--work", help=argparse.SUPPRESS)  # the run's folder, shared by the steps' children
    add_json_arg(ap)
    args = ap.parse_args()
    dry = args.dry_run or args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        dev = torch.device("cpu" if dry else "cuda")
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        sz = dict(SIZES["dry" if dry else "gpu"], work=Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")))
        if args.pretrain_seconds is not None:
            sz["phantoms"] = {**sz["phantoms"], "pretrain_s": args.pretrain_seconds}
        write_json(args.json, STEPS[args.step](dev, sz))
        return
    rows, table = run_all(dry, args.pretrain_seconds)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    write_json(args.json, rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
