"""``radgen baselines``: the reference floor of every report-generation table.

Three baselines that any trained generator must beat, written in the record format of
``radgen generate`` so that ``radgen evaluate`` scores them exactly like a model's output:

* ``normal_template``: every test image gets the same normal report (:data:`NORMAL_TEMPLATE`);
* ``most_common``: every test image gets the most frequent training report
  (:func:`most_common_report`: whitespace-normalised counting, ties go to the first seen);
* ``nearest_neighbour``: each test image gets the report of the training image whose frozen
  features are closest by cosine (:func:`nearest_neighbour_reports`), with the same encoder the
  generator reads (``--model RUN_DIR`` takes the encoder spec and image size from a run's
``model.json`` and checks the weights hash). Features come from :func:`radgen.features.extract_features` and are cached
  in ``DIR/features_<split>``, so a re-run (or another pool) only encodes what changed.

**Pool.** The generator reads the encoder's patch tokens (``encoder.select: patch``); the
retrieval needs one vector per image. The default ``cls+mean`` is the encoder's CLS token next to
the mean of its patch tokens: the mean summarises exactly the tokens the generator reads, and the
CLS is the global summary DINO training shapes (what probes and retrieval with RAD-DINO use). ``cls``
alone would leave out everything the generator sees, ``mean`` alone is the strictest "what the
generator reads" and is one ``--pool`` away. (``extract_features`` pools after the encoder's final
LayerNorm, the generator by default reads the block output before it; per token that is an
affine map, so the ranking moves little.)

Outputs in ``DIR`` (each written atomically, ``meta.json`` last): ``normal_template.jsonl``,
``most_common.jsonl``, ``nearest_neighbour.jsonl`` (one record per test row with a reference:
``id``, ``image``, ``status``, ``findings``, ``reference``, ``baseline``, ``settings``; the
nearest-neighbour records add ``neighbour_id`` and ``cosine``), ``references.jsonl`` (``id`` +
``report``) and ``meta.json`` (encoder spec and features metadata, counts, the tie policy).
A test image that cannot be loaded gets a ``status: "error"`` nearest-neighbour record (scored as
an empty report, as ``radgen generate`` does); the two text baselines need no image.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from encoder.errors import InputError
from encoder.specs import which_of
from radgen.data.skips import SKIPPED_FILE

__all__ = [
    "NORMAL_TEMPLATE", "FORMAT", "BASELINES", "DEFAULT_POOL", "TIE_TOLERANCE", "BaselinesError", "normalise_text",
    "most_common_report", "nearest_neighbours", "nearest_neighbour_reports", "run_baselines", "run_encoder",
]

# The normal report the template baseline writes for every image.
NORMAL_TEMPLATE = ("Heart size is normal. The mediastinal contours are normal. The lungs are clear. "
                   "No pleural effusion or pneumothorax.")

FORMAT = "radgen-baselines/1"
BASELINES = ("normal_template", "most_common", "nearest_neighbour")
DEFAULT_POOL = "cls+mean"
# Cosines within this of a row's best count as tied (lowest train index wins): two identical
# training images then always give the same neighbour, whatever the GEMM's rounding order.
TIE_TOLERANCE = 1e-9
REFERENCES_FILE, META_FILE = "references.jsonl", "meta.json"
_CHUNK_ELEMENTS = 1 << 25  # query x train similarities held at once (float64: 256 MiB)


class BaselinesError(InputError):
    """Bad input for ``radgen baselines``; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
def normalise_text(text: str | None) -> str:
    """Whitespace runs collapsed to one space, ends stripped (``None`` -> ``""``)."""
    return " ".join((text or "").split())


def _count_reports(texts: Sequence[str | None]) -> tuple[str, int, int]:
    """``(most common normalised text, its count, distinct texts)``; empty texts are ignored."""
    counts: dict[str, int] = {}  # insertion order = first seen, which breaks ties
    for t in texts:
        key = normalise_text(t)
        if key:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise ValueError("no non-empty training report to count")
    best, n = "", 0
    for key, c in counts.items():
        if c > n:  # strictly greater: an equal count later on never displaces the first seen
            best, n = key, c
    return best, n, len(counts)


def most_common_report(train_texts: Sequence[str | None]) -> str:
    """The most frequent training report, counted and returned whitespace-normalised.

    Ties go to the report seen first. Empty or blank texts are not reports and are skipped;
    raises ``ValueError`` when nothing is left.
    """
    return _count_reports(train_texts)[0]


def _l2_normalised(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # a zero vector stays zero: cosine 0 with everything, rather than NaN
    return x / np.where(norm > 0, norm, 1.0)


def nearest_neighbours(train_feats: np.ndarray, query_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, ``(index of the most cosine-similar train row, that cosine)``.

    Cosine on L2-normalised float64 features; ties (within :data:`TIE_TOLERANCE`) go to the
    lowest train index. Nothing is excluded: train and queries are assumed disjoint. Queries are
    processed in chunks so memory stays bounded for large sets.
    """
    train = _l2_normalised(train_feats, "train_feats")
    query = _l2_normalised(query_feats, "query_feats")
    if len(train) == 0:
        raise ValueError("no training features to retrieve from")
    if query.shape[1] != train.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.shape[1]}, query {query.shape[1]}")
    idx = np.empty(len(query), dtype=np.int64)
    cos = np.empty(len(query), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // len(train))
    for s in range(0, len(query), step):
        sims = query[s:s + step] @ train.T
        best = sims.max(axis=1)
        # argmax of a boolean row is its first True: the lowest index among the (near-)ties
        k = np.argmax(sims >= (best - TIE_TOLERANCE)[:, None], axis=1)
        idx[s:s + step] = k
        cos[s:s + step] = sims[np.arange(len(k)), k]
    return idx, cos


def nearest_neighbour_reports(train_feats: np.ndarray, train_texts: Sequence[str],
                              query_feats: np.ndarray) -> list[str]:
    """The training report of each query's nearest training image (see :func:`nearest_neighbours`)."""
    if len(train_texts) != len(train_feats):
        raise ValueError(f"{len(train_texts)} training texts for {len(train_feats)} training feature rows")
    idx, _ = nearest_neighbours(train_feats, query_feats)
    return [train_texts[i] for i in idx]


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def _rows(data: Path, split: str, text_field: str):
    from radgen.data.manifest import ManifestError, read_manifest
    from radgen.data.reports import read_report_rows

    try:
        rows = read_report_rows(data, split=split, text_field=text_field)
    except ManifestError as exc:
        raise BaselinesError(str(exc)) from None
    except ValueError:
        # read_manifest ends in Dataset.from_list([], features) when the split has no rows, which
        # datasets 5.2 refuses with a schema error; a real problem resurfaces in the read below
        rows = []
    if not rows:
        present = sorted(set(read_manifest(data, check_files=False)["split"]) - {None})
        raise BaselinesError(f"{data}: no rows of split {split!r} (splits present: "
                             f"{', '.join(present) or 'none'}); set --split / --train-split")
    return rows


def _features_meta(fs) -> dict:
    keep = ("format", "encoder_sha256", "data_sha256", "split", "image_size", "pool", "layers",
            "precision", "dim", "n_rows", "n_features", "n_skipped", "seconds", "created")
    return {**{k: fs.meta.get(k) for k in keep}, "cached": bool(fs.cached)}


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run_encoder(run_dir: str | os.PathLike) -> dict:
    """The frozen encoder of a ``radgen train`` run folder: ``{"spec", "image_size", "sha256"}``."""
    mj = Path(run_dir) / "model.json"
    try:
        info = json.loads(mj.read_text(encoding="utf-8"))
        enc = info["encoder"]
        if enc.get("which", "teacher") != which_of(enc["spec"]):  # extract_features reads what the spec names
            raise BaselinesError(f"{mj}: the run reads the {enc['which']!r} weights; pass --encoder instead")
        return {"spec": str(enc["spec"]), "image_size": int(info["image_size"]), "sha256": enc.get("sha256")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BaselinesError(f"{mj}: not a report-generator run folder ({type(exc).__name__}: {exc})") from None


def run_baselines(data: str | os.PathLike, encoder_spec: str, out: str | os.PathLike, split: str = "test",
                  train_split: str = "train", image_size: int | None = None, pool: str = DEFAULT_POOL,
                  text_field: str = "findings", *, batch_size: int | None = None, workers: int | None = None,
                  device: str | None = None, precision: str = "auto", overwrite: bool = False,
                  progress: bool = True, expect_encoder_sha256: str | None = None) -> dict:
    """Write the three baselines for the ``split`` rows of ``data`` into ``out``; returns ``meta``.

    ``image_size`` defaults to the encoder's own ``img_size`` (what the generator uses when
    ``data.image_size`` is unset). ``overwrite`` recomputes cached features.
    ``expect_encoder_sha256`` (a run's ``model.json`` hash) makes a different encoder an error.
    """
    from encoder.io import atomic_write_text
    from encoder.specs import encoder_config
    from radgen.data.reports import record_image_path
    from radgen.features import extract_features

    t0 = time.perf_counter()
    data, out = Path(data), Path(out)
    if not data.exists():
        raise BaselinesError(f"{data}: no such manifest file or folder")
    train_rows = _rows(data, train_split, text_field)
    test_rows = _rows(data, split, text_field)
    if {r.id for r in train_rows} & {r.id for r in test_rows}:
        raise BaselinesError(f"{data}: split {split!r} and training split {train_split!r} share rows; "
                             "retrieval assumes disjoint splits")
    # normalised for counting; the retrieved report is the training text as written
    train_texts = {r.id: normalise_text(r.text) for r in train_rows if normalise_text(r.text)}
    train_raw = {r.id: r.text.strip() for r in train_rows if r.id in train_texts}
    if not train_texts:
        raise BaselinesError(f"{data}: every {train_split!r} row has an empty {text_field!r}; "
                             "the baselines need training reports")
    test = [r for r in test_rows if normalise_text(r.text)]
    if not test:
        raise BaselinesError(f"{data}: every {split!r} row has an empty {text_field!r}; "
                             "there is nothing to score against")
    root = data if data.is_dir() else data.parent
    size = int(image_size or encoder_config(encoder_spec).img_size)

    if expect_encoder_sha256:  # before encoding anything: a wrong encoder would waste the whole pass
        from encoder.specs import load_encoder_spec
        from radgen.model.run import weights_sha256

        if weights_sha256(load_encoder_spec(encoder_spec)) != expect_encoder_sha256:
            raise BaselinesError(f"encoder {encoder_spec!r} is not the one the run was trained with "
                                 "(weights SHA-256 differs)")
    feats = {}
    for name in (train_split, split):
        feats[name] = extract_features(encoder_spec, data, out / f"features_{name}", size, pool=pool,
                                       split=name, batch_size=batch_size, workers=workers, device=device,
                                       precision=precision, overwrite=overwrite, progress=progress)
    tr_fs, te_fs = feats[train_split], feats[split]
    # the retrieval pool: training rows with both a report and a loadable image, manifest order
    keep = [k for k, rid in enumerate(tr_fs.ids) if rid in train_texts]
    if not keep:
        raise BaselinesError(f"{data}: no {train_split!r} row has both a report and a loadable image "
                             f"(see {out / f'features_{train_split}' / SKIPPED_FILE})")
    pool_ids = [tr_fs.ids[k] for k in keep]
    pool_feats = tr_fs.features[keep]
    test_pos = {rid: k for k, rid in enumerate(te_fs.ids)}
    have = [r for r in test if r.id in test_pos]
    idx, cos = (nearest_neighbours(pool_feats, te_fs.features[[test_pos[r.id] for r in have]])
                if have else (np.empty(0, dtype=np.int64), np.empty(0)))
    nn_of = {r.id: (int(i), float(c)) for r, i, c in zip(have, idx, cos)}
    skipped = {s["id"]: s for s in te_fs.skipped}

    common, common_n, n_distinct = _count_reports(list(train_texts.values()))
    nn_settings = {"encoder": str(encoder_spec), "pool": pool, "image_size": size,
                   "precision": te_fs.meta.get("precision"), "similarity": "cosine"}
    settings = {"normal_template": {}, "most_common": {"train_split": train_split},
                "nearest_neighbour": {**nn_settings, "train_split": train_split}}
    records: dict[str, list[dict]] = {b: [] for b in BASELINES}
    for r in test:
        base = {"id": r.id, "image": record_image_path(r.image, root)}
        ref = {"reference": r.text}
        records["normal_template"].append({**base, "status": "ok", "findings": NORMAL_TEMPLATE, **ref,
                                           "baseline": "normal_template", "settings": settings["normal_template"]})
        records["most_common"].append({**base, "status": "ok", "findings": common, **ref,
                                       "baseline": "most_common", "settings": settings["most_common"]})
        if r.id in nn_of:
            i, c = nn_of[r.id]
            nid = pool_ids[i]
            rec = {**base, "status": "ok", "findings": train_raw[nid], **ref, "neighbour_id": nid,
                   "cosine": round(c, 6)}
        else:  # the image did not load: an error record, scored as an empty report
            err = skipped.get(r.id, {"error": "not_encoded", "reason": "no features for this row"})
            rec = {**base, "status": "error", "findings": None, **ref, "error": err.get("error"),
                   "reason": err.get("reason")}
        records["nearest_neighbour"].append({**rec, "baseline": "nearest_neighbour",
                                             "settings": settings["nearest_neighbour"]})

    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # meta.json marks a complete set: write it last
    written = []
    for b in BASELINES:
        atomic_write_text(out / f"{b}.jsonl", _jsonl(records[b]))
        written.append(f"{b}.jsonl")
    atomic_write_text(out / REFERENCES_FILE, _jsonl([{"id": r.id, "report": r.text} for r in test]))
    written.append(REFERENCES_FILE)
    meta = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(data.resolve()),
        "split": split,
        "train_split": train_split,
        "text_field": text_field,
        "encoder": str(encoder_spec),
        "image_size": size,
        "pool": pool,
        "features": {"train": _features_meta(tr_fs), "test": _features_meta(te_fs)},
        "counts": {
            "test_rows": len(test_rows), "test_rows_scored": len(test),
            "test_rows_without_reference": len(test_rows) - len(test),
            "test_images_unreadable": len(test) - len(have),
            "train_rows": len(train_rows), "train_reports": len(train_texts),
            "train_reports_distinct": n_distinct, "train_retrieval_pool": len(pool_ids),
            "train_images_unreadable": len(tr_fs.skipped),
        },
        "normal_template": {"text": NORMAL_TEMPLATE},
        "most_common": {"text": common, "count": common_n},
        "nearest_neighbour": {
            "similarity": "cosine of L2-normalised features (float64)",
            "mean_cosine": round(float(cos.mean()), 6) if len(cos) else None,
            "distinct_neighbours": len({int(i) for i in idx}),
        },
        "ties": {
            "most_common": "count after whitespace normalisation; equal counts -> the report seen "
                           "first in manifest order",
            "nearest_neighbour": f"cosines within {TIE_TOLERANCE:g} of the best -> the lowest "
                                 "training index (manifest order); nothing excluded (splits are disjoint)",
        },
        "files": written + [META_FILE],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta
