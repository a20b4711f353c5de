"""The results page's figures: training curves of both loops and example thumbnails."""

from __future__ import annotations

import math
import os
from pathlib import Path

from radgen.report.discovery import as_number

__all__ = ["plot_pretrain", "plot_train", "thumbnail"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from eval.figures import save_png

    return save_png(fig, path, dpi=110)


def plot_pretrain(log: list[dict], path: Path, title: str) -> Path:
    """Losses (left) and the collapse monitors (right) of an encoder pretraining log."""
    plt = _plt()
    step = [as_number(r.get("step")) for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for k in ("loss", "dino", "ibot", "koleo"):
        ys = [as_number(r.get(k)) for r in log]
        if any(y is not None for y in ys):
            ax1.plot(step, [math.nan if y is None else y for y in ys], label=k, lw=1.2)
    ax1.set_xlabel("step")
    ax1.set_title("losses")
    ax1.legend(fontsize=8)
    for k, lab in (("teacher_entropy", "teacher entropy (per image, /log K)"),
                   ("teacher_batch_entropy", "teacher batch entropy"), ("cls_std", "CLS std")):
        ys = [as_number(r.get(k)) for r in log]
        if any(y is not None for y in ys):
            ax2.plot(step, [math.nan if y is None else y for y in ys], label=lab, lw=1.2)
    bad = [s for s, r in zip(step, log) if r.get("collapse") not in (None, "", "ok")]
    for s in bad:
        ax2.axvline(s, color="#d62728", alpha=0.15, lw=2)
    ax2.set_xlabel("step")
    ax2.set_title("collapse monitors" + (f" ({len(bad)} flagged steps shaded)" if bad else " (no step flagged)"))
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_train(log: list[dict], path: Path, title: str) -> Path:
    """Train loss per stage and validation loss of a report-generator log."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    offset, x_end = 0.0, {}
    stages = list(dict.fromkeys(r["stage"] for r in log))
    for st in stages:
        rows = [r for r in log if r["stage"] == st]
        tr = [(offset + as_number(r["step"]), as_number(r["loss"])) for r in rows if as_number(r.get("loss")) is not None]
        va = [(offset + as_number(r["step"]), as_number(r["val_loss"])) for r in rows if as_number(r.get("val_loss")) is not None]
        if tr:
            ax.plot(*zip(*tr), lw=1.2, label=f"{st} train")
        if va:
            ax.plot(*zip(*va), "o--", ms=4, label=f"{st} validation")
        total = max([as_number(r.get("total_steps")) or 0 for r in rows] + [t[0] - offset for t in tr] + [0])
        offset += total
        x_end[st] = offset
    for st, x in list(x_end.items())[:-1]:
        ax.axvline(x, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimiser step (stages back to back)")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def thumbnail(src: Path, dest: Path, side: int = 256) -> bool:
    from PIL import Image

    from radgen.data.images import load_image

    try:
        arr, _ = load_image(str(src))  # float32 in [0, 1]; DICOM through its LUTs
        img = Image.fromarray((arr * 255).round().astype("uint8"))
        img = img.convert("L")
        img.thumbnail((side, side))
        tmp = dest.with_name(dest.stem + ".tmp.png")
        img.save(tmp)
        os.replace(tmp, dest)
        return True
    except Exception:  # noqa: BLE001 - a bad image drops its example, never the page
        return False
