"""The one image streamer: items in order -> batches of model inputs, loaded ahead of their use.

Every job that turns rows into model inputs streams them through :func:`stream_batches`: the
features job (:func:`radgen.features.iter_image_batches`), report-generator training (its
vision-token cache and uncached steps) and generation (:func:`radgen.data.reports.image_batches`).
An item is whatever the caller loads (a manifest row, an ``(id, path)`` pair); ``load(item)``
returns ``(tensor, None)`` or, for an item that cannot be had, ``(None, record)`` with the
:class:`radgen.data.images.ImageLoadError` record, so a bad file is reported in its batch and the
rest go on.

Two kinds of workers:

* ``loader="thread"``: a pool of ``workers`` threads, one item per task (PIL decoding and torch's
  resize release the GIL); at most ``prefetch`` batches are submitted ahead of the one the
  caller holds.
* ``loader="process"``: ``workers`` DataLoader worker processes (one torch thread each), each
  building whole batches (one shared-memory tensor per batch crosses the process boundary);
  ``prefetch`` batches per worker. ``load`` must then be picklable (a module-level function or
  a ``functools.partial`` of one).

``workers=0`` loads each batch in the calling thread when it is asked for. Memory never grows
with the number of items.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.data

__all__ = ["LOADERS", "StreamBatch", "stream_batches"]

LOADERS = ("thread", "process")
LOADER_NICE = 10  # niceness of loader processes (see _loader_init); 0: same priority as the forward

Load = Callable[[Any], "tuple[torch.Tensor | None, dict | None]"]


@dataclass
class StreamBatch:
    """``n`` consecutive items: those that loaded, their stacked inputs, and the failures."""

    items: list  # the items that loaded, in order
    inputs: torch.Tensor | None  # (len(items), ...) stacked; None when no item loaded
    failures: list = field(default_factory=list)  # (item, record) of the items that did not load
    n: int = 0  # items covered (loaded + failed)


def _assemble(items: Sequence, results) -> StreamBatch:
    ok, xs, failures = [], [], []
    for item, (x, err) in zip(items, results):
        if err is None:
            ok.append(item)
            xs.append(x)
        else:
            failures.append((item, err))
    return StreamBatch(ok, torch.stack(xs) if xs else None, failures, len(items))


class _Batches(torch.utils.data.Dataset):
    """Items as a map-style dataset for DataLoader worker processes (each item: one whole batch)."""

    def __init__(self, items: Sequence, load: Load, batch_size: int):
        self.items, self.load, self.batch_size = list(items), load, batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, k: int) -> StreamBatch:
        chunk = self.items[k * self.batch_size:(k + 1) * self.batch_size]
        return _assemble(chunk, [self.load(i) for i in chunk])


def _loader_init(worker_id: int) -> None:
    # Loaders should use the cycles the forward leaves idle rather than preempt its intra-op
    # threads (one descheduled thread stalls the whole parallel region).
    if LOADER_NICE and hasattr(os, "nice"):
        try:
            os.nice(LOADER_NICE)
        except OSError:
            pass


def stream_batches(items: Sequence, load: Load, batch_size: int, workers: int = 0, loader: str = "thread",
                   prefetch: int = 2) -> Iterator[StreamBatch]:
    """``items`` in order, ``batch_size`` per :class:`StreamBatch`, loaded by ``load`` ahead of use.

    Raises ``ValueError`` for an unknown ``loader`` (callers name their own option in the message).
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    items = list(items)
    starts = range(0, len(items), batch_size)
    if workers <= 0:
        for s in starts:
            chunk = items[s:s + batch_size]
            yield _assemble(chunk, [load(i) for i in chunk])
        return
    if loader == "process":
        yield from torch.utils.data.DataLoader(_Batches(items, load, batch_size), batch_size=None, shuffle=False,
                                               num_workers=workers, prefetch_factor=prefetch,
                                               worker_init_fn=_loader_init)
        return
    ahead = max(1, prefetch) * batch_size  # items submitted and not yet handed out (>= a batch)
    pending: deque = deque()
    nxt = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="radgen-load") as pool:

        def refill() -> None:
            nonlocal nxt
            while nxt < len(items) and len(pending) < ahead:
                pending.append(pool.submit(load, items[nxt]))
                nxt += 1

        try:
            refill()
            for s in starts:
                chunk = items[s:s + batch_size]
                results = [pending.popleft().result() for _ in chunk]
                refill()  # before handing the batch out, so loading overlaps the caller's forward
                yield _assemble(chunk, results)
        finally:
            for f in pending:
                f.cancel()
