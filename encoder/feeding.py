"""Feeding the pretraining loop: a resumable data order and per-sample crop generators.

Every random draw is derived from ``(seed, data epoch, index)`` or ``(seed, micro-batch, rank)``,
so the crops and iBOT masks of any step are the same whether the run started there, resumed
there, or computed them in a DataLoader worker.
"""

from __future__ import annotations

import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from encoder.augment import MultiCrop, collate_multicrop

__all__ = ["ResumableSampler", "CropDataset", "CollateMultiCrop", "build_loader", "mix_seed"]


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from several integers (SplitMix-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for v in ints:
        x ^= (int(v) + 0x9E3779B97F4A7C15 + ((x << 6) & (2**64 - 1)) + (x >> 2)) & (2**64 - 1)
        x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return x & (2**63 - 1)


class ResumableSampler(Sampler):
    """Infinite stream of ``(data_epoch, index, k)`` for one rank, starting at micro-batch ``start``.

    Each data epoch is a seeded permutation; global micro-batch ``k`` is the permutation's
    ``k``-th chunk of ``batch * world`` indices, of which rank ``r`` takes the ``r``-th part.
    ``k`` travels with each sample so collation in a worker can seed the batch's masks.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch ({batch * world})")

    def __iter__(self):
        k = self.start
        while True:
            epoch, j = divmod(k, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))
            lo = (j * self.world + self.rank) * self.batch
            for idx in perm[lo:lo + self.batch].tolist():
                yield (epoch, idx, k)
            k += 1

    def __len__(self) -> int:  # not meaningful for an infinite stream; DataLoader needs none
        return sys.maxsize


class CropDataset(Dataset):
    def __init__(self, images: Dataset, multicrop: MultiCrop, seed: int):
        self.images, self.multicrop, self.seed = images, multicrop, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, idx, k = key
        g = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch, idx))
        return {**self.multicrop(self.images[idx], g), "micro_batch": k}


class CollateMultiCrop:
    """The DataLoader's ``collate_fn``: stacks the crops and draws micro-batch ``k``'s iBOT masks
    from a generator seeded by ``(seed, k, rank)``, so it runs in the workers with the same
    result as in the main process."""

    def __init__(self, grid: tuple[int, int], mask_cfg: dict | None, seed: int, rank: int):
        self.grid, self.mask_cfg, self.seed, self.rank = grid, mask_cfg, seed, rank

    def __call__(self, samples: list[dict]) -> dict:
        k = samples[0]["micro_batch"]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 3, k, self.rank))
        return collate_multicrop(samples, self.grid, self.mask_cfg, gen)


def build_loader(images: Dataset, multicrop: MultiCrop, sampler: ResumableSampler, collate: CollateMultiCrop,
                 batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Crops and collation in ``num_workers`` processes (kept alive across epochs); batches land in
    pinned memory on CUDA, so the copy to the GPU (``non_blocking``) overlaps the step."""
    return DataLoader(CropDataset(images, multicrop, sampler.seed), batch_size=batch_size, sampler=sampler,
                      collate_fn=collate, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0,
                      worker_init_fn=_worker_ignores_stop_signals if num_workers > 0 else None)


def _worker_ignores_stop_signals(_: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which finishes the step and
    checkpoints: a signal to the whole process group would otherwise kill them first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
