"""Dataset manifests: CSV / JSONL files describing studies, exposed as ``datasets.Dataset``.

Format (one row per image *or* per study; see ``docs/data.md``):

==============  ========  ===================================================================
column          required  meaning
==============  ========  ===================================================================
image           yes       image path, relative to the manifest's folder (or ``root``). Several
                          images of one study: ``images`` as a JSON list, or ``a.png;b.png``.
id              no        unique row id (default: the first image's path without suffix)
study_id        no        rows sharing it belong to one study (MIMIC-CXR: one row per image)
subject_id      no        patient key (never a real identifier)
split           no        train / validate / test (aliases: val, valid, validation, dev)
findings        no        findings section of the report
impression      no        impression section
sex, age        no        ``M``/``F``, years
<14 CheXpert>   no        "No Finding" ... "Support Devices": 1, 0, -1 or blank
anything else   no        kept as text
==============  ========  ===================================================================

Every problem raises :class:`ManifestError` naming the file, the row and the reason; a manifest
with several bad rows gets one error listing them all. A relative image path must stay inside the
manifest's folder (or ``root``); an absolute path may point anywhere.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import datasets

from encoder.errors import InputError
from encoder.io import NotUTF8Error, read_utf8
from eval.chexpert.observations import CHEXPERT_14, parse_label
from radgen.data.images import IMAGE_EXTENSIONS

__all__ = ["ManifestError", "parse_labels", "read_manifest", "image_folder_dataset", "group_by_study", "FEATURES",
           "MANIFEST_NAMES", "is_image_folder"]

_SPLIT_ALIASES = {"train": "train", "training": "train", "validate": "validate", "val": "validate",
                  "valid": "validate", "validation": "validate", "dev": "validate", "test": "test"}
_IMAGE_KEYS = ("images", "image", "path", "image_path", "dicom_path")
_TEXT_FIELDS = ("id", "study_id", "subject_id", "split", "findings", "impression", "sex")

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "images": datasets.Sequence(datasets.Value("string")),
    "study_id": datasets.Value("string"),
    "subject_id": datasets.Value("string"),
    "split": datasets.Value("string"),
    "findings": datasets.Value("string"),
    "impression": datasets.Value("string"),
    "sex": datasets.Value("string"),
    "age": datasets.Value("float32"),
    **{k: datasets.Value("int8") for k in CHEXPERT_14},
})


class ManifestError(InputError):
    def __init__(self, path: str | os.PathLike, reason: str, row: int | None = None):
        self.path, self.row, self.reason = str(path), row, reason
        where = f"{self.path}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {reason}")


MAX_LISTED_ERRORS = 20


def _collected(path: Path, errors: list[ManifestError]) -> ManifestError:
    """One error listing every problem found in ``path`` (the first :data:`MAX_LISTED_ERRORS`);
    a single problem is raised as it is (with its ``row``)."""
    if len(errors) == 1:
        return errors[0]
    lines = [f"row {e.row}: {e.reason}" if e.row is not None else e.reason for e in errors[:MAX_LISTED_ERRORS]]
    more = len(errors) - len(lines)
    return ManifestError(path, f"{len(errors)} problems:\n  - " + "\n  - ".join(lines)
                         + (f"\n  ... and {more} more" if more > 0 else ""))


def _read_text(path: Path) -> str:
    try:
        return read_utf8(path)
    except NotUTF8Error as exc:
        raise ManifestError(path, str(exc), row=exc.line) from None


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise ManifestError(path, f"unknown manifest type {suffix!r} (use .csv, .tsv or .jsonl)")
    text = _read_text(path)
    if suffix in (".jsonl", ".ndjson"):
        rows, errors = [], []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(ManifestError(path, f"invalid JSON ({exc.msg})", row=i))
                continue
            if not isinstance(obj, dict):
                errors.append(ManifestError(path, "each line must be a JSON object", row=i))
                continue
            rows.append(obj)
        if errors:
            raise _collected(path, errors)
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    if reader.fieldnames is None:
        raise ManifestError(path, "file is empty (no header row)")
    return [dict(r) for r in reader]


def _images_of(raw: dict, path: Path, row: int) -> list[str]:
    for key in _IMAGE_KEYS:
        val = raw.get(key)
        if val in (None, "", []):
            continue
        if isinstance(val, list):
            return [str(v) for v in val]
        s = str(val).strip()
        if s.startswith("["):
            try:
                return [str(v) for v in json.loads(s)]
            except json.JSONDecodeError:
                raise ManifestError(path, f"column {key!r} is not a valid JSON list", row) from None
        return [p.strip() for p in s.split(";") if p.strip()]
    raise ManifestError(path, f"no image path (expected one of the columns {', '.join(_IMAGE_KEYS)})", row)


def _normalise(raw: dict, path: Path, row: int, root: Path, check_files: bool) -> dict:
    images = []
    for rel in _images_of(raw, path, row):
        p = Path(rel)
        if not p.is_absolute():
            p = Path(os.path.normpath(root / p))
            if not p.is_relative_to(os.path.normpath(root)):
                raise ManifestError(path, f"image path {rel!r} climbs out of the manifest's folder {root} "
                                          "(relative paths stay inside it; write an absolute path to "
                                          "read a file elsewhere)", row)
        if check_files and not p.exists():
            raise ManifestError(path, f"image file not found: {p}", row)
        images.append(str(p))
    out: dict = {k: None for k in FEATURES}
    out["images"] = images
    for k in _TEXT_FIELDS:
        v = raw.get(k)
        out[k] = None if v is None or (isinstance(v, str) and v.strip() == "") else str(v)
    if out["id"] is None:
        out["id"] = str(Path(_images_of(raw, path, row)[0]).with_suffix(""))
    if out["split"] is not None:
        key = out["split"].strip().lower()
        if key not in _SPLIT_ALIASES:
            raise ManifestError(path, f"unknown split {out['split']!r} (train/validate/test)", row)
        out["split"] = _SPLIT_ALIASES[key]
    if out["sex"] is not None:
        s = out["sex"].strip().upper()[:1]
        if s not in ("M", "F", "O"):
            raise ManifestError(path, f"sex must be M, F or O, got {out['sex']!r}", row)
        out["sex"] = s
    age = raw.get("age")
    if age not in (None, ""):
        try:
            out["age"] = float(age)
        except (TypeError, ValueError):
            raise ManifestError(path, f"age must be a number, got {age!r}", row) from None
    out.update(parse_labels(raw, path, row))
    return out


def parse_labels(raw: dict, path, row) -> dict:
    """The 14 CheXpert columns of one raw row as 1 / 0 / -1 / None; a bad value is a
    :class:`ManifestError` naming the file, row and column."""
    out = {}
    for k in CHEXPERT_14:
        try:
            out[k] = parse_label(raw.get(k))
        except ValueError as exc:
            raise ManifestError(path, f"column {k!r}: {exc}", row) from None
    return out


MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")  # what a data folder's manifest is called, by preference


def _folder_manifest(folder: Path) -> Path | None:
    return next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain folder of images (a folder without a manifest), not a manifest
    file or a folder holding one: the one place every job decides how to read its ``--data``."""
    p = Path(path)
    return p.is_dir() and _folder_manifest(p) is None


def read_manifest(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    split: str | None = None,
    check_files: bool = True,
    keep_extra: Iterable[str] = (),
) -> datasets.Dataset:
    """Read a CSV / TSV / JSONL manifest into a ``datasets.Dataset`` with :data:`FEATURES`.

    Args:
        path: the manifest file, or a folder holding ``manifest.jsonl`` / ``manifest.csv``.
        root: folder that relative image paths are resolved against (default: the manifest's).
        split: keep only rows of this split.
        check_files: fail early when an image file is missing.
        keep_extra: extra columns to keep (as strings), e.g. ``["view", "mask"]``.
    """
    p = Path(path)
    if p.is_dir():
        p = _folder_manifest(p)
        if p is None:
            raise ManifestError(Path(path), f"folder has no {' or '.join(MANIFEST_NAMES)}")
    if not p.is_file():
        raise ManifestError(p, "manifest file does not exist")
    base = Path(root) if root is not None else p.parent
    raws = _read_rows(p)
    if not raws:
        raise ManifestError(p, "manifest has no rows")
    extra = list(keep_extra)
    rows, seen, errors = [], {}, []
    for i, raw in enumerate(raws, start=1):
        try:
            r = _normalise(raw, p, i, base, check_files)
        except ManifestError as exc:
            errors.append(exc)
            continue
        if r["id"] in seen:
            errors.append(ManifestError(p, f"duplicate id {r['id']!r} (first on row {seen[r['id']]})", i))
            continue
        seen[r["id"]] = i
        for k in extra:
            v = raw.get(k)
            r[k] = None if v is None or v == "" else str(v)
        rows.append(r)
    if errors:  # every problem at once, before any model is loaded
        raise _collected(p, errors)
    if split is not None:
        want = _SPLIT_ALIASES.get(split.lower(), split)
        rows = [r for r in rows if r["split"] == want]
    feats = datasets.Features({**FEATURES, **{k: datasets.Value("string") for k in extra}})
    if not rows:  # a split with no rows: an empty table of the same schema (from_list needs a row)
        return datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
    return datasets.Dataset.from_list(rows, features=feats)


def image_folder_dataset(folder: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> datasets.Dataset:
    """Every image under ``folder`` (recursively, sorted, hidden files skipped) as a Dataset.

    Ids are the paths relative to ``folder`` without suffix (with it where two files differ only
    by suffix); other columns are empty. Used for
    encoder pretraining and for ``radgen generate`` on a plain folder of X-rays. Symlinked
    folders are not entered (no loops); a name with an image suffix that is not a readable file
    (broken link, symlink loop, no permission) is listed, so the job records it as a failure
    instead of losing it silently.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(root, "image folder does not exist")
    exts = {e.lower() for e in extensions}
    files = sorted(
        f for f in root.rglob("*")
        if f.suffix.lower() in exts and not f.is_dir()
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )
    if not files:
        raise ManifestError(root, f"no image files ({', '.join(sorted(exts))}) under this folder")
    stems = Counter(f.relative_to(root).with_suffix("") for f in files)
    rows = []
    for f in files:
        r = {k: None for k in FEATURES}
        rel = f.relative_to(root)
        # a.png and a.dcm side by side would share an id: those two keep their suffix
        r["id"] = str(rel if stems[rel.with_suffix("")] > 1 else rel.with_suffix(""))
        r["images"] = [str(f)]
        rows.append(r)
    return datasets.Dataset.from_list(rows, features=FEATURES)


def group_by_study(ds: datasets.Dataset) -> dict[str, list[int]]:
    """Row indices per study (rows without a study id form their own study)."""
    groups: dict[str, list[int]] = {}
    for i, (sid, rid) in enumerate(zip(ds["study_id"], ds["id"])):
        groups.setdefault(sid or rid, []).append(i)
    return groups
