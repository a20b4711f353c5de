"""Public dataset layouts -> radgen manifest rows (``radgen manifest``; see ``docs/data.md``).

Pure functions, no CLI: each ``*_rows`` function reads a dataset's own tables and returns a
:class:`SourceResult` (rows with absolute image paths, what was skipped and why, notes);
:func:`format_manifest` turns rows into CSV / TSV / JSONL text with image paths relative to the
manifest's folder. Problems with the inputs (a missing table, a missing column, a bad value)
raise :class:`~radgen.data.manifest.ManifestError` naming the file (and row); bad arguments raise
:class:`SourceError`. Nothing is written here.

* MIMIC-CXR-JPG (or MIMIC-CXR DICOM): ``mimic-cxr-2.0.0-{split,chexpert,metadata}.csv[.gz]``,
  images at ``files/p10/p10000032/s50414267/<dicom_id>.jpg``, optional free-text reports at
  ``<reports>/files/p10/p10000032/s50414267.txt`` cut into FINDINGS / IMPRESSION.
* CheXpert-v1.0(-small): ``train.csv`` (-> train, optionally a patient-disjoint validate
  split) and ``valid.csv`` (-> test).
* A plain folder of images, split at random or by DICOM PatientID. The PatientID is hashed
  with a random per-run salt the moment it is read and only an opaque group index
  (``subject_id`` = ``group00001``...) is ever written.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from encoder.errors import InputError
from eval.chexpert.observations import CHEXPERT_14
from radgen.data.images import IMAGE_EXTENSIONS
from radgen.data.manifest import ManifestError, image_folder_dataset, parse_labels

__all__ = [
    "SourceError", "SourceResult", "MANIFEST_COLUMNS", "MANIFEST_SUFFIXES", "mimic_cxr_rows",
    "chexpert_rows", "folder_rows", "report_sections", "assign_splits", "format_manifest",
    "check_out_path",
]

MANIFEST_COLUMNS = ("id", "image", "study_id", "subject_id", "split", "findings", "impression",
                    "sex", "age", *CHEXPERT_14)
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
SPLITS = ("train", "validate", "test")
_SPLIT_NAMES = {"train": "train", "validate": "validate", "val": "validate", "valid": "validate",
                "validation": "validate", "test": "test"}
_DICOM_SUFFIXES = (".dcm", ".dicom")
_IMAGE_SUFFIXES = tuple(e.lower() for e in IMAGE_EXTENSIONS)


class SourceError(InputError):
    """A bad argument (not a bad file): a fraction out of range, an unknown extension."""


@dataclass
class SourceResult:
    source: str
    rows: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> rows skipped
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one example (a path)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, example: str | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if example is not None:
            self.examples.setdefault(reason, example)

    def split_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in SPLITS}
        for r in self.rows:
            counts[r.get("split") or "none"] = counts.get(r.get("split") or "none", 0) + 1
        return counts

    def format(self) -> str:
        counts = self.split_counts()
        lines = [f"{self.source}: {len(self.rows)} rows ("
                 + ", ".join(f"{k} {v}" for k, v in counts.items() if v or k in SPLITS) + ")"]
        n_skip = sum(self.skipped.values())
        if n_skip:
            lines.append(f"  skipped {n_skip} rows:")
            for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                ex = f" (e.g. {self.examples[reason]})" if reason in self.examples else ""
                lines.append(f"    {n:>8d}  {reason}{ex}")
        else:
            lines.append("  skipped 0 rows")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tables
def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _iter_table(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Rows (1-based data row number, dict) of a CSV / CSV.gz after checking its header."""
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise ManifestError(path, "file is empty (no header row)")
            have = {c.strip() for c in reader.fieldnames}
            missing = [c for c in required if c not in have]
            if missing:
                raise ManifestError(path, "missing column(s) " + ", ".join(repr(c) for c in missing)
                                    + f" (has: {', '.join(sorted(have))})")
            for i, row in enumerate(reader, start=1):
                yield i, {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(path, f"cannot read the table ({type(exc).__name__}: {exc})") from None


def _find_table(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.csv`` or ``.csv.gz``; else one ``mimic-cxr-*-<kind>.csv[.gz]`` (other versions)."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    kind = stem.rsplit("-", 1)[-1]
    found = sorted(folder.glob(f"mimic-cxr-*-{kind}.csv")) + sorted(folder.glob(f"mimic-cxr-*-{kind}.csv.gz"))
    return found[0] if found else None


def _digits(value: str, column: str, path: Path, i: int) -> str:
    s = (value or "").strip()
    if s.endswith(".0"):
        s = s[:-2]
    if not s.isdigit():
        raise ManifestError(path, f"column {column!r} must be a number, got {value!r}", i)
    return s


def _blank_row() -> dict:
    return {k: None for k in MANIFEST_COLUMNS}


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise SourceError(f"{name} must be between 0 and 1, got {value}")
    return value


def assign_splits(groups: Sequence, fractions: dict[str, float], seed: int) -> dict:
    """Group -> split: a seeded permutation of ``groups`` (given in a deterministic order) cut
    into ``round(f * n)`` groups per split of ``fractions`` (``validate``/``test``); the rest train."""
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise SourceError(f"split fractions add up to {total:g} (> 1)")
    order = list(groups)
    random.Random(seed).shuffle(order)
    out, start, n = {}, 0, len(order)
    for split in ("test", "validate"):
        k = min(int(fractions.get(split, 0.0) * n + 0.5), n - start)
        for g in order[start:start + k]:
            out[g] = split
        start += k
    for g in order[start:]:
        out[g] = "train"
    return out


# ---------------------------------------------------------------------------------------------
# report text
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
_FINDINGS = {"FINDINGS", "FINDING"}
_IMPRESSION = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "FINDINGS AND IMPRESSION",
               "FINDINGS/IMPRESSION", "FINDINGS / IMPRESSION"}


def report_sections(text: str) -> tuple[str | None, str | None]:
    """(findings, impression) of a free-text report with capitalised ``FINDINGS:`` /
    ``IMPRESSION:`` headers (MIMIC-CXR style). A section runs to the next capitalised header;
    whitespace is collapsed; a missing or empty section is None; when a section is repeated
    (e.g. in an addendum) the last non-empty one is kept. ``FINDINGS AND IMPRESSION:`` and
    ``CONCLUSION:`` count as the impression."""
    found: dict[str, str] = {}
    heads = list(_HEADER.finditer(text))
    for j, m in enumerate(heads):
        name = re.sub(r"\s+", " ", m.group(1)).strip()
        key = "findings" if name in _FINDINGS else "impression" if name in _IMPRESSION else None
        if key is None:
            continue
        end = heads[j + 1].start() if j + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        if body:
            found[key] = body
    return found.get("findings"), found.get("impression")


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR
def mimic_cxr_rows(root: str | os.PathLike, *, tables: str | os.PathLike | None = None,
                   reports: str | os.PathLike | None = None, views: Iterable[str] | None = None,
                   ext: str = "jpg", check_files: bool = True) -> SourceResult:
    """One row per image of MIMIC-CXR-JPG (``ext="jpg"``) or MIMIC-CXR DICOM (``ext="dcm"``).

    ``tables`` is the folder of ``mimic-cxr-2.0.0-*.csv[.gz]`` (default ``root``); the split table
    is required, the CheXpert table gives the labels (required), the metadata table gives
    ``view`` (required only with ``views``, which keeps only those ViewPositions, e.g. PA, AP).
    ``reports`` is the MIMIC-CXR reports folder (holding ``files/p10/...txt``, or ``p10/...``).
    """
    root = Path(root)
    tables = Path(tables) if tables is not None else root
    ext = ext.lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png", "dcm"):
        raise SourceError(f"--ext must be jpg or dcm, got {ext!r}")
    if not root.is_dir():
        raise ManifestError(root, "MIMIC-CXR root folder does not exist")
    if not tables.is_dir():
        raise ManifestError(tables, "tables folder does not exist")
    split_csv = _find_table(tables, "mimic-cxr-2.0.0-split")
    if split_csv is None:
        raise ManifestError(tables, "no mimic-cxr-2.0.0-split.csv(.gz) here (the MIMIC-CXR-JPG split table; "
                                    "pass --tables DIR if the tables are elsewhere)")
    chexpert_csv = _find_table(tables, "mimic-cxr-2.0.0-chexpert")
    if chexpert_csv is None:
        raise ManifestError(tables, "no mimic-cxr-2.0.0-chexpert.csv(.gz) here (the MIMIC-CXR-JPG label table)")
    meta_csv = _find_table(tables, "mimic-cxr-2.0.0-metadata")
    want_views = None
    if views is not None:
        want_views = {v.strip().upper() for v in views if v.strip()}
        if not want_views:
            raise SourceError("--views is empty (e.g. --views PA,AP)")
        if meta_csv is None:
            raise ManifestError(tables, "--views needs mimic-cxr-2.0.0-metadata.csv(.gz) (ViewPosition), "
                                        "not found here")
    files_dir = root / "files"
    if check_files and not files_dir.is_dir():
        raise ManifestError(root, f"no files/ folder (expected files/p10/p10000032/s50414267/<dicom_id>.{ext}); "
                                  "use --no-check-files to write the manifest anyway")
    report_dir = None
    if reports is not None:
        report_dir = Path(reports)
        if not report_dir.is_dir():
            raise ManifestError(report_dir, "reports folder does not exist")
        if (report_dir / "files").is_dir():
            report_dir = report_dir / "files"

    labels: dict[tuple[str, str], dict] = {}
    for i, r in _iter_table(chexpert_csv, ("subject_id", "study_id", *CHEXPERT_14)):
        key = (_digits(r["subject_id"], "subject_id", chexpert_csv, i),
               _digits(r["study_id"], "study_id", chexpert_csv, i))
        labels[key] = parse_labels(r, chexpert_csv, i)
    view_of: dict[str, str] = {}
    if meta_csv is not None:
        for _, r in _iter_table(meta_csv, ("dicom_id", "ViewPosition")):
            view_of[r["dicom_id"]] = r.get("ViewPosition") or ""

    res = SourceResult(source="mimic-cxr", rows=[])
    study_text: dict[str, tuple[str | None, str | None] | None] = {}
    no_labels: set[str] = set()
    seen: set[str] = set()
    for i, r in _iter_table(split_csv, ("dicom_id", "study_id", "subject_id", "split")):
        dicom_id = r["dicom_id"]
        if not dicom_id:
            raise ManifestError(split_csv, "empty dicom_id", i)
        if dicom_id in seen:
            raise ManifestError(split_csv, f"duplicate dicom_id {dicom_id!r}", i)
        seen.add(dicom_id)
        subject = _digits(r["subject_id"], "subject_id", split_csv, i)
        study = _digits(r["study_id"], "study_id", split_csv, i)
        split = _SPLIT_NAMES.get((r["split"] or "").lower())
        if split is None:
            raise ManifestError(split_csv, f"unknown split {r['split']!r} (train/validate/test)", i)
        view = view_of.get(dicom_id) if meta_csv is not None else None
        if want_views is not None:
            if dicom_id not in view_of:
                res.skip("no row in the metadata table (view unknown)")
                continue
            if (view or "").upper() not in want_views:
                res.skip(f"view not in {','.join(sorted(want_views))}")
                continue
        image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.{ext}"
        if check_files and not image.is_file():
            res.skip("image file missing", str(image))
            continue
        row = _blank_row()
        row.update(id=dicom_id, image=os.path.abspath(image), study_id=study, subject_id=subject, split=split)
        if meta_csv is not None:
            row["view"] = view or None
        lab = labels.get((subject, study))
        if lab is None:
            no_labels.add(study)
        else:
            row.update(lab)
        if report_dir is not None:
            if study not in study_text:
                txt = report_dir / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
                try:
                    study_text[study] = report_sections(txt.read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    study_text[study] = None
            sec = study_text[study]
            if sec is not None:
                row["findings"], row["impression"] = sec
        res.rows.append(row)
    if no_labels:
        res.notes.append(f"{len(no_labels)} studies have no row in {chexpert_csv.name}: labels left blank")
    if report_dir is not None:
        missing = sum(1 for v in study_text.values() if v is None)
        empty = sum(1 for v in study_text.values() if v is not None and v == (None, None))
        no_find = sum(1 for v in study_text.values() if v is not None and v[0] is None)
        res.notes.append(f"reports: {len(study_text) - missing} of {len(study_text)} studies have a report file"
                         f" ({missing} missing); {no_find} without a FINDINGS section, {empty} with neither"
                         " FINDINGS nor IMPRESSION")
    if meta_csv is None:
        res.notes.append("no mimic-cxr-2.0.0-metadata table: no view column")
    if not check_files:
        res.notes.append("image files not checked (--no-check-files)")
    return res


# ---------------------------------------------------------------------------------------------
# CheXpert
def _chexpert_dir(root: Path) -> Path:
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file():
        return root
    subs = sorted(d for d in root.glob("CheXpert-v1.0*") if d.is_dir() and (d / "train.csv").is_file())
    return subs[0] if len(subs) == 1 else root


def _sex(value: str | None) -> str | None:
    s = (value or "").strip().lower()
    return {"male": "M", "m": "M", "female": "F", "f": "F"}.get(s)


def _age(value: str | None) -> float | None:
    try:
        a = float(value)
    except (TypeError, ValueError):
        return None
    return a if a == a and a >= 0 else None


def chexpert_rows(root: str | os.PathLike, *, val_fraction: float = 0.0, seed: int = 0,
                  frontal_only: bool = False, check_files: bool = True) -> SourceResult:
    """CheXpert-v1.0(-small): ``train.csv`` -> train (``val_fraction`` of its patients -> validate,
    seeded, patient-disjoint), ``valid.csv`` -> test. ``root`` is the dataset folder (or the
    folder above it). ``Path`` values like ``CheXpert-v1.0-small/train/patient00001/study1/
    view1_frontal.jpg`` are resolved inside ``root`` whatever the dataset folder is called."""
    check_fraction("--val-fraction", val_fraction)
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "CheXpert folder does not exist")
    root = _chexpert_dir(root)
    tables = [(root / "train.csv", "train"), (root / "valid.csv", "test")]
    for path, _ in tables:
        if not path.is_file():
            raise ManifestError(path, f"CheXpert table missing (expected train.csv and valid.csv in {root})")
    required = ["Path", *CHEXPERT_14] + (["Frontal/Lateral"] if frontal_only else [])
    res = SourceResult(source="chexpert", rows=[])
    seen: set[str] = set()
    for path, split in tables:
        for i, r in _iter_table(path, required):
            rel = Path(r["Path"])
            parts = rel.parts
            if not parts:
                raise ManifestError(path, "empty Path", i)
            if parts[0] not in ("train", "valid", "test"):
                parts = parts[1:]  # drop "CheXpert-v1.0-small/"
            if len(parts) < 3:
                raise ManifestError(path, f"Path {r['Path']!r} is not <dataset>/<split>/<patient>/<study>/<view>", i)
            if frontal_only and (r.get("Frontal/Lateral") or "").lower() != "frontal":
                res.skip("not frontal (--frontal-only)")
                continue
            image = root.joinpath(*parts)
            if check_files and not image.is_file():
                res.skip("image file missing", str(image))
                continue
            rid = Path(*parts).with_suffix("").as_posix()
            if rid in seen:
                raise ManifestError(path, f"duplicate Path {r['Path']!r}", i)
            seen.add(rid)
            patient = parts[-3]
            row = _blank_row()
            row.update(id=rid, image=os.path.abspath(image), study_id=f"{patient}/{parts[-2]}",
                       subject_id=patient, split=split, sex=_sex(r.get("Sex")), age=_age(r.get("Age")))
            orientation = (r.get("Frontal/Lateral") or "").lower()
            if orientation:  # AP/PA (blank on laterals) when frontal
                row["view"] = (r.get("AP/PA") or "FRONTAL") if orientation == "frontal" else "LATERAL"
            row.update(parse_labels(r, path, i))
            res.rows.append(row)
    if val_fraction > 0:
        patients = sorted({r["subject_id"] for r in res.rows if r["split"] == "train"})
        split_of = assign_splits(patients, {"validate": val_fraction}, seed)
        for r in res.rows:
            if r["split"] == "train":
                r["split"] = split_of[r["subject_id"]]
        n_val = sum(1 for s in split_of.values() if s == "validate")
        res.notes.append(f"validate: {n_val} of {len(patients)} train patients (seed {seed}), patient-disjoint")
    res.notes.append("valid.csv -> test (CheXpert's public validation set is the usual test set)")
    if not check_files:
        res.notes.append("image files not checked (--no-check-files)")
    return res


# ---------------------------------------------------------------------------------------------
# a folder of images
def _dicom_header(path: Path) -> tuple[bytes | None, str | None, float | None] | None:
    """(salted-hash input, sex, age) of a DICOM file, or None when pydicom cannot read it.
    Only the caller's hash of the PatientID leaves this function, never the ID itself."""
    import pydicom

    try:
        with warnings.catch_warnings():  # pydicom's value warnings may quote the value
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["PatientID", "PatientSex", "PatientAge"])
            pid = str(ds.get("PatientID", "") or "").strip()
            sex = str(ds.get("PatientSex", "") or "").strip().upper()[:1] or None
            age_s = str(ds.get("PatientAge", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 -- a damaged header: skipped and counted, message not shown
        return None
    key = pid.encode("utf-8") if pid else None
    del pid
    age = None
    m = re.fullmatch(r"(\d{1,3})([DWMY]?)", age_s)
    if m:
        n = int(m.group(1))
        age = {"D": n / 365.25, "W": n / 52.18, "M": n / 12.0}.get(m.group(2), float(n))
        age = 90.0 if age > 89 else round(age, 2)
    return key, (sex if sex in ("M", "F", "O") else None), age


def _read_reports_csv(path: Path) -> dict[str, tuple[str | None, str | None]]:
    if not path.is_file():
        raise ManifestError(path, "reports CSV does not exist")
    with _open_text(path) as fh:
        header = next(csv.reader(fh), None)
    if header is None:
        raise ManifestError(path, "file is empty (no header row)")
    cols = {c.strip() for c in header}
    key_col = next((c for c in ("id", "filename", "file", "image", "path", "stem") if c in cols), None)
    if key_col is None:
        raise ManifestError(path, "missing a key column: one of 'id', 'filename', 'file', 'image', 'path', 'stem'"
                                  f" (has: {', '.join(sorted(cols))})")
    if not {"findings", "impression"} & cols:
        raise ManifestError(path, f"missing column 'findings' and/or 'impression' (has: {', '.join(sorted(cols))})")
    out: dict[str, tuple[str | None, str | None]] = {}
    for i, r in _iter_table(path, (key_col,)):
        key = r[key_col].replace("\\", "/")
        if not key:
            raise ManifestError(path, f"empty {key_col!r}", i)
        p = Path(key)
        if p.suffix.lower() in _IMAGE_SUFFIXES:
            key = p.with_suffix("").as_posix()
        if key in out:
            raise ManifestError(path, f"duplicate {key_col} {r[key_col]!r}", i)
        out[key] = (r.get("findings") or None, r.get("impression") or None)
    return out


def folder_rows(folder: str | os.PathLike, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 0, split_by_patient: bool = False,
                reports: str | os.PathLike | None = None) -> SourceResult:
    """Every image under ``folder`` (``image_folder_dataset``), split at random (seeded), or by
    patient: DICOM files grouped by a salted SHA-256 of their PatientID (the salt is random per
    call and never stored), ``subject_id`` = an opaque group index. Images that are not DICOM or
    have no PatientID are a group of their own. DICOM headers also give ``sex`` and ``age``
    (over 89 -> 90). ``reports``: a CSV of (id | filename | ... , findings, impression) joined on
    the row id (path relative to ``folder`` without suffix) or else the file name's stem."""
    check_fraction("--val-fraction", val_fraction)
    check_fraction("--test-fraction", test_fraction)
    if val_fraction + test_fraction > 1.0 + 1e-9:
        raise SourceError(f"--val-fraction + --test-fraction = {val_fraction + test_fraction:g} (> 1)")
    folder = Path(folder)
    report_map = _read_reports_csv(Path(reports)) if reports is not None else None
    ds = image_folder_dataset(folder)
    res = SourceResult(source="folder", rows=[])
    salt = secrets.token_bytes(16)
    group_of_hash: dict[str, int] = {}
    n_own, n_nodicom = 0, 0
    for rid, imgs in zip(ds["id"], ds["images"]):
        image = Path(imgs[0])
        row = _blank_row()
        row.update(id=Path(rid).as_posix(), image=os.path.abspath(image))
        gkey = None
        if image.suffix.lower() in _DICOM_SUFFIXES:
            head = _dicom_header(image)
            if head is None:
                res.skip("not a readable DICOM file", str(image))
                continue
            pid_bytes, row["sex"], row["age"] = head
            if pid_bytes is not None:
                gkey = hashlib.sha256(salt + pid_bytes).hexdigest()
                del pid_bytes
            elif split_by_patient:
                n_own += 1
        elif split_by_patient:
            n_nodicom += 1
        if split_by_patient and gkey is not None:
            if gkey not in group_of_hash:
                group_of_hash[gkey] = len(group_of_hash) + 1
            row["_group"] = group_of_hash[gkey]
        else:
            row["_group"] = None
        res.rows.append(row)
    del group_of_hash
    # split units: a patient group, or a single image
    units: dict = {}
    for k, r in enumerate(res.rows):
        r["_unit"] = ("patient", r["_group"]) if r["_group"] is not None else ("image", k)
        units.setdefault(r["_unit"], None)
    split_of = assign_splits(list(units), {"validate": val_fraction, "test": test_fraction}, seed)
    n_groups = 0
    for r in res.rows:
        r["split"] = split_of[r.pop("_unit")]
        g = r.pop("_group")
        if g is not None:
            r["subject_id"] = f"group{g:05d}"
            n_groups = max(n_groups, g)
    if split_by_patient:
        res.notes.append(f"split by patient (seed {seed}): {n_groups} DICOM patient groups from a salted SHA-256"
                         f" of PatientID (subject_id = group index); {len(units)} units split in all")
        if n_own:
            res.notes.append(f"{n_own} DICOM files without a PatientID: each its own group")
        if n_nodicom:
            res.notes.append(f"{n_nodicom} non-DICOM images (no PatientID): each its own group")
    else:
        res.notes.append(f"random split of images (seed {seed}); --split-by-patient keeps a patient's images together")
    if report_map is not None:
        by_stem: dict[str, list[dict]] = {}
        for r in res.rows:
            by_stem.setdefault(Path(r["image"]).stem, []).append(r)
        used: set[str] = set()
        n_join, n_ambiguous = 0, 0
        for r in res.rows:
            key = r["id"]
            if key not in report_map and Path(key).suffix.lower() in _IMAGE_SUFFIXES:
                key = Path(key).with_suffix("").as_posix()
            if key not in report_map:
                stem = Path(r["image"]).stem
                if stem in report_map:
                    if len(by_stem[stem]) > 1:
                        n_ambiguous += 1
                        continue
                    key = stem
                else:
                    continue
            r["findings"], r["impression"] = report_map[key]
            used.add(key)
            n_join += 1
        res.notes.append(f"reports: {n_join} of {len(res.rows)} images joined; {len(report_map) - len(used)} "
                         "report rows matched no image")
        if n_ambiguous:
            res.notes.append(f"reports: {n_ambiguous} images not joined: their file-name stem is shared by several "
                             "images (use the id, the path without suffix, as the key)")
    return res


# ---------------------------------------------------------------------------------------------
# output
def check_out_path(out: str | os.PathLike) -> Path:
    """The manifest path, checked before any work: a .csv / .tsv / .jsonl file, not a folder."""
    p = Path(out)
    if p.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ManifestError(p, f"unknown manifest type {p.suffix!r} (use {', '.join(MANIFEST_SUFFIXES)})")
    if p.is_dir():
        raise ManifestError(p, "is a folder (give a file name such as manifest.csv)")
    return p


def _rel(image: str, base: Path) -> str:
    """Relative to the manifest's folder when the image is inside it, else absolute (a relative
    path may not climb out of the manifest's folder; see read_manifest)."""
    try:
        rel = Path(os.path.relpath(image, base))
    except ValueError:  # another drive (Windows): keep it absolute
        return Path(image).as_posix()
    return rel.as_posix() if rel.parts[:1] != ("..",) else Path(os.path.abspath(image)).as_posix()


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:g}"
    return str(v)


def format_manifest(rows: Sequence[dict], out: str | os.PathLike) -> str:
    """CSV / TSV / JSONL text (by ``out``'s suffix) of ``rows``: :data:`MANIFEST_COLUMNS` then any
    extra columns (e.g. ``view``), image paths relative to ``out``'s folder."""
    out = check_out_path(out)
    base = Path(os.path.abspath(out)).parent
    extra = sorted({k for r in rows for k in r if k not in MANIFEST_COLUMNS and not k.startswith("_")})
    cols = [*MANIFEST_COLUMNS, *extra]
    if out.suffix.lower() == ".jsonl":
        lines = []
        for r in rows:
            obj = {k: r.get(k) for k in cols}
            obj["image"] = _rel(r["image"], base)
            lines.append(json.dumps(obj, ensure_ascii=False))
        return "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if out.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        cells = {k: _cell(r.get(k)) for k in cols}
        img = _rel(r["image"], base)
        # read_manifest splits on ';' and parses a leading '[' as a JSON list: protect such paths
        cells["image"] = json.dumps([img]) if (";" in img or img.startswith("[")) else img
        writer.writerow([cells[k] for k in cols])
    return buf.getvalue()
