"""The ``probe`` job: how good are an encoder's frozen features? The RAD-DINO protocol, one run.

``run_probes(data, {"pretrained": "runs/x/checkpoint.pt", "random-0": "random-like:...:0", ...},
image_size)`` extracts features of every row of a manifest with each encoder (cached per encoder
under ``cache_dir/<name>``, keyed by weights + data + settings) and runs, per encoder and on raw
pixels, the probes of :mod:`eval.probes`:

* ``logistic``: per finding and ``sex (F)``, L2 logistic regression with C chosen on the
  ``validate`` split, AUROC and AP on ``test``, plus the macro AUROC over the findings;
* ``knn``: the same targets with a cosine kNN (k = 20, DINO's temperature-weighted vote);
* ``ridge``: age, ridge regression (alpha chosen on ``validate``), MAE and R²;
* ``segment``: a 1×1 head on the patch tokens, upsampled to the manifest's masks (the synthetic
  set's label maps: right lung, left lung, heart; binary masks: ``lungs``), Dice and IoU;
  its raw-pixel control is per-pixel intensity + position through the same head.

Every number carries a 95% bootstrap CI over the test images, and all models are scored on the
same rows (those whose image every model could load) with the same bootstrap seed, so the
comparisons are paired. Labels: 1 positive; 0 or blank negative; uncertain (-1) by ``uncertain``
(``ignore`` drops the row for that target, ``positive`` / ``negative`` count it as such).
:func:`summarize` gives the pretrained-minus-random-init gaps and the seed spread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from encoder.errors import InputError
from encoder.io import atomic_write_text
from eval.chexpert.observations import CHEXPERT_14
from eval.probes.classify import (UNCERTAIN_RULES, auroc, binary_labels, knn_probe, logistic_probe, macro_auroc,
                                  macro_score)
from eval.probes.regress import ridge_probe
from eval.probes.result import HIGHER_IS_BETTER, ProbeScore, finite_or_none
from eval.probes.segment import SEG_HEAD_EPOCHS, position_features, segmentation_probe
from eval.stats import paired_delta_ci
from radgen.data.images import ImageLoadError, load_image, pixel_features
from radgen.data.manifest import read_manifest
from encoder.specs import encoder_config, random_like_spec
from radgen.features import FeatureJobError, extract_features

__all__ = ["PROBES", "ProbeStudyError", "ProbeRun", "is_random_spec", "run_probes", "paired_gaps", "summarize",
           "format_report", "headline", "write_report", "resolve_encoders"]

PROBES = ("logistic", "knn", "ridge", "segment")
SEX = "sex (F)"
SYNTH_STRUCTURES = {1: "right_lung", 2: "left_lung", 3: "heart"}


class ProbeStudyError(InputError):
    """Bad arguments or data for the probes; the message says which."""


def is_random_spec(spec: str) -> bool:
    """Whether an encoder spec is an untrained random init (``random:`` / ``random-like:``)."""
    return str(spec).startswith(("random:", "random-like:"))


@dataclass
class ProbeRun:
    rows: list[dict]  # one per number: model, kind, spec, dim + ProbeScore fields
    predictions: dict = field(default_factory=dict)  # for plots: "age" and "segment" examples
    timings: dict = field(default_factory=dict)  # stage -> seconds
    image_size: int = 0
    paired: list[dict] = field(default_factory=list)  # pretrained - mean random init, paired CIs (paired_gaps)


# ---- inputs ---------------------------------------------------------------------------------


def _centre_square(img: Image.Image, size: int, resample) -> Image.Image:
    """The rad-dino geometry: shortest edge to ``size``, then the centre ``size`` x ``size`` crop."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _load_mask(path: str, size: int) -> np.ndarray:
    """A label map (0 background, 1..K) or a binary mask (any non-zero -> 1), geometry as the
    encoder's preprocessing, nearest-neighbour. (size, size) int64."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)
    if arr.max() > 16:  # 0/255 (or 0/1 stored 8-bit white) binary mask
        arr = (arr > arr.max() / 2).astype(np.uint8)
    return np.asarray(_centre_square(Image.fromarray(arr.astype(np.uint8)), size, Image.NEAREST), np.int64)


def _seg_pixel_features(path: str, grid: int) -> np.ndarray:
    img, _ = load_image(path)
    small = _centre_square(Image.fromarray(img), grid, Image.BOX)
    return position_features(np.asarray(small, np.float32)[None])[0]


def _targets(ds, uncertain: str) -> dict[str, np.ndarray]:
    cols = set(ds.column_names)
    t = {k: binary_labels(ds[k], uncertain) for k in CHEXPERT_14 if k in cols}
    if "sex" in cols:
        t[SEX] = np.array([np.nan if s in (None, "", "O") else float(s == "F") for s in ds["sex"]])
    return t


def _ages(ds) -> np.ndarray | None:
    if "age" not in ds.column_names:
        return None
    out = np.array([np.nan if a in (None, "") else float(a) for a in ds["age"]])
    return out if np.isfinite(out).sum() >= 10 else None


# ---- the run --------------------------------------------------------------------------------


def run_probes(
    data: str | os.PathLike,
    encoders: dict[str, str],
    image_size: int,
    *,
    probes: Sequence[str] = PROBES,
    targets: Sequence[str] | None = None,
    uncertain: str = "ignore",
    pixel_size: int | None = 32,
    mask_size: int = 64,
    seg_pixel_grid: int = 32,
    seg_epochs: int = SEG_HEAD_EPOCHS,
    knn_k: int = 20,
    n_resamples: int = 1000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    pool: str = "cls",
    layers: Sequence[int] | None = None,
    seg_layers: Sequence[int] | None = None,
    min_pos: int = 5,
    n_examples: int = 6,
    progress: bool = False,
    device: str | None = None,
    log=None,
) -> ProbeRun:
    """Every probe of ``probes`` for each encoder (and raw pixels); see the module docstring.

    Args:
        data: manifest (file or folder) with ``train``, ``validate`` and ``test`` rows
            (``validate`` chooses the regularisation; without it the grid's middle is used).
        encoders: display name -> encoder spec (checkpoint, HF Dinov2 folder, ``random:...``,
            ``random-like:<spec>:<seed>``).
        targets: findings and/or ``sex (F)`` (default: every CheXpert column present, and sex).
        pixel_size: side of the raw-pixel classification baseline (``None``: no pixel row).
        mask_size: side the masks are scored at (segmentation).
        min_pos: a target with fewer positives or negatives than this in train or test gets a row
            with ``value=None`` and a ``note``.
        seg_layers: blocks whose patch tokens the segmentation head reads (concatenated per
            token; default the final output).
        log: ``callable(str)`` for stage messages (default: print to stderr when ``progress``).
    """
    say = log or ((lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None))
    bad = [p for p in probes if p not in PROBES]
    if bad:
        raise ProbeStudyError(f"unknown probe(s) {bad}; choose from {', '.join(PROBES)}")
    if uncertain not in UNCERTAIN_RULES:
        raise ProbeStudyError(f"uncertain={uncertain!r}: choose one of {', '.join(UNCERTAIN_RULES)}")
    if not encoders and not pixel_size:
        raise ProbeStudyError("nothing to probe: no encoders and no pixel baseline")
    pixel_name = f"pixels-{pixel_size}" if pixel_size else None
    if pixel_name in encoders:
        raise ProbeStudyError(f"encoder name {pixel_name!r} is reserved for the raw-pixel baseline")
    ds = read_manifest(data, check_files=False, keep_extra=["mask"])
    has_masks = "mask" in ds.column_names and any(ds["mask"])
    all_targets = _targets(ds, uncertain)
    targets = list(targets) if targets else list(all_targets)
    unknown = [t for t in targets if t not in all_targets]
    if unknown:
        raise ProbeStudyError(f"unknown target(s) {unknown}; choose from {sorted(all_targets)}")
    ages = _ages(ds) if "ridge" in probes else None
    split = np.array(list(ds["split"]), dtype=object)
    train, val, test = split == "train", split == "validate", split == "test"
    if not train.any() or not test.any():
        raise ProbeStudyError(f"{data}: needs rows in split 'train' and 'test' (and 'validate' to "
                              "choose the regularisation)")
    ids = [str(i) for i in ds["id"]]
    row_of = {rid: i for i, rid in enumerate(ids)}
    paths = [imgs[0] for imgs in ds["images"]]
    base = Path(data) if Path(data).is_dir() else Path(data).parent
    do_seg = "segment" in probes and has_masks
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(stage):
        t0 = time.perf_counter()
        yield
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
        say(f"  {stage}: {timings[stage]:.1f} s")

    masks = None
    if do_seg:
        with timed("masks"):
            masks = np.zeros((len(ids), mask_size, mask_size), np.int64)
            has_mask = np.zeros(len(ids), bool)  # rows without a mask take no part in segmentation
            for i, m in enumerate(ds["mask"]):
                if m:
                    path = str(base / m) if not Path(m).is_absolute() else m
                    try:
                        masks[i] = _load_mask(path, mask_size)
                    except (OSError, ValueError) as exc:
                        raise ProbeStudyError(f"mask of row {ids[i]!r}: cannot read {path}: {exc}") from None
                    has_mask[i] = True
        labels = sorted(int(v) for v in np.unique(masks) if v > 0)
        structures = {v: SYNTH_STRUCTURES.get(v, f"label_{v}") for v in labels} if max(labels, default=0) > 1 \
            else {1: "lungs"}

    # Features per model over the rows it could load: name -> (kind, spec, rows, pooled, patches)
    models: list[tuple] = []
    for name, spec in encoders.items():
        kind = "random" if is_random_spec(spec) else "encoder"
        out = Path(cache_dir) / name if cache_dir is not None else None
        with timed(f"features {name}"):
            fs = extract_features(spec, data, out, image_size, batch_size=batch_size, pool=pool,
                                  layers=layers, progress=progress, device=device)
            patches = None
            if do_seg:
                fp = extract_features(spec, data, None if out is None else out / "patches", image_size,
                                      batch_size=batch_size, pool="patches", layers=seg_layers,
                                      progress=progress, device=device)
                side = image_size // encoder_config(spec).patch_size
                n_blocks = 1 if seg_layers is None else len(seg_layers)
                # (N, blocks * h * w * C), block-major -> (N, blocks * C, h, w)
                if fp.ids != fs.ids:  # both passes read the same rows; their order must agree
                    raise FeatureJobError(f"{name}: pooled and patch features cover different rows")
                patches = (fp.features.reshape(len(fp.ids), n_blocks, side, side, -1)
                           .transpose(0, 1, 4, 2, 3).reshape(len(fp.ids), -1, side, side))
        rows = np.array([row_of[r] for r in fs.ids], dtype=int)
        models.append((name, kind, str(spec), rows, fs.features, patches))
    if pixel_name:
        with timed("features pixels"):
            feats, seg_feats, ok = [], [], []
            for i, p in enumerate(paths):
                try:
                    f = pixel_features([p], size=pixel_size)[0]
                    g = _seg_pixel_features(p, seg_pixel_grid) if do_seg else None
                except ImageLoadError:
                    continue
                feats.append(f)
                if do_seg:
                    seg_feats.append(g)
                ok.append(i)
        models.append((pixel_name, "pixels", f"raw pixels {pixel_size}x{pixel_size}", np.array(ok, int),
                       np.stack(feats) if feats else np.empty((0, pixel_size ** 2), np.float32),
                       np.stack(seg_feats) if do_seg and seg_feats else None))

    common = np.ones(len(ids), bool)
    for m in models:
        has = np.zeros(len(ids), bool)
        has[m[3]] = True
        common &= has

    results: list[dict] = []
    predictions: dict = {"age": {}, "segment": {}}
    # Per-test-image inputs of the numbers that get a paired gap: key -> model -> (row ids, arrays).
    # The headline numbers, and the threshold-free companion of every Dice (not a headline number).
    per_image: dict[tuple, dict[str, tuple]] = {}
    paired_keys = {h[:3] for h in HEADLINE}
    if do_seg:
        paired_keys |= {("segment", s, "pixel_auroc") for s in structures.values()}

    def keep_inputs(key: tuple, name: str, ids: np.ndarray, *arrays: np.ndarray) -> None:
        if key in paired_keys:
            per_image.setdefault(key, {})[name] = (np.asarray(ids), tuple(np.asarray(a) for a in arrays))
    for name, kind, spec, rows, x, patches in models:
        keep = common[rows]
        rows, x = rows[keep], x[keep]
        patches = None if patches is None else patches[keep]
        tr, va, te = train[rows], val[rows], test[rows]
        info = {"model": name, "kind": kind, "spec": spec, "dim": int(x.shape[1])}

        def add(score: ProbeScore):
            results.append({**info, **score.to_dict()})

        for probe in (p for p in ("logistic", "knn") if p in probes):
            with timed(f"{probe} {name}"):
                ys = np.full((int(te.sum()), len(targets)), np.nan)
                ss = np.full_like(ys, np.nan)
                fitted = []
                for j, target in enumerate(targets):
                    y = all_targets[target][rows]
                    ok = ~np.isnan(y)
                    ytr, yva, yte = y[tr & ok], y[va & ok], y[te & ok]
                    counts = (ytr.sum(), len(ytr) - ytr.sum(), yte.sum(), len(yte) - yte.sum())
                    if min(counts) < min_pos:
                        note = (f"too few positives/negatives (train {int(counts[0])}/{int(counts[1])}, "
                                f"test {int(counts[2])}/{int(counts[3])}; min {min_pos})")
                        add(ProbeScore(probe, target, "auroc", None, n_train=len(ytr), n_test=len(yte),
                                       n_pos=int(yte.sum()), note=note))
                        continue
                    if probe == "logistic":
                        scores, s = logistic_probe(target, x[tr & ok], ytr, x[va & ok], yva, x[te & ok], yte,
                                                   n_resamples=n_resamples, seed=seed)
                    else:
                        scores, s = knn_probe(target, x[tr & ok], ytr, x[te & ok], yte, k=knn_k,
                                              n_resamples=n_resamples, seed=seed)
                    for sc in scores:
                        add(sc)
                    keep_inputs((probe, target, "auroc"), name, rows[te & ok], yte, s)
                    if target != SEX:  # the macro average is over findings
                        col = np.where(ok[te])[0]
                        ys[col, j], ss[col, j] = yte, s
                        fitted.append(target)
                if fitted:
                    cols = [targets.index(t) for t in fitted]
                    add(macro_score(probe, ys[:, cols], ss[:, cols], int(tr.sum()), n_resamples, seed, fitted))
                    keep_inputs((probe, "macro", "auroc"), name, rows[te], ys[:, cols], ss[:, cols])
        if ages is not None and "ridge" in probes:
            with timed(f"ridge {name}"):
                a = ages[rows]
                ok = ~np.isnan(a)
                if (tr & ok).sum() < max(min_pos, 2) or (te & ok).sum() < 2:
                    add(ProbeScore("ridge", "age", "mae", None, n_train=int((tr & ok).sum()),
                                   n_test=int((te & ok).sum()), note="too few ages in train or test"))
                else:
                    scores, pred = ridge_probe("age", x[tr & ok], a[tr & ok], x[va & ok], a[va & ok],
                                               x[te & ok], a[te & ok], n_resamples=n_resamples, seed=seed)
                    for sc in scores:
                        add(sc)
                    predictions["age"][name] = (a[te & ok], pred)
                    keep_inputs(("ridge", "age", "mae"), name, rows[te & ok], a[te & ok], pred)
        if do_seg and patches is not None:
            with timed(f"segment {name}"):
                m, hm = masks[rows], has_mask[rows]
                tr_s, va_s, te_s = tr & hm, va & hm, te & hm
                if not tr_s.any() or not te_s.any():
                    add(ProbeScore("segment", "all", "dice", None, n_train=int(tr_s.sum()), n_test=int(te_s.sum()),
                                   note="no masks in train or test"))
                else:
                    scores, pred, per_img = segmentation_probe(patches[tr_s], m[tr_s], patches[va_s], m[va_s],
                                                               patches[te_s], m[te_s], structures,
                                                               epochs=seg_epochs, n_resamples=n_resamples, seed=seed)
                    for sc in scores:
                        results.append({**info, "dim": int(patches.shape[1]), **sc.to_dict()})
                    for (struct, metric), values in per_img.items():
                        keep_inputs(("segment", struct, metric), name, rows[te_s], values)
                    predictions["segment"][name] = pred[:n_examples]
                    if "rows" not in predictions["segment"]:
                        predictions["segment"]["rows"] = rows[te_s][:n_examples]
    if do_seg and "rows" in predictions["segment"]:
        ex_rows = predictions["segment"].pop("rows")
        predictions["segment_examples"] = {
            "images": np.stack([np.asarray(_centre_square(Image.fromarray(load_image(paths[i])[0]), mask_size,
                                                         Image.BILINEAR)) for i in ex_rows]),
            "true": masks[ex_rows], "structures": structures}
    kinds = {m[0]: m[1] for m in models}
    with timed("paired gaps"):
        paired = paired_gaps(per_image, kinds, n_resamples=n_resamples, seed=seed)
    return ProbeRun(results, predictions, timings, int(image_size), paired)


def _mean_finite(values: np.ndarray) -> float:
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


# How each headline metric is recomputed from its per-test-image inputs (as its probe scores it).
_PAIRED_METRICS = {"macro": macro_auroc, "auroc": auroc, "dice": _mean_finite, "pixel_auroc": _mean_finite,
                   "mae": lambda y, p: float(np.mean(np.abs(np.asarray(y) - np.asarray(p))))}


def paired_gaps(per_image: dict[tuple, dict[str, tuple]], kinds: dict[str, str], *, n_resamples: int = 1000,
                seed: int = 0) -> list[dict]:
    """Each pretrained encoder minus the mean of the random inits, with a *paired* bootstrap CI.

    ``per_image``: ``(probe, target, metric)`` -> model -> ``(row ids (N,), arrays)`` whose rows
    are the test images that metric is computed on (labels and scores, per-image Dice, ...).
    The models' rows are matched by id, and every resample draws the same test images for all
    of them (:func:`eval.stats.paired_delta_ci`). A gap is ``beyond`` when its whole interval is on
    the metric's good side of 0 and ``behind`` when it is on the other."""
    out = []
    for (probe, target, metric), by_model in per_image.items():
        rand = [n for n in by_model if kinds.get(n) == "random"]
        fn = _PAIRED_METRICS["macro" if target == "macro" else metric]
        for name in (n for n in by_model if kinds.get(n) == "encoder"):
            if not rand:
                continue
            groups = [by_model[n] for n in (name, *rand)]
            common = set(groups[0][0].tolist()).intersection(*(set(g[0].tolist()) for g in groups[1:]))
            if len(common) < 2:
                continue
            aligned = []
            for ids, arrays in groups:
                pick = [i for i in np.argsort(ids, kind="stable") if ids[i] in common]
                aligned.append(tuple(a[pick] for a in arrays))
            d, lo, hi = paired_delta_ci(fn, aligned[0], aligned[1:], n_resamples=n_resamples, seed=seed)
            sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
            ok = np.isfinite(lo) and np.isfinite(hi)
            out.append({"model": name, "probe": probe, "target": target, "metric": metric,
                        "delta": finite_or_none(d), "low": finite_or_none(lo), "high": finite_or_none(hi),
                        "n_test": len(common), "n_random": len(rand),
                        "beyond": bool(ok and min(sign * lo, sign * hi) > 0),
                        "behind": bool(ok and max(sign * lo, sign * hi) < 0)})
    return out


# ---- summaries and tables ---------------------------------------------------------------------


def resolve_encoders(encoders: dict[str, str], random_seeds: int = 0, random_arch: str | None = None,
                     image_size: int | None = None) -> tuple[dict[str, str], int]:
    """Add ``random-<k>`` inits and pick the image size; returns ``(encoders, image_size)``.

    Random inits copy the ``ViTConfig`` of the first non-random encoder (``random-like:``), or
    use ``random:<random_arch>:<image_size>:<k>``. The image size defaults to the first
    encoder's ``img_size``, else 224.
    """
    encoders = dict(encoders)
    first = next((s for s in encoders.values() if not is_random_spec(s)), None)
    if image_size is None:
        source = first or next(iter(encoders.values()), None)
        image_size = encoder_config(source).img_size if source else 224
    if random_seeds:
        if random_arch is None and first is None:
            raise ProbeStudyError("--random-seeds needs a checkpoint --encoder to copy, or --random-arch")
        for k in range(random_seeds):
            name = f"random-{k}"
            if name in encoders:
                raise ProbeStudyError(f"encoder name {name!r} clashes with the added random inits")
            encoders[name] = (f"random:{random_arch}:{image_size}:{k}" if random_arch
                              else random_like_spec(first, k))
    return encoders, int(image_size)


def summarize(rows: list[dict], paired: list[dict] | None = None) -> list[dict]:
    """Per pretrained model and (probe, target, metric): the gap to the random inits.

    Each dict: ``model``, ``probe``, ``target``, ``metric``, ``value`` (pretrained) with its CI
    half-width, ``random_mean``, ``random_spread`` (max - min over seeds), ``n_random``, ``delta``
    (pretrained - random mean), ``better_by`` (delta in the metric's good direction),
    ``beyond_ci`` (better_by > the pretrained CI half-width: a rough screen), ``pixels``; and from
    ``paired`` (:func:`paired_gaps`, the headline numbers) ``paired_low`` / ``paired_high`` (the
    paired 95% CI of ``delta``), ``beyond_paired_ci`` / ``behind_paired_ci``. ``None`` where missing.
    """
    by_pair = {(g["model"], g["probe"], g["target"], g["metric"]): g for g in paired or []}
    keys = list(dict.fromkeys((r["probe"], r["target"], r["metric"]) for r in rows))
    val = {(r["model"], r["probe"], r["target"], r["metric"]): r for r in rows}
    pretrained = list(dict.fromkeys(r["model"] for r in rows if r["kind"] == "encoder")) or [None]
    out = []
    for model in pretrained:
        for probe, target, metric in keys:
            rand = [r["value"] for r in rows if r["kind"] == "random" and (r["probe"], r["target"], r["metric"])
                    == (probe, target, metric) and r["value"] is not None]
            pix = next((r["value"] for r in rows if r["kind"] == "pixels" and
                        (r["probe"], r["target"], r["metric"]) == (probe, target, metric)), None)
            r = val.get((model, probe, target, metric), {})
            v = r.get("value")
            half = None if r.get("low") is None else (r["high"] - r["low"]) / 2
            mean = float(np.mean(rand)) if rand else None
            delta = None if v is None or mean is None else v - mean
            sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
            better = None if delta is None else sign * delta
            out.append({"model": model, "probe": probe, "target": target, "metric": metric, "value": v,
                        "ci_half": half, "random_mean": mean,
                        "random_spread": float(max(rand) - min(rand)) if rand else None,
                        "n_random": len(rand), "delta": delta, "better_by": better,
                        "beyond_ci": None if better is None or half is None else bool(better > half),
                        "pixels": pix})
            g = by_pair.get((model, probe, target, metric))
            out[-1].update({"paired_low": g and g["low"], "paired_high": g and g["high"],
                            "beyond_paired_ci": g and g["beyond"], "behind_paired_ci": g and g["behind"]})
    return out


def _f(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _ci(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "—"
    if r.get("low") is None:
        return _f(r["value"])
    return f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


HEADLINE = (("logistic", "macro", "auroc", "macro AUROC"), ("knn", "macro", "auroc", "kNN macro AUROC"),
            ("segment", "right_lung", "dice", "R lung Dice"), ("segment", "left_lung", "dice", "L lung Dice"),
            ("segment", "lungs", "dice", "lung Dice"), ("segment", "heart", "dice", "heart Dice"),
            ("logistic", SEX, "auroc", "sex AUROC"), ("ridge", "age", "mae", "age MAE (y)"))


def headline(rows: list[dict]) -> str:
    """One row per model, the numbers the RAD-DINO comparison is judged on, each with its CI."""
    present = [h for h in HEADLINE if any((r["probe"], r["target"], r["metric"]) == h[:3] for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["probe"], r["target"], r["metric"]): r for r in rows}
    lines = ["| model | " + " | ".join(h[3] for h in present) + " |", "|---|" + "---|" * len(present)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(_ci(by.get((m, *h[:3]))) for h in present) + " |")
    return "\n".join(lines)


def format_report(run: ProbeRun, title: str = "") -> str:
    """Markdown: the headline table, the gaps to random init, and every number."""
    rows = run.rows
    lines = [f"## {title}", ""] if title else []
    lines += [headline(rows), ""]
    summary = [s for s in summarize(rows, run.paired) if s["n_random"] and s["model"] is not None]
    if summary:
        lines += ["Pretrained vs random init (delta = pretrained - mean over seeds; spread = max - min over "
                  "seeds; paired CI = 95% bootstrap CI of delta, the same test images drawn for every model "
                  "(headline numbers); 'beyond' = that interval on the good side of 0, 'behind' on the other; "
                  "'screen' = better by more than the pretrained CI half-width):", "",
                  "| model | probe | target | metric | pretrained | random mean | delta | paired CI | verdict | "
                  "spread | screen | pixels |", "|---|---|---|---|---:|---:|---:|---|---|---:|---|---:|"]
        for s in summary:
            if s["value"] is None:
                continue
            beyond = "—" if s["beyond_ci"] is None else ("yes" if s["beyond_ci"] else "no")
            pci = "—" if s["paired_low"] is None else f"[{s['paired_low']:+.3f}, {s['paired_high']:+.3f}]"
            verdict = ("—" if s["beyond_paired_ci"] is None else "beyond" if s["beyond_paired_ci"]
                       else "behind" if s["behind_paired_ci"] else "level")
            lines.append(f"| {s['model']} | {s['probe']} | {s['target']} | {s['metric']} | {_f(s['value'])} | "
                         f"{_f(s['random_mean'])} | {_f(s['delta'], '{:+.3f}')} | {pci} | {verdict} | "
                         f"{_f(s['random_spread'])} | {beyond} | {_f(s['pixels'])} |")
        lines.append("")
    lines += ["| model | probe | target | metric | value [95% CI] | n_train | n_test | n_pos | note |",
              "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['probe']} | {r['target']} | {r['metric']} | {_ci(r)} | {r['n_train']} | "
                     f"{r['n_test']} | {'' if r['n_pos'] is None else r['n_pos']} | {r.get('note', '')} |")
    if run.timings:
        lines += ["", "Time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items())]
    return "\n".join(lines)


def write_report(run: ProbeRun, out: str | os.PathLike, meta: dict, title: str = "") -> list[Path]:
    """probe.json, probe.csv, probe.md and the PNG plots into ``out``; returns the paths."""
    from eval.probes import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "probe.json", out / "probe.md"]
    atomic_write_text(out / "probe.json", json.dumps({**meta, "rows": run.rows,
                                                      "summary": summarize(run.rows, run.paired),
                                                      "paired": run.paired, "timings": run.timings},
                                                     indent=2, default=str) + "\n")
    atomic_write_text(out / "probe.md", format_report(run, title) + "\n")
    written.append(plots.write_rows_csv(run.rows, out / "probe.csv"))
    colors = plots.model_colors(run.rows)
    for probe in ("logistic", "knn"):
        if any(r["probe"] == probe and r["metric"] == "auroc" for r in run.rows):
            written.append(plots.plot_metric_bars(run.rows, out / f"{probe}_auroc.png", probe=probe, metric="auroc",
                                                  title=f"{probe} probe: AUROC per target (95% CI)", colors=colors))
    if any(r["probe"] == "segment" for r in run.rows):
        written.append(plots.plot_metric_bars(run.rows, out / "segment_dice.png", probe="segment", metric="dice",
                                              ref_line=None, title="1x1 segmentation head: Dice per structure (95% CI)",
                                              colors=colors))
    if run.predictions.get("age"):
        written.append(plots.plot_age_scatter(run.predictions["age"], out / "age.png", title="age (ridge probe)",
                                              colors=colors))
    ex = run.predictions.get("segment_examples")
    if ex is not None:
        written.append(plots.plot_segmentation_examples(
            ex["images"], ex["true"], dict(run.predictions["segment"]), out / "segment_examples.png",
            names=ex["structures"]))
    return written
