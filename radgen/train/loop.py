"""The report generator's training loop: two stages, one process or ``torchrun``, exact resume.

Stage 1 trains the projector only (the LLM and its LoRA adapter frozen; LoRA starts at zero, so
this is the plain LLM reading projected image tokens); stage 2 trains projector + LoRA. Each stage
has its own AdamW optimiser and warm-up + cosine schedule.

Why our own loop rather than the HF Trainer: a run folder must hold only what was trained
(the Trainer checkpoints whole models), two stages with their own optimisers and schedules form
one resumable run, and resume must be exact at step granularity. Every random draw of a step is
derived from ``(seed, stage, step, rank)`` (the data order is a seeded permutation per epoch and
the global RNG, used by LoRA dropout, is reseeded each step), and the checkpoint holds the
trainable weights and optimiser state, so a run killed at any point and resumed follows the same
trajectory as one that never stopped. The loss is summed over target tokens and divided by the
token count of the whole (accumulated, all-rank) batch, so every target token weighs the same
whatever the padding, accumulation or world size.

Outputs in ``--out``: ``config.yaml``, ``log.csv`` (one row per logged step, validation rows
included), ``samples.jsonl`` (sample generations at each evaluation), ``skipped.jsonl``
(unreadable images), ``checkpoint.pt`` while training, and at the end the trained parts
(:mod:`radgen.model.run`) plus ``summary.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from encoder.checkpoint import load_latest_checkpoint, save_checkpoint
from encoder.distributed import all_sum, setup_distributed, sum_gradients
from encoder.guards import NonFiniteGuard
from encoder.inference import resolve_device, resolve_precision, set_deterministic
from encoder.io import atomic_write_text
from encoder.loop import CsvLog, StopSignal, tensorboard_writer
from radgen.config import ConfigError, load_config, save_config
from radgen.data.reports import read_report_rows
from radgen.data.skips import SKIPPED_FILE, write_skip_log
from radgen.model.oracle import check_oracle_labels, is_oracle_spec
from radgen.model.prompt import normal_sentences
from radgen.model.run import MODEL_JSON, BuiltModel, build_model, generate_reports, save_trained
from radgen.train.config import STAGES, validate_config
from radgen.train.inputs import VisionInputs, fit_head
from radgen.train.plan import batch_indices, stage_plan, stage_seed, training_examples

__all__ = ["run_train", "STATE_FORMAT"]

STATE_FORMAT = "radgen-reportgen-state/1"
STATE_FILE, LOG_FILE, SAMPLES_FILE, SUMMARY_FILE = "checkpoint.pt", "log.csv", "samples.jsonl", "summary.json"
# tokens: target tokens trained on so far; input_tokens: every input position so far (prompt, image
# and target tokens, padding excluded); tokens_per_s counts input tokens, target_tokens_per_s targets.
LOG_FIELDS = ["stage", "step", "total_steps", "epoch", "lr", "loss", "val_loss", "tokens", "input_tokens",
              "tokens_per_s", "target_tokens_per_s", "seconds"]


def _autocast(device: torch.device, precision: str):
    prec = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"), prec


def _trainable(built: BuiltModel, stage: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the parts this stage trains; named parameters, sorted."""
    model = built.model
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage == "stage2":
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def run_train(cfg: DictConfig, progress: bool = True, return_model: bool = False,
              _stop_at: tuple[str, int] | None = None) -> dict:
    """Train (or resume) the run ``cfg.out``; returns a summary dict (``status``: complete |
    preempted | already-complete; with ``return_model`` also ``model``, the trained
    :class:`~radgen.model.run.BuiltModel`). ``_stop_at=(stage, step)`` raises after that step
    (a simulated kill, for tests)."""
    validate_config(cfg)
    out = Path(str(cfg.out))
    set_deterministic(cfg.train.deterministic)  # before any CUDA work (cuBLAS reads its env var once)
    device = resolve_device(cfg.train.device)
    rank, world = setup_distributed(device)
    summary_path = out / SUMMARY_FILE
    if (out / MODEL_JSON).is_file() and summary_path.is_file() and not any(out.glob(STATE_FILE + "*")):
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "complete":
            return {**summary, "status": "already-complete", "rank": rank}
    state = load_latest_checkpoint(out / STATE_FILE, fmt=STATE_FORMAT)
    if state is not None:
        if _core(_with_defaults(state["config"])) != _core(OmegaConf.to_container(cfg, resolve=True)):
            raise ConfigError(f"{out} holds a run with a different config; resume it with the same "
                              "config or choose a new --out")

    rows_all = read_report_rows(str(cfg.data.path), split=cfg.data.train_split, text_field=cfg.data.text_field,
                                indication_field=cfg.data.indication_field)
    rows_train = [r for r in rows_all if r.text and r.text.strip()]  # an empty report teaches nothing
    n_no_text = len(rows_all) - len(rows_train)
    if cfg.data.max_train_samples:
        rows_train = rows_train[: int(cfg.data.max_train_samples)]
    rows_val = []
    if cfg.data.val_split:
        rows_val = read_report_rows(str(cfg.data.path), split=cfg.data.val_split, text_field=cfg.data.text_field,
                                    indication_field=cfg.data.indication_field, require_text=True)
        rows_val = rows_val[: int(cfg.data.max_val_samples or len(rows_val))]
    if not rows_train:
        raise ConfigError(f"{cfg.data.path}: no {cfg.data.train_split!r} rows with a {cfg.data.text_field!r} text")

    if is_oracle_spec(cfg.encoder.spec):
        check_oracle_labels(rows_train, cfg.data.path)
    torch.manual_seed(cfg.seed)
    built = build_model(cfg)
    built.model.to(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    show = progress and rank == 0
    skipped: list[dict] = []
    train_in = VisionInputs(built, rows_train, cfg.data.cache_vision, device, cfg.data.workers,
                             skipped, show, "encode train")
    val_in = (VisionInputs(built, rows_val, cfg.data.cache_vision, device, cfg.data.workers,
                            skipped, show, "encode val") if rows_val else None)
    if rank == 0:
        write_skip_log(out / SKIPPED_FILE, skipped)
    if cfg.tasks.get("findings_head"):
        fit_head(cfg, built, train_in, device, show)
    ctx_precision = _autocast(device, cfg.train.precision)[1]

    resumed_at = (STAGES.index(state["stage"]), int(state["step"])) if state else (-1, -1)
    log = CsvLog(out / LOG_FILE, LOG_FIELDS, keep=lambda r: (STAGES.index(r["stage"]), int(r["step"])) <= resumed_at) \
        if rank == 0 else nullcontext()
    done_stages = list(state["stages_done"]) if state else []
    n_train = len(train_in.ok)
    status = "complete"
    t_start = time.perf_counter()
    # SIGTERM (pre-emption): finish the step, checkpoint, exit 143; torchrun signals every rank
    with StopSignal() as stop, log:
        if cfg.tasks.finding_sentence_weight != 1.0:  # the sentences no normal training report has
            built.tokens.set_normal_sentences(normal_sentences(
                [(train_in.rows[i].text, train_in.rows[i].labels) for i in train_in.ok]))
        for stage_i, stage in enumerate(STAGES):
            if stage in done_stages:
                continue
            examples = training_examples([train_in.rows[i] for i in train_in.ok], cfg.tasks, built.tokens,
                                         cfg[stage].task)
            if not examples:
                raise ConfigError(f"{stage}.task={cfg[stage].task}: no training row has CheXpert labels")
            lengths = None
            if cfg.data.group_by_length:  # prompt + target tokens of each training example
                tok = built.tokens
                lengths = [len(tok.prompt_ids(e.indication, e.instruction)) + len(tok.target_ids(e.target))
                           for e in examples]
            plan = stage_plan(cfg, stage, len(examples), world)
            plan.update(lengths=lengths, window=cfg.data.length_window)
            params = _trainable(built, stage)
            opt = torch.optim.AdamW([p for _, p in params], lr=cfg[stage].lr,
                                    weight_decay=cfg[stage].weight_decay, betas=(0.9, 0.999))
            start, tokens0 = 0, (0, 0)
            if state and state["stage"] == stage:
                _load_trainable(built, state)
                opt.load_state_dict(state["optimizer"])
                start = int(state["step"])
                tokens0 = (int(state.get("tokens", 0)), int(state.get("input_tokens", 0)))
                _truncate_samples(out / SAMPLES_FILE, stage_i, start)
            elif state:
                _load_trainable(built, state)  # previous stage's final weights
            status = _run_stage(cfg, built, stage, stage_i, plan, params, opt, start, tokens0, train_in, examples, val_in,
                                device, rank, world, out, log, done_stages, stop, show, _stop_at)
            state = None
            if status != "complete":
                break
            done_stages.append(stage)
    summary = {"status": status, "rank": rank, "world_size": world, "device": str(device),
               "precision": ctx_precision, "n_train": n_train, "n_val": len(val_in.ok) if val_in else 0,
               "n_skipped": len(skipped), "n_without_text": n_no_text, "seconds": round(time.perf_counter() - t_start, 1),
               "out": str(out)}
    if status == "complete":
        if rank == 0:
            save_trained(built, out, stage="stage2")
            last = [r for r in log.rows if r.get("val_loss")]
            summary["final_val_loss"] = float(last[-1]["val_loss"]) if last else None
            atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
            for f in out.glob(STATE_FILE + "*"):  # checkpoint.pt, checkpoint.pt.1, their checksums
                f.unlink(missing_ok=True)
        _barrier(world)
    if return_model:
        summary["model"] = built
    return summary


def _truncate_samples(path: Path, stage_i: int, step: int) -> None:
    """Drop sample generations logged after the checkpoint being resumed (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
        if (STAGES.index(r["stage"]), int(r["step"])) <= (stage_i, step):
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def _with_defaults(saved: dict) -> dict:
    """A saved config with the keys added to ``configs/reportgen/default.yaml`` since it was written
    filled in at their defaults (a key a newer version added does not block a resume)."""
    merged = OmegaConf.merge(OmegaConf.to_container(load_config("reportgen")), saved)
    return OmegaConf.to_container(merged, resolve=True)


def _core(cfg: dict) -> dict:
    """The parts of a config that must not change across a resume (logging and caps may)."""
    keep = {k: v for k, v in cfg.items() if k not in ("train", "generate", "out")}
    keep["data"] = {k: v for k, v in cfg["data"].items() if k not in ("workers", "cache_vision")}
    return keep


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _load_trainable(built: BuiltModel, state: dict) -> None:
    built.model.projector.load_state_dict(state["projector"])
    if state.get("lora"):
        missing = built.model.llm.load_state_dict(state["lora"], strict=False)
        bad = [k for k in state["lora"] if k in missing.unexpected_keys]
        if bad:
            raise ConfigError(f"checkpoint LoRA weights do not fit the model: {bad[:3]}")


def _save_state(out: Path, built: BuiltModel, stage: str, step: int, opt, done_stages: list[str], cfg,
                tokens: tuple[int, int]) -> None:
    lora = {n: p.detach().cpu().clone() for n, p in built.model.llm.named_parameters() if "lora_" in n}
    save_checkpoint(out / STATE_FILE, {
        "stage": stage, "step": step, "stages_done": list(done_stages),
        "projector": {k: v.detach().cpu().clone() for k, v in built.model.projector.state_dict().items()},
        "lora": lora, "optimizer": opt.state_dict(), "tokens": int(tokens[0]), "input_tokens": int(tokens[1]),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }, fmt=STATE_FORMAT, keep=cfg.train.keep_checkpoints)


def _kept(out: Path) -> str:
    """What a guard that stops the run leaves behind (for its message)."""
    if not (out / STATE_FILE).is_file():
        return "no checkpoint had been written yet"
    return f"the last good checkpoint is kept at {out / STATE_FILE} (re-running resumes from it)"


def _run_stage(cfg, built: BuiltModel, stage: str, stage_i: int, plan: dict, params, opt, start: int,
               seen: tuple[int, int], train_in: VisionInputs, examples: list, val_in: VisionInputs | None, device,
               rank: int, world: int,
               out: Path, log: CsvLog | None, done_stages: list[str], stop: StopSignal, show: bool,
               stop_at) -> str:
    from tqdm import tqdm

    st, tr = cfg[stage], cfg.train
    total = plan["total"]
    model = built.model
    model.train()
    micro = st.batch_size
    n = len(examples)
    tokens_seen, inputs_seen = seen  # target tokens, input tokens (all non-padding positions)
    t_last, tok_last, in_last = time.perf_counter(), tokens_seen, inputs_seen
    bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not show)
    nonfinite = NonFiniteGuard(tr.on_nonfinite, tr.max_nonfinite_skips)
    tb = tensorboard_writer(out, required=True) if tr.tensorboard and rank == 0 else None
    for step in range(start, total):
        torch.manual_seed(stage_seed(cfg.seed, stage_i, step, rank))
        for g in opt.param_groups:
            g["lr"] = float(plan["lr"][step])
        batches, encoded = [], []
        for idx in batch_indices(cfg.seed, stage_i, step, plan, n, rank, world, micro):
            ex = [examples[i] for i in idx]
            b = train_in([e.row for e in ex])
            if b is None:
                continue
            kept = {r.id for r in b["rows"]}  # uncached mode drops rows whose image fails to load
            ex = [e for e in ex if train_in.rows[train_in.ok[e.row]].id in kept]
            batches.append(b)
            encoded.append(built.tokens.train_batch([e.target for e in ex], [e.indication for e in ex],
                                                    [e.instruction for e in ex]))
        n_tok = sum(int((e["labels"][:, 1:] != -100).sum()) for e in encoded)
        n_tok_all = all_sum(float(n_tok), device, world)
        n_in_all = all_sum(float(sum(int(e["attention_mask"].sum()) for e in encoded)), device, world)
        loss_total = 0.0
        for b, e in zip(batches, encoded):
            ctx, _ = _autocast(device, tr.precision)
            with ctx:
                res = model(**{k: v.to(device) for k, v in e.items()},
                            **{k: v.to(device) for k, v in b.items() if k != "rows"})
            loss = res["loss_sum"] / max(n_tok_all, 1.0)
            loss.backward()
            loss_total += float(loss.detach())
        # the loss is already divided by the all-rank token count; a rank that loaded no row adds zeros
        sum_gradients([p for _, p in params], world)
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], st.grad_clip)
        loss_total = all_sum(loss_total, device, world)
        ok = all_sum(0.0 if NonFiniteGuard.finite(loss_total, gnorm) else 1.0, device, world) == 0
        # no rank loaded a row: no update (as one process, whose parameters then have no gradient)
        if not nonfinite.should_skip(ok, f"{stage} step {step + 1}", _kept(out)) and n_tok_all > 0:
            opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += int(n_tok_all)
        inputs_seen += int(n_in_all)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}")
        row = None
        if done % max(1, tr.log_every) == 0 or done == total:
            now = time.perf_counter()
            row = {"stage": stage, "step": done, "total_steps": total, "epoch": round(done / plan["per_epoch"], 3),
                   "lr": float(plan["lr"][step]), "loss": loss_total, "tokens": tokens_seen,
                   "input_tokens": inputs_seen, "tokens_per_s": (inputs_seen - in_last) / max(now - t_last, 1e-9),
                   "target_tokens_per_s": (tokens_seen - tok_last) / max(now - t_last, 1e-9),
                   "seconds": round(now - t_last, 3)}
            t_last, tok_last, in_last = now, tokens_seen, inputs_seen
        evaluate = (tr.eval_every > 0 and done % tr.eval_every == 0) or done == total
        if evaluate and val_in is not None:
            row = row or {"stage": stage, "step": done, "total_steps": total,
                          "epoch": round(done / plan["per_epoch"], 3), "lr": float(plan["lr"][step])}
            row["val_loss"] = _validate(cfg, built, val_in, device, stage, done, out, rank, show=False)
            model.train()
        if row is not None and rank == 0:
            log.write(row)
            if tb is not None:
                for key in ("loss", "val_loss", "lr", "tokens_per_s", "target_tokens_per_s"):
                    if row.get(key) is not None:
                        tb.add_scalar(f"{stage}/{key}", float(row[key]), done)
                tb.flush()
        stopping = all_sum(1.0 if stop.flag else 0.0, device, world) > 0  # every rank stops together
        ckpt = (done % max(1, tr.checkpoint_every) == 0) or done == total or stopping
        if ckpt and rank == 0:
            _save_state(out, built, stage, done, opt, done_stages, cfg, (tokens_seen, inputs_seen))
        if ckpt:
            _barrier(world)
        if stop_at is not None and stop_at == (stage, done):
            bar.close()
            raise _Stopped(f"stopped after {stage} step {done}")
        if stopping:
            bar.close()
            return "preempted"
    bar.close()
    if tb is not None:
        tb.close()
    return "complete"


class _Stopped(RuntimeError):
    """Raised by the ``_stop_at`` test hook (a simulated kill)."""


@torch.no_grad()
def _validate(cfg, built: BuiltModel, val_in: VisionInputs, device, stage: str, step: int, out: Path,
              rank: int, show: bool) -> float:
    """Token-weighted validation loss; rank 0 also writes a few greedy sample generations."""
    model = built.model
    model.eval()
    loss_sum, n_tok = 0.0, 0
    bs = cfg[stage].batch_size
    idx = list(range(len(val_in.ok)))
    for s in range(0, len(idx), bs):
        b = val_in(idx[s:s + bs])
        e = built.tokens.train_batch([built.tokens.report_target(r.text, r.labels) for r in b["rows"]],
                                     [r.indication for r in b["rows"]])
        e.pop("label_weights", None)  # the validation loss is the plain token average
        ctx, _ = _autocast(device, cfg.train.precision)
        with ctx:
            res = model(**{k: v.to(device) for k, v in e.items()},
                        **{k: v.to(device) for k, v in b.items() if k != "rows"})
        loss_sum += float(res["loss_sum"])
        n_tok += res["n_tokens"]
    k = cfg.train.sample_generations
    if rank == 0 and k > 0:
        b = val_in(idx[:k])
        ctx, _ = _autocast(device, cfg.train.precision)
        with ctx:
            texts = generate_reports(built, [r.indication for r in b["rows"]], dict(cfg.generate),
                                     **{k2: v for k2, v in b.items() if k2 != "rows"})
        with (out / SAMPLES_FILE).open("a", encoding="utf-8") as fh:
            for r, t in zip(b["rows"], texts):
                fh.write(json.dumps({"stage": stage, "step": step, "id": r.id, "reference": r.text,
                                     "generated": t}) + "\n")
    return loss_sum / max(n_tok, 1)
