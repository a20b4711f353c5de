"""Raw-pixel baseline: logistic regression on downsampled pixels, per finding and for sex.

On real radiographs raw pixels are a weak baseline; on a synthetic set they show how much of a
label can be read off pixel positions. Learned encoders must beat this to mean anything.
"""

from __future__ import annotations

import os

import numpy as np

from eval.chexpert.observations import CHEXPERT_14
from eval.probes.classify import binary_labels
from eval.probes.linear import ProbeResult, logistic_probe
from radgen.data.images import pixel_features
from radgen.data.manifest import read_manifest

__all__ = ["binary_targets", "pixel_baseline", "format_probe_table"]


def binary_targets(ds) -> dict[str, np.ndarray]:
    """Binary targets: each observation (1 = positive, uncertain rows dropped later) and sex."""
    t = {k: binary_labels(ds[k], "ignore") for k in CHEXPERT_14}
    t["sex (F)"] = np.array([np.nan if s is None else float(s == "F") for s in ds["sex"]])
    return t


def pixel_baseline(manifest: str | os.PathLike, size: int = 32, min_pos: int = 5,
                   n_resamples: int = 1000, seed: int = 0, progress: bool = True) -> list[ProbeResult]:
    """Train on the ``train`` split, test on ``validate`` + ``test``; one AUROC per target."""
    ds = read_manifest(manifest)
    split = np.array(ds["split"])
    if not (split == "train").any() or not np.isin(split, ["validate", "test"]).any():
        raise ValueError(f"{manifest}: needs rows in split 'train' and in 'validate'/'test'")
    x = pixel_features([imgs[0] for imgs in ds["images"]], size=size, progress=progress)
    tr, te = split == "train", np.isin(split, ["validate", "test"])
    results = []
    for name, y in binary_targets(ds).items():
        ok = ~np.isnan(y)
        ytr, yte = y[tr & ok], y[te & ok]
        if min(ytr.sum(), (1 - ytr).sum(), yte.sum(), (1 - yte).sum()) < min_pos:
            continue
        results.append(logistic_probe(name, x[tr & ok], ytr, x[te & ok], yte,
                                      n_resamples=n_resamples, seed=seed))
    return results


def format_probe_table(results: list[ProbeResult], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'target':28s} {'AUROC':>6s}  {'95% CI':>15s}  {'n_train':>7s} {'n_test':>6s} {'pos':>4s}")
    for r in results:
        lines.append(f"{r.target:28s} {r.auroc:6.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]  "
                     f"{r.n_train:7d} {r.n_test:6d} {r.n_test_pos:4d}")
    return "\n".join(lines)
