"""What each step of a stage trains on: the examples of an epoch, the step's rows, its rates.

Pure functions of the config, the rows and ``(seed, stage, step, rank)``, so that a resumed run
draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from encoder.train import cosine_schedule
from radgen.data.batching import epoch_batches
from radgen.data.reports import ReportRow
from radgen.model.prompt import findings_list_text, positive_findings

__all__ = ["Example", "training_examples", "lr_schedule", "stage_plan", "batch_indices", "stage_seed"]


def stage_seed(seed: int, stage: int, step: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + stage * 100_003 + step * 101 + rank) % (2**63 - 1)


@dataclass(frozen=True)
class Example:
    """One training example: a row (position in the loadable rows) and what it is asked."""
    row: int
    target: str
    indication: str | None = None
    instruction: str | None = None  # None: the configured findings instruction


def training_examples(rows: list[ReportRow], tasks, tokens, task: str = "report") -> list[Example]:
    """The examples of one epoch of a stage whose ``task`` is:

    * ``report``: every row's report (its findings, or with ``tasks.findings_first`` its stated
      findings line and then the findings: :meth:`~radgen.model.prompt.ReportTokenizer.report_target`),
      then (``tasks.findings_list``) every labelled row asked for its list of positive findings
      (multi-task: the same image tokens, another instruction, a short target that is all signal);
    * ``findings_list``: only those list questions (a stage that aligns the projector on the
      short, image-dependent target before the reports).

    With ``tasks.repeat_abnormal: k`` every row whose labels name a finding appears ``k`` times
    per epoch (so normal films, over half of most sets, do not drown the findings)."""
    def copies(r: ReportRow) -> int:
        return tasks.repeat_abnormal if positive_findings(r.labels) else 1

    out = []
    if task == "report":
        for k, r in enumerate(rows):
            out += [Example(k, tokens.report_target(r.text, r.labels), r.indication)] * copies(r)
    if task == "findings_list" or tasks.findings_list:
        for k, r in enumerate(rows):
            if (t := findings_list_text(r.labels)) is not None:
                out += [Example(k, t, r.indication, str(tasks.findings_list_instruction))] * copies(r)
    return out


def lr_schedule(base: float, final: float, total: int, warmup: int, decay_ratio: float = 0.0) -> np.ndarray:
    """Per-step learning rates (total,): linear warm-up over ``warmup`` steps, then cosine from
    ``base`` to ``final``; with ``decay_ratio`` > 0, warm-up, constant ``base``, then linear to
    ``final`` over the last ``round(decay_ratio * total)`` steps (warmup-stable-decay)."""
    decay = int(round(decay_ratio * total))
    if decay <= 0 or total - decay < warmup:
        return cosine_schedule(base, final, total, warmup) if total else np.zeros(0)
    stable = cosine_schedule(base, base, total - decay, warmup)
    return np.concatenate([stable, np.linspace(base, final, decay + 1)[1:]])


def stage_plan(cfg: DictConfig, stage: str, n_train: int, world: int) -> dict:
    st = cfg[stage]
    global_batch = st.batch_size * st.accum_steps * world
    per_epoch = max(1, math.ceil(n_train / global_batch))
    total = int(math.ceil(st.epochs * per_epoch)) if st.max_steps is None else int(st.max_steps)
    warmup = int(math.ceil(st.warmup_ratio * total))
    lr = lr_schedule(st.lr, st.min_lr, total, warmup, st.decay_ratio)
    return {"global_batch": global_batch, "per_epoch": per_epoch, "total": total, "lr": lr}


def batch_indices(seed: int, stage_i: int, step: int, plan: dict, n: int, rank: int, world: int,
                   micro: int) -> list[list[int]]:
    """This rank's micro-batches of step ``step``: the epoch's global batches
    (:func:`radgen.data.batching.epoch_batches`, seeded by ``(seed, stage, epoch)``), this one
    dealt out over ranks and cut into micro-batches."""
    epoch, within = divmod(step, plan["per_epoch"])
    cache = plan.setdefault("epochs", {})
    if epoch not in cache:
        cache.clear()  # one epoch's order at a time
        cache[epoch] = epoch_batches(n, plan["global_batch"], stage_seed(seed, stage_i, epoch, 7),
                                     lengths=plan.get("lengths"), window=plan.get("window", 64),
                                     min_size=world)  # every rank gets rows
    idx = cache[epoch][within]
    mine = idx[rank::world]
    return [mine[s:s + micro] for s in range(0, len(mine), micro)]
