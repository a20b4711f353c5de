"""The report generator's training inputs: frozen vision tokens for rows, and the findings head.

:class:`VisionInputs` gives the encoder tokens of rows by index, either all computed once at the
start (``data.cache_vision``: every rank encodes its share and the ranks all-gather, so all hold
the same cache and the same skipped rows) or decoded per batch from the files (unreadable files
skipped with one warning each). :func:`fit_head` fits the findings head on the training films'
tokens and labels before stage 1.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from radgen.config import ConfigError
from radgen.data.reports import ReportRow, image_batches
from radgen.data.skips import SKIPPED_FILE
from radgen.model.prompt import has_labels
from radgen.model.run import BuiltModel

__all__ = ["VisionInputs", "fit_head"]



_CACHE_BATCH = 32  # images per vision forward while filling the cache


def _gather(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if world == 1:
        return [obj]
    got = [None] * world
    dist.all_gather_object(got, obj)
    return got


class VisionInputs:
    """Encoder tokens for rows by index: all computed once (``cache``) or per batch from files."""

    def __init__(self, built: BuiltModel, rows: list[ReportRow], cache: bool, device: torch.device,
                 workers: int, skipped: list[dict], progress: bool, desc: str):
        self.built, self.rows, self.device, self.workers = built, rows, device, workers
        self.load_row = built.input_loader()
        self.tokens: torch.Tensor | None = None
        self.ok: list[int] = list(range(len(rows)))
        self.failed: set[str] = set()
        if cache:
            self._fill(skipped, progress, desc)

    def _fill(self, skipped: list[dict], progress: bool, desc: str) -> None:
        """Encode every row once. Under torchrun each rank encodes rows ``i % world == rank`` and the
        ranks all-gather each round of batches, so every rank ends with the same full cache and
        the same skipped rows."""
        from tqdm import tqdm

        grouped = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
        rounds = math.ceil(math.ceil(len(self.rows) / world) / _CACHE_BATCH)  # the same on every rank
        batches = image_batches(self.rows[rank::world], self.load_row, _CACHE_BATCH, self.workers)
        index = {id(r): i for i, r in enumerate(self.rows)}
        tokens: dict[int, torch.Tensor] = {}
        failures: dict[int, dict] = {}
        with tqdm(total=len(self.rows), desc=desc, unit="img", disable=not progress) as bar:
            for _ in range(rounds):
                b = next(batches, None)
                part = ([], None, {}) if b is None else self._encode(b, index)
                for got, out, got_failures in _gather(part, world):
                    tokens.update(zip(got, out if out is not None else []))
                    failures.update(got_failures)
                    bar.update(len(got) + len(got_failures))
        skipped += [failures[i] for i in sorted(failures)]
        if not tokens:
            raise ConfigError(f"{desc}: no image could be loaded (see {SKIPPED_FILE})")
        self.ok = sorted(tokens)
        self.tokens = torch.stack([tokens[i] for i in self.ok])
        self._pos = {i: k for k, i in enumerate(self.ok)}

    def _encode(self, b, index: dict[int, int]) -> tuple[list[int], torch.Tensor | None, dict]:
        """``(row indices, their tokens on the CPU, {row index: skipped record})`` of one batch (one
        tensor, not one per row: pickling a row view would copy the whole batch's storage)."""
        failures = {index[id(row)]: {"id": row.id, **err} for row, err in b.failures}
        if b.inputs is None:
            return [], None, failures
        out = self.built.model.vision(b.inputs.to(self.device)).cpu()
        return [index[id(r)] for r in b.items], out, failures

    def __call__(self, idx: list[int]) -> dict | None:
        """``{"vision_tokens"|"pixel_values": tensor, "rows": [...]}`` for positions of ``self.ok``
        (``None`` when no image of the batch loads: uncached mode skips unreadable files)."""
        rows = [self.rows[self.ok[i]] for i in idx]
        if self.tokens is not None:
            return {"vision_tokens": self.tokens[[self._pos[self.ok[i]] for i in idx]], "rows": rows}
        b = next(image_batches(rows, self.load_row, len(rows), self.workers))  # decoded in data.workers threads
        for row, err in b.failures:
            if row.id not in self.failed:
                self.failed.add(row.id)
                print(f"warning: skipping {err['path']}: {err['reason']}", file=sys.stderr)
        return None if b.inputs is None else {"pixel_values": b.inputs, "rows": b.items}


def fit_head(cfg: DictConfig, built: BuiltModel, train_in: "VisionInputs", device: torch.device,
              show: bool) -> None:
    """Fit the findings head (:mod:`radgen.model.findings_head`) on the training films' image
    tokens and labels; a deterministic fit of seconds, so a resumed run fits it again."""
    from radgen.model.findings_head import fit_findings_head

    src = train_in
    if src.tokens is None:  # uncached training: encode the training films once for the head
        src = VisionInputs(built, train_in.rows, True, device, train_in.workers, [], show,
                            "encode train (findings head)")
    tokens = src.tokens  # (films that loaded, N, C), in the order of src.ok
    rows = [src.rows[i] for i in src.ok]
    labelled = [k for k, r in enumerate(rows) if has_labels(r.labels)]
    if not labelled:
        raise ConfigError("tasks.findings_head needs CheXpert label columns in the training manifest; none found")
    t0 = time.perf_counter()
    fa, prec = cfg.tasks.get("findings_head_max_false_alarm"), cfg.tasks.get("findings_head_min_precision")
    head, report = fit_findings_head(tokens[labelled], [rows[k].labels for k in labelled], seed=int(cfg.seed),
                                     max_false_alarm=None if fa is None else float(fa),
                                     min_precision=None if prec is None else float(prec))
    built.head = head.to(device).eval()
    built.info["findings_head"] = {**report, "seconds": round(time.perf_counter() - t0, 1)}
    if show:
        f1 = {f: e["f1"] for f, e in report["findings"].items() if "f1" in e}
        print(f"findings head: {len(labelled)} films, {len(f1)} findings, out-of-fold F1 "
              + ", ".join(f"{f} {v:.2f}" for f, v in f1.items()), file=sys.stderr)
