"""torch Datasets over radiograph files (the bridge from files to the tensor-only encoder)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from radgen.data.images import ImageLoadError, load_image

__all__ = ["ImageTensorDataset"]


class ImageTensorDataset(Dataset):
    """Items are float tensors (1, H, W) in [0, 1], the shortest edge resized to ``image_size``.

    A file that fails to load is reported once on stderr (path and reason, never patient data)
    and replaced by the next loadable image, so a long pretraining run does not die on one bad
    file; ``skipped`` keeps the error records, and with ``skip_log`` each is also appended to
    that JSONL file (data-loader workers are separate processes: the file is what they share;
    :func:`radgen.data.skips.read_skip_log` counts each path once).
    """

    def __init__(self, paths: list[str], image_size: int | None = None, cache: bool = False,
                 skip_log: str | os.PathLike | None = None):
        if not paths:
            raise ValueError("no images")
        self.paths = list(paths)
        self.image_size = image_size
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.skipped: dict[str, dict] = {}
        self.skip_log = Path(skip_log) if skip_log else None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> torch.Tensor:
        img, _ = load_image(self.paths[i])
        x = torch.from_numpy(np.ascontiguousarray(img))[None]  # (1, H, W)
        if self.image_size:
            h, w = x.shape[-2:]
            s = self.image_size / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return x.clamp_(0, 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            if self.cache is not None and j in self.cache:
                return self.cache[j]
            if self.paths[j] in self.skipped:
                continue
            try:
                x = self._load(j)
            except ImageLoadError as exc:
                self.skipped[self.paths[j]] = exc.record()
                print(f"warning: skipping {exc}", file=sys.stderr)
                if self.skip_log is not None:
                    self.skip_log.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.skip_log, "a", encoding="utf-8") as fh:  # one short O_APPEND write
                        fh.write(json.dumps(exc.record()) + "\n")
                continue
            if self.cache is not None:
                self.cache[j] = x
            return x
        raise RuntimeError("no loadable image in the dataset")
