"""Figures for probe results, drawn from in-memory rows (no file reading, no ``radgen`` import).

Rows are ``ProbeScore.to_dict()`` plus ``model`` and ``kind`` (``encoder`` | ``random`` | ``pixels``).
Every figure uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state), is
written atomically as one PNG and its path returned. Colours follow the model kind: pretrained
encoders a strong colour each, random inits grey shades, raw pixels orange; pass the same
``colors`` mapping (see :func:`model_colors`) to every figure to pin them across figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke
from matplotlib.ticker import NullFormatter, NullLocator

from eval.figures import save_png

__all__ = [
    "CSV_COLUMNS",
    "model_colors",
    "plot_metric_bars",
    "plot_age_scatter",
    "plot_scaling",
    "plot_segmentation_examples",
    "write_rows_csv",
]

DPI = 110
CSV_COLUMNS = ["model", "kind", "probe", "target", "metric", "value", "low", "high",
               "n_train", "n_test", "n_pos", "note", "extra"]
METRIC_LABELS = {"auroc": "AUROC", "ap": "average precision", "dice": "Dice", "iou": "IoU",
                 "mae": "MAE (years)", "r2": "R²"}
_BOUNDED = {"auroc", "ap", "dice", "iou"}  # metrics in [0, 1]
_STRONG = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_GREYS = ["#7f7f7f", "#a6a6a6", "#4d4d4d", "#c7c7c7", "#333333"]
_PIXELS = ["#ff7f0e", "#ffbb78", "#cc5500"]


# --------------------------------------------------------------------------------------- helpers
def guess_kind(name: str) -> str:
    """Kind from a model/series name when none is given: ``random``, ``pixels`` or ``encoder``."""
    low = name.lower()
    if "random" in low:
        return "random"
    if "pixel" in low:
        return "pixels"
    return "encoder"


def model_colors(models: Iterable[Mapping | tuple[str, str] | str]) -> dict[str, str]:
    """Colour per model, in first-seen order within each kind.

    ``models`` may be rows (dicts with ``model``/``kind``), ``(name, kind)`` pairs or bare names
    (kind guessed from the name).
    """
    out: dict[str, str] = {}
    seen = {"encoder": 0, "random": 0, "pixels": 0}
    for m in models:
        if isinstance(m, Mapping):
            name, kind = str(m["model"]), str(m.get("kind") or guess_kind(str(m["model"])))
        elif isinstance(m, tuple):
            name, kind = m
        else:
            name, kind = str(m), guess_kind(str(m))
        if name in out:
            continue
        kind = kind if kind in seen else "encoder"
        palette = {"encoder": _STRONG, "random": _GREYS, "pixels": _PIXELS}[kind]
        out[name] = palette[seen[kind] % len(palette)]
        seen[kind] += 1
    return out


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return save_png(fig, path, dpi=DPI)


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _empty(fig: Figure, ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_axis_off()


def _err(value: float, low, high) -> tuple[float, float] | None:
    """Asymmetric error-bar lengths, or None when the CI is missing."""
    if not (_finite(low) and _finite(high)):
        return None
    return max(value - float(low), 0.0), max(float(high) - value, 0.0)


# ------------------------------------------------------------------------------------------ bars
def plot_metric_bars(
    rows: Sequence[Mapping],
    path: str | os.PathLike,
    probe: str = "logistic",
    metric: str = "auroc",
    title: str | None = None,
    ref_line: float | None = 0.5,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Grouped horizontal bars: a group per target (``macro`` last), a bar per model, CI whiskers.

    Rows with ``value`` None (probe not fitted) get an ``n/a`` mark instead of a bar.
    """
    rows = [r for r in rows if r.get("probe") == probe and r.get("metric") == metric]
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    if "macro" in targets:
        targets = [t for t in targets if t != "macro"] + ["macro"]
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    colors = {**model_colors(rows), **(colors or {})}
    by_key = {(str(r["model"]), str(r["target"])): r for r in rows}
    label = METRIC_LABELS.get(metric, metric)

    n_t, n_m = len(targets), len(models)
    fig = Figure(figsize=(8.5, max(3.0, 1.2 + n_t * (0.22 * n_m + 0.3))))
    ax = fig.add_subplot()
    if not rows:
        _empty(fig, ax, f"no {probe} / {label} results")
        return _save(fig, path)

    height = 0.8 / n_m
    for j, model in enumerate(models):
        ys, xs, errs, na = [], [], [], []
        for i, target in enumerate(targets):
            r = by_key.get((model, target))
            if r is None:
                continue
            y = i - 0.4 + height * (j + 0.5)
            if not _finite(r.get("value")):
                na.append(y)
                continue
            v = float(r["value"])
            e = _err(v, r.get("low"), r.get("high")) or (0.0, 0.0)
            ys.append(y), xs.append(v), errs.append(e)
        ax.barh(ys, xs, height=height * 0.92, color=colors[model], label=model,
                xerr=np.array(errs).T if errs else None,
                error_kw={"ecolor": "black", "elinewidth": 0.9, "capsize": 2.5})
        for y in na:
            ax.text(0.01, y, "n/a", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=7, color=colors[model], style="italic")

    ax.set_yticks(range(n_t), targets)
    for tick in ax.get_yticklabels():
        if tick.get_text() == "macro":
            tick.set_fontweight("bold")
    if targets[-1] == "macro" and n_t > 1:
        ax.axhline(n_t - 1.5, color="0.6", lw=0.8)
    ax.set_ylim(n_t - 0.5, -0.5)  # first target on top
    if metric in _BOUNDED:
        ax.set_xlim(0.0, 1.0)
    if ref_line is not None:
        ax.axvline(ref_line, color="0.3", ls="--", lw=1.0, label=f"reference {ref_line:g}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_xlabel(label)
    ax.set_ylabel("target")
    ax.set_title(title or f"{probe} probe: {label} per target (95% CI)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- age
def plot_age_scatter(
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """True (x) vs predicted (y) age, a subplot per model (4 per row), MAE and R² in each title."""
    names = list(predictions)
    colors = {**model_colors(names), **(colors or {})}
    ncols = max(1, min(4, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(3.4 * ncols, 3.4 * nrows + 0.4))
    if not names:
        _empty(fig, fig.add_subplot(), "no age predictions")
        return _save(fig, path)

    pairs = {}
    for name in names:
        t, p = (np.asarray(a, dtype=float).ravel() for a in predictions[name])
        ok = np.isfinite(t) & np.isfinite(p)
        pairs[name] = (t[ok], p[ok])
    allv = np.concatenate([np.concatenate(tp) for tp in pairs.values()] + [np.zeros(0)])
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 100.0)
    pad = 0.05 * (hi - lo or 1.0)
    lim = (lo - pad, hi + pad)

    for k, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        t, p = pairs[name]
        ax.plot(lim, lim, ls="--", color="0.4", lw=1.0, label="identity")
        ax.scatter(t, p, s=9, alpha=0.6, color=colors[name], edgecolors="none")
        if t.size:
            mae = float(np.mean(np.abs(p - t)))
            ss_tot = float(np.sum((t - t.mean()) ** 2))
            r2 = 1.0 - float(np.sum((p - t) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
            ax.set_title(f"{name}\nMAE {mae:.1f} y, R² {r2:.2f} (n={t.size})", fontsize=9)
        else:
            ax.set_title(f"{name}\nno finite predictions", fontsize=9)
        ax.set_xlim(lim), ax.set_ylim(lim)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
        if k == 0:
            ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.suptitle(title or "Age regression (ridge probe): predicted vs true")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------- scaling
def _count_labels(ns: Sequence[int]) -> list[str]:
    """Image counts as tick labels, one format for all: ``1k 4k 16k`` when that is exact."""
    if all(n >= 1000 and n % 100 == 0 for n in ns):
        return [f"{n / 1e6:g}M" if n >= 1_000_000 and n % 100_000 == 0 else f"{n / 1e3:g}k" for n in ns]
    return [f"{n:,}" for n in ns]


def plot_scaling(
    points: Sequence[Mapping],
    path: str | os.PathLike,
    metric_label: str = "macro AUROC",
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """A line per ``series`` over ``n_images`` with markers and CI error bars (log x if >= 4x).

    A series with a single point among several image counts (a baseline) is a flat dotted line.
    """
    pts = [p for p in points if _finite(p.get("value"))]
    series = list(dict.fromkeys(str(p["series"]) for p in pts))
    colors = {**model_colors(series), **(colors or {})}
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    if not pts:
        _empty(fig, ax, "no scaling points")
        return _save(fig, path)

    ns = sorted({int(p["n_images"]) for p in pts})
    for s in series:
        sp = sorted((p for p in pts if str(p["series"]) == s), key=lambda p: p["n_images"])
        x = np.array([p["n_images"] for p in sp], dtype=float)
        y = np.array([float(p["value"]) for p in sp])
        errs = [_err(float(p["value"]), p.get("low"), p.get("high")) or (np.nan, np.nan) for p in sp]
        yerr = np.nan_to_num(np.array(errs, dtype=float).T, nan=0.0)
        if len(sp) == 1 and len(ns) > 1:  # a baseline measured once (e.g. random init): flat line
            ax.axhline(y[0], color=colors[s], ls=":", lw=1.6, label=s)
            if _finite(sp[0].get("low")) and _finite(sp[0].get("high")):
                ax.axhspan(float(sp[0]["low"]), float(sp[0]["high"]), color=colors[s], alpha=0.15, lw=0)
        ls = "--" if guess_kind(s) != "encoder" else "-"
        ax.errorbar(x, y, yerr=yerr, color=colors[s], marker="o", ms=5, ls=ls, lw=1.6,
                    capsize=3, elinewidth=1.0, label=None if len(sp) == 1 and len(ns) > 1 else s)

    if ns[0] > 0 and ns[-1] / ns[0] >= 4:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(ns[0] / 1.4, ns[-1] * 1.4)
    ax.set_xticks(ns, _count_labels(ns))
    ax.grid(alpha=0.3)
    ax.set_xlabel("pretraining images")
    ax.set_ylabel(metric_label)
    ax.set_title(title or f"{metric_label} vs pretraining images (95% CI)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------- segmentation
def plot_segmentation_examples(
    images: np.ndarray,
    true: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    names: Mapping[int, str] | None = None,
    max_images: int = 8,
) -> Path:
    """Grid of images (rows, at most ``max_images``) x models (columns): true outlines solid
    green, predicted outlines dashed red, structure names marked in the first row."""
    images = np.asarray(images, dtype=float)
    true = np.asarray(true)
    if images.ndim == 2:
        images, true = images[None], true[None]
        predicted = {k: np.asarray(v)[None] for k, v in predicted.items()}
    if images.shape != true.shape:
        raise ValueError(f"images {images.shape} and true {true.shape} differ")
    for k, v in predicted.items():
        if np.shape(v) != images.shape:
            raise ValueError(f"predicted[{k!r}] has shape {np.shape(v)}, expected {images.shape}")
    k_img = min(len(images), max_images)
    models = list(predicted) or ["ground truth"]
    labels = sorted(int(v) for v in np.unique(true[:k_img]) if v > 0)
    names = dict(names or {})

    ncols, nrows = len(models), max(k_img, 1)
    fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows + 0.7))
    for i in range(k_img):
        for j, model in enumerate(models):
            ax = fig.add_subplot(nrows, ncols, i * ncols + j + 1)
            ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            pred = np.asarray(predicted[model])[i] if model in predicted else None
            for lab in labels:
                for mask, color, ls in ((true[i] == lab, "lime", "solid"),
                                        (None if pred is None else pred == lab, "red", "dashed")):
                    if mask is not None and 0 < mask.sum() < mask.size:
                        ax.contour(mask.astype(float), levels=[0.5], colors=color,
                                   linestyles=ls, linewidths=1.2)
                if i == 0 and (true[i] == lab).any():
                    yy, xx = np.nonzero(true[i] == lab)
                    ax.text(xx.mean(), yy.mean(), names.get(lab, str(lab)), color="yellow",
                            fontsize=7, ha="center", va="center",
                            path_effects=[withStroke(linewidth=2, foreground="black")])
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(model, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"image {i + 1}", fontsize=9)
    handles = [Line2D([], [], color="lime", lw=1.5, ls="solid", label="true outline"),
               Line2D([], [], color="red", lw=1.5, ls="dashed", label="predicted outline")]
    struct = ", ".join(f"{lab}={names.get(lab, lab)}" for lab in labels)
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False,
               bbox_to_anchor=(0.5, 1.0), title=f"structures: {struct}" if struct else None)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (2.6 * nrows + 0.7)))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- csv
def _cell(v) -> str:
    return "" if v is None else str(v)


def write_rows_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write rows as CSV (:data:`CSV_COLUMNS`; ``None`` as empty, ``extra`` as JSON), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in rows:
                cells = [_cell(r.get(c)) for c in CSV_COLUMNS[:-1]]
                cells.append(json.dumps(r.get("extra") or {}, sort_keys=True, default=str))
                w.writerow(cells)

    return _atomic_write(path, write)
