"""The order in which training examples are seen: one epoch's global batches (pure functions).

Two orders, both a function of ``(seed, epoch)`` only, so a run killed and resumed sees exactly
the batches it would have seen:

* **shuffled** (``lengths=None``): a seeded permutation cut into global batches in order; the last
  batch of an epoch is topped up from the start of the permutation (so every step has a full
  batch);
* **grouped by length** (``lengths`` given): the permutation is cut into windows of
  ``window`` global batches; each window is sorted by example length (longest first, ties in
  permutation order) and cut into batches; then the order of all batches of the epoch is shuffled.
  Every example appears exactly once per epoch (the epoch's last batch may be short), and rows of
  one batch have similar lengths, so right-padding wastes few positions. This is the
  "group by length" of the transformers Trainer, with the window playing its mega-batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["epoch_batches", "padding_fraction"]


def epoch_batches(n: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None,
                  window: int = 64, min_size: int = 1) -> list[list[int]]:
    """The global batches (lists of indices into ``0..n-1``) of one epoch, for the epoch ``seed``.

    Shuffled: ``ceil(n / global_batch)`` batches of exactly ``global_batch`` indices. Grouped by
    length: the same number of batches, holding every index exactly once, except that a short
    batch of fewer than ``min_size`` indices (pass the number of ranks, so that none gets an empty
    share) is topped up to ``min_size`` from the start of the permutation.
    """
    if n < 1 or global_batch < 1:
        raise ValueError(f"need n >= 1 and global_batch >= 1, got {n}, {global_batch}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        batches = [perm[s:s + global_batch] for s in range(0, n, global_batch)]
        if len(batches[-1]) < global_batch:
            batches[-1] = batches[-1] + perm[: global_batch - len(batches[-1])]
        return batches
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples")
    span = max(1, int(window)) * global_batch
    batches = []
    for s in range(0, n, span):
        chunk = sorted(perm[s:s + span], key=lambda i: -int(lengths[i]))  # stable: ties keep perm order
        batches += [chunk[k:k + global_batch] for k in range(0, len(chunk), global_batch)]
    for b in batches:
        if len(b) < min_size:  # at most one such batch: the epoch's last short one
            b += [i for i in perm if i not in b][: min_size - len(b)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def padding_fraction(batch_lengths: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each inner list (one micro-batch's row lengths) is padded to
    its longest row."""
    total = sum(max(b) * len(b) for b in batch_lengths if b)
    real = sum(sum(b) for b in batch_lengths)
    return 0.0 if total == 0 else 1.0 - real / total
