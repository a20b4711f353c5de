"""``radgen synth-check``: how realistic is a synthetic set? Phantoms vs real films on image statistics.

Loads the phantoms of a synthetic set (``manifest.jsonl`` order) and every image of a folder of
real radiographs, computes :func:`radgen.data.synth.realism.image_statistics` for each and fits
phantom-vs-real classifiers on them (see :mod:`radgen.data.synth.realism`). Writes
``realism.json``, ``realism.md`` and ``grid.png`` (8 phantoms above 8 real films).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from encoder.io import atomic_write_bytes, atomic_write_text
from radgen.config import ConfigError
from radgen.data.images import ImageLoadError, load_image
from radgen.data.manifest import image_folder_dataset, read_manifest
from radgen.data.synth.realism import (RealismReport, image_statistics, normalise,
                                       realism_report_from_statistics, side_by_side_grid)

__all__ = ["SynthCheckError", "run_synth_check", "grid_phantoms"]

GRID_COLS = 8


class SynthCheckError(ConfigError):
    """A folder that cannot be checked (no manifest, no images, too few images)."""


def grid_phantoms(no_finding: list, k: int = GRID_COLS) -> list[int]:
    """Indices of ``k`` phantoms for the grid: alternately with findings (``No Finding`` != 1)
    and without, in manifest order; one kind fills in when the other runs out."""
    pos = [i for i, v in enumerate(no_finding) if v != 1]
    neg = [i for i, v in enumerate(no_finding) if v == 1]
    order = [i for pair in zip(pos, neg) for i in pair]
    short = min(len(pos), len(neg))
    return (order + pos[short:] + neg[short:])[:k]


def _statistics(paths: list[str], keep: set[int], desc: str, progress: bool, root: Path):
    """Statistics of every loadable image, the normalised images of ``keep`` and the skip records."""
    stats, kept, skipped = [], {}, []
    for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress)):
        try:
            img, _ = load_image(p)
        except ImageLoadError as exc:
            skipped.append({"file": os.path.relpath(p, root), "error": exc.code, "reason": exc.reason})
            continue
        x = normalise(img)
        stats.append(image_statistics(x, normalised=True))
        if i in keep:
            kept[i] = x
    return stats, kept, skipped


def run_synth_check(synth_dir: str | os.PathLike, real_dir: str | os.PathLike,
                    out: str | os.PathLike | None = None, n: int | None = None, seed: int = 0,
                    n_resamples: int = 1000, progress: bool = True) -> RealismReport:
    """Compare the first ``n`` phantoms of ``synth_dir`` (default: as many as there are real
    images) with every image under ``real_dir``; write the report and grid to ``out``
    (default ``synth_dir/realism``)."""
    synth_dir, real_dir = Path(synth_dir), Path(real_dir)
    out = Path(out) if out is not None else synth_dir / "realism"
    if not synth_dir.is_dir():
        raise SynthCheckError(f"synthetic set folder {synth_dir} does not exist")
    if not (synth_dir / "manifest.jsonl").is_file():
        raise SynthCheckError(f"{synth_dir} has no manifest.jsonl (not a synthetic set; "
                              f"write one with 'radgen synth --out {synth_dir}')")
    if not real_dir.is_dir():
        raise SynthCheckError(f"real image folder {real_dir} does not exist")
    if n is not None and n < 2:
        raise SynthCheckError(f"n must be >= 2, got {n}")
    try:
        real_paths = [imgs[0] for imgs in image_folder_dataset(real_dir)["images"]]
    except ValueError:
        raise SynthCheckError(f"no image files under {real_dir}") from None
    rng = np.random.default_rng(seed)
    real_keep = set(rng.permutation(len(real_paths))[:2 * GRID_COLS].tolist())  # spares for failed loads
    real, real_imgs, skipped = _statistics(real_paths, real_keep, "real", progress, real_dir)
    if len(real) < 2:
        raise SynthCheckError(f"fewer than 2 loadable images under {real_dir}")

    ds = read_manifest(synth_dir / "manifest.jsonl")
    n = min(len(ds), n if n is not None else len(real))
    ds = ds.select(range(n))
    phantom_paths = [imgs[0] for imgs in ds["images"]]
    preferred = grid_phantoms(ds["No Finding"], 2 * GRID_COLS)
    phantom, phantom_imgs, skipped_p = _statistics(phantom_paths, set(preferred), "phantoms", progress, synth_dir)
    if len(phantom) < 2:
        raise SynthCheckError(f"fewer than 2 loadable phantoms in {synth_dir}")

    report = realism_report_from_statistics(real, phantom, seed=seed, n_resamples=n_resamples)
    report.skipped = skipped + skipped_p
    report.sources = {"synth_dir": str(synth_dir), "real_dir": str(real_dir), "out": str(out)}
    # the grid: preferred phantoms that loaded (with / without findings alternating), then real films
    grid_p = [phantom_imgs[i] for i in preferred if i in phantom_imgs][:GRID_COLS]
    grid_r = [real_imgs[i] for i in sorted(real_imgs)][:GRID_COLS]
    grid = side_by_side_grid(grid_p, grid_r, size=128, cols=GRID_COLS)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(out / "grid.png", buf.getvalue())
    atomic_write_text(out / "realism.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(out / "realism.md", report.format() + "\n")
    return report
