"""How far synthetic phantoms are from real films, on image statistics that tell drawings from films.

Every image gets the usual normalisation (:func:`normalise`) and four families of statistics
(:func:`image_statistics`): the intensity histogram, the radially averaged power spectrum, the
gradient-magnitude distribution and local contrast. A logistic regression then tries to tell
phantoms from real radiographs on them (:func:`realism_auroc`): out-of-fold AUROC 0.5 means
indistinguishable on these statistics, 1.0 trivially separated. Arrays in, numbers out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from eval.stats import bootstrap_ci

__all__ = ["FAMILIES", "KEY_STATISTICS", "normalise", "image_statistics", "realism_auroc",
           "RealismReport", "realism_report", "realism_report_from_statistics", "side_by_side_grid"]

FAMILIES = ("hist", "spectrum", "grad", "contrast")
HIST_BINS = 16
SPECTRUM_BAND = (4.0, 0.25)  # fit from 4 cycles per image to size/4
FLAT_GRADIENT = 0.002        # |gradient| below this (intensity per pixel, at 256 px) counts as flat
GRAD_QUANTILES = (0.1, 0.5, 0.9, 0.99)
CONTRAST_BLOCKS = (8, 32)
CONTRAST_QUANTILES = (0.1, 0.5, 0.9)
KEY_STATISTICS = {  # the second table of RealismReport.format()
    "spectrum_slope": "spectrum slope (log power vs log frequency)",
    "grad_flat": f"flat-gradient fraction (gradient < {FLAT_GRADIENT})",
    "contrast_b8_q50": "median local contrast 8x8 (block std)",
    "hist_std": "hist std",
}


def normalise(img: np.ndarray, size: int = 256) -> np.ndarray:
    """(H, W) float in [0, 1] -> (size, size) float32: antialiased bilinear resize, then the 1st
    and 99th percentiles stretched to 0 and 1 and clipped (a constant image gives zeros)."""
    im = Image.fromarray(np.asarray(img, np.float32))  # mode "F"
    x = np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)
    lo, hi = np.percentile(x, [1, 99])
    if hi - lo < 1e-6:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _radial_spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power of a (n, n) image (mean removed, Hann window): (freq, power)
    per integer radius in cycles per image, radius 1 .. n/2."""
    n = x.shape[0]
    w = np.outer(np.hanning(n), np.hanning(n))
    f = np.fft.fft2((x - x.mean()) * w)
    power = (np.abs(f) ** 2 / (w ** 2).sum()).ravel()
    k = np.fft.fftfreq(n, 1.0 / n)
    r = np.rint(np.hypot(k[:, None], k[None, :])).astype(int).ravel()
    radii = np.arange(1, n // 2 + 1)
    sums = np.bincount(r, weights=power, minlength=n)[radii]
    counts = np.bincount(r, minlength=n)[radii]
    return radii.astype(float), sums / counts


def image_statistics(img: np.ndarray, size: int = 256, normalised: bool = False) -> dict[str, float]:
    """Statistics of one (H, W) image in [0, 1] after :func:`normalise` (skipped when
    ``normalised``), names prefixed by family: ``hist_*``, ``spectrum_*``, ``grad_*``, ``contrast_*``."""
    x = np.asarray(img, np.float32) if normalised else normalise(img, size)
    n = x.shape[0]
    out: dict[str, float] = {}

    hist, _ = np.histogram(x, bins=HIST_BINS, range=(0.0, 1.0))
    out.update({f"hist_bin{i:02d}": float(h) for i, h in enumerate(hist / x.size)})
    mean, std = float(x.mean()), float(x.std())
    out.update(hist_mean=mean, hist_std=std,
               hist_skew=float(((x - mean) ** 3).mean() / std ** 3) if std > 1e-8 else 0.0)

    freq, power = _radial_spectrum(x)
    band = (freq >= SPECTRUM_BAND[0]) & (freq <= SPECTRUM_BAND[1] * n)
    lf, lp = np.log10(freq[band]), np.log10(power[band] + 1e-20)
    slope, intercept = np.polyfit(lf, lp, 1)
    resid = lp - (slope * lf + intercept)
    out.update(spectrum_slope=float(slope), spectrum_intercept=float(intercept),
               spectrum_residual=float(np.sqrt((resid ** 2).mean())))

    gy, gx = np.gradient(x)
    g = np.hypot(gx, gy) * (n / 256.0)  # per pixel at 256 px, so FLAT_GRADIENT means one thing
    for q, v in zip(GRAD_QUANTILES, np.quantile(g, GRAD_QUANTILES)):
        out[f"grad_q{round(q * 100):02d}"] = float(v)
    out.update(grad_flat=float((g < FLAT_GRADIENT).mean()), grad_mean=float(g.mean()))

    for b in CONTRAST_BLOCKS:
        m = n // b * b
        blocks = x[:m, :m].reshape(m // b, b, m // b, b).std(axis=(1, 3))
        for q, v in zip(CONTRAST_QUANTILES, np.quantile(blocks, CONTRAST_QUANTILES)):
            out[f"contrast_b{b}_q{round(q * 100):02d}"] = float(v)
    return out


def realism_auroc(real: np.ndarray, fake: np.ndarray, seed: int = 0,
                  n_resamples: int = 1000) -> tuple[float, float, float]:
    """``(point, low, high)``: AUROC of phantom (positive) vs real from out-of-fold decision scores
    of a standardised logistic regression (stratified, shuffled, k = min(5, rows per side) folds),
    95% bootstrap CI.
    ``real`` (n_real, F), ``fake`` (n_fake, F); needs at least 2 rows of each."""
    real, fake = np.asarray(real, float), np.asarray(fake, float)
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"realism_auroc: needs >= 2 images per side, got {len(real)} real, {len(fake)} phantom")
    x = np.vstack([real, fake])
    y = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    model = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(C=1.0, max_iter=2000))])
    folds = StratifiedKFold(n_splits=min(5, len(real), len(fake)), shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=folds, method="decision_function")
    return bootstrap_ci(roc_auc_score, y, scores, n_resamples=n_resamples, seed=seed)


@dataclass
class RealismReport:
    n_real: int
    n_phantom: int
    auroc: tuple[float, float, float]                  # all statistics: (point, low, high)
    family_auroc: dict[str, tuple[float, float, float]]  # family -> (point, low, high)
    means: dict[str, dict[str, dict[str, float]]]      # family -> statistic -> {"real", "phantom"}
    skipped: list[dict] = field(default_factory=list)  # files that did not load: file, error, reason
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def ci(a: tuple[float, float, float]) -> str:
            return f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]"

        n_stats = {f: len(s) for f, s in self.means.items()}
        lines = [f"realism: {self.n_phantom} phantoms vs {self.n_real} real radiographs — AUROC of "
                 f"phantom vs real (logistic regression, k-fold out-of-fold with k = min(5, n per side), 95% bootstrap CI); "
                 f"0.5 = indistinguishable on these statistics, 1.0 = trivially separated",
                 "", "| statistics | n | AUROC [95% CI] |", "|---|---:|---|",
                 f"| all statistics | {sum(n_stats.values())} | {ci(self.auroc)} |"]
        lines += [f"| {f} | {n_stats[f]} | {ci(a)} |" for f, a in self.family_auroc.items()]
        lines += ["", "| statistic | real mean | phantom mean |", "|---|---:|---:|"]
        for key, label in KEY_STATISTICS.items():
            m = self.means[_family(key)][key]
            lines.append(f"| {label} | {m['real']:.4g} | {m['phantom']:.4g} |")
        if self.skipped:
            lines += ["", f"skipped {len(self.skipped)} file(s) that did not load: "
                      + ", ".join(f"{s['file']} ({s['reason']})" for s in self.skipped[:5])
                      + (" ..." if len(self.skipped) > 5 else "")]
        return "\n".join(lines)


def _family(name: str) -> str:
    return name.split("_")[0]


def realism_report_from_statistics(real: list[dict[str, float]], phantom: list[dict[str, float]],
                                   seed: int = 0, n_resamples: int = 1000) -> RealismReport:
    """The report from per-image :func:`image_statistics` dicts (same keys in every dict)."""
    names = list(real[0])
    xr = np.array([[s[k] for k in names] for s in real])
    xp = np.array([[s[k] for k in names] for s in phantom])
    fam = np.array([_family(k) for k in names])
    means: dict[str, dict[str, dict[str, float]]] = {f: {} for f in FAMILIES}
    for j, k in enumerate(names):
        means[fam[j]][k] = {"real": float(xr[:, j].mean()), "phantom": float(xp[:, j].mean())}
    return RealismReport(
        n_real=len(real), n_phantom=len(phantom),
        auroc=realism_auroc(xr, xp, seed=seed, n_resamples=n_resamples),
        family_auroc={f: realism_auroc(xr[:, fam == f], xp[:, fam == f], seed=seed, n_resamples=n_resamples)
                      for f in FAMILIES},
        means=means,
    )


def realism_report(real_images: list[np.ndarray], phantom_images: list[np.ndarray], seed: int = 0,
                   n_resamples: int = 1000) -> RealismReport:
    """Overall and per-family AUROC (with CI) and per-statistic means; images (H, W) in [0, 1]."""
    return realism_report_from_statistics([image_statistics(i) for i in real_images],
                                          [image_statistics(i) for i in phantom_images],
                                          seed=seed, n_resamples=n_resamples)


def side_by_side_grid(phantoms: list[np.ndarray], real: list[np.ndarray], size: int = 128,
                      cols: int = 8, gap: int = 2) -> np.ndarray:
    """(rows * (size + gap) + gap, cols * (size + gap) + gap) uint8: phantoms fill the first
    row(s), real films the next, each normalised to size x size; dark gaps and empty cells."""
    def rows_of(imgs: list) -> list[list]:
        return [imgs[i:i + cols] for i in range(0, len(imgs), cols)]

    rows = rows_of(list(phantoms)) + rows_of(list(real))
    grid = np.zeros((len(rows) * (size + gap) + gap, cols * (size + gap) + gap), np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = gap + r * (size + gap), gap + c * (size + gap)
            grid[y:y + size, x:x + size] = np.round(normalise(img, size) * 255.0).astype(np.uint8)
    return grid
