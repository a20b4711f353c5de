"""``radgen manifest {mimic-cxr,chexpert,folder}``: write a radgen manifest for a dataset on disk.

The layouts are read by :mod:`radgen.data.sources`; this module parses the flags, prints the
summary (rows per split, rows skipped and why) and writes the manifest atomically (CSV, TSV or
JSONL by the ``--out`` suffix). Bad inputs exit with code 2 and one message naming the file.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_manifest_parser", "cmd_manifest"]


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="FILE",
                   help="manifest to write: .csv, .tsv or .jsonl (image paths relative to its folder)")


def _add_check_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-files", action=argparse.BooleanOptionalAction, default=True,
                   help="skip (and count) rows whose image file is missing (default: on; "
                        "--no-check-files writes every row without looking at the disk)")


def add_manifest_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "manifest", help="write a radgen manifest for MIMIC-CXR, CheXpert or a folder of images",
        description="Reads a dataset's own layout and tables and writes a radgen manifest (docs/data.md): "
                    "one row per image with id, image, split, labels and report sections where the "
                    "dataset has them. Prints rows per split and rows skipped with the reason.")
    sub = p.add_subparsers(dest="source", metavar="SOURCE")

    m = sub.add_parser(
        "mimic-cxr", help="MIMIC-CXR-JPG (or MIMIC-CXR DICOM with --ext dcm)",
        description="One row per image (id = dicom_id) from mimic-cxr-2.0.0-split.csv(.gz) "
                    "(split), mimic-cxr-2.0.0-chexpert.csv(.gz) (labels) and, when present, "
                    "mimic-cxr-2.0.0-metadata.csv(.gz) (view); images at "
                    "files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg; findings and impression from the "
                    "MIMIC-CXR free-text reports with --reports.")
    m.add_argument("--root", required=True, metavar="DIR", help="dataset folder holding files/")
    m.add_argument("--tables", metavar="DIR", help="folder of the mimic-cxr-2.0.0-*.csv(.gz) tables (default: --root)")
    m.add_argument("--reports", metavar="DIR",
                   help="MIMIC-CXR reports folder (holding files/p10/p10000032/s50414267.txt)")
    m.add_argument("--views", metavar="LIST", help="keep only these ViewPositions, comma-separated (e.g. PA,AP)")
    m.add_argument("--ext", default="jpg", choices=["jpg", "dcm"],
                   help="image file suffix (default jpg; dcm for MIMIC-CXR DICOM)")
    _add_check_files(m)
    _add_out(m)
    m.set_defaults(func=cmd_manifest)

    c = sub.add_parser(
        "chexpert", help="CheXpert-v1.0 / CheXpert-v1.0-small",
        description="train.csv -> split train (optionally a patient-disjoint validate split), "
                    "valid.csv -> split test; Sex -> M/F (Unknown -> blank), Age, the 14 labels, view.")
    c.add_argument("--root", required=True, metavar="DIR",
                   help="the CheXpert-v1.0(-small) folder holding train.csv and valid.csv (or the folder above it)")
    c.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                   help="fraction of train patients moved to validate (default 0)")
    c.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the validate split (default 0)")
    c.add_argument("--frontal-only", action="store_true", help="skip lateral views")
    _add_check_files(c)
    _add_out(c)
    c.set_defaults(func=cmd_manifest)

    f = sub.add_parser(
        "folder", help="every image under a folder (PNG/JPEG/DICOM), split at random or by patient",
        description="Rows for every image under DIR (recursively, hidden files skipped), split "
                    "train/validate/test at random (seeded) or, with --split-by-patient, keeping "
                    "the images of one DICOM PatientID together. The PatientID is never written "
                    "or printed: files are grouped by a salted SHA-256 of it and subject_id is an "
                    "opaque group index. DICOM PatientSex/PatientAge fill sex/age.")
    f.add_argument("folder", metavar="DIR", help="folder of images")
    f.add_argument("--split-by-patient", action="store_true",
                   help="keep each DICOM patient's images in one split (other images: one group each)")
    f.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="fraction of images (or patients) for validate (default 0.1)")
    f.add_argument("--test-fraction", type=_fraction, default=0.1, metavar="F",
                   help="fraction of images (or patients) for test (default 0.1)")
    f.add_argument("--seed", type=int, default=0, metavar="K", help="split seed (default 0)")
    f.add_argument("--reports", metavar="CSV",
                   help="CSV with a key column (id = path under DIR without suffix, or filename) and "
                        "findings and/or impression, joined on the id or the file name's stem")
    _add_out(f)
    f.set_defaults(func=cmd_manifest)

    p.set_defaults(func=cmd_manifest, _manifest_parser=p)
    return p


def _run_source(args):
    from radgen.data import sources

    if args.source == "mimic-cxr":
        views = args.views.split(",") if args.views is not None else None
        return sources.mimic_cxr_rows(args.root, tables=args.tables, reports=args.reports, views=views,
                                      ext=args.ext, check_files=args.check_files)
    if args.source == "chexpert":
        return sources.chexpert_rows(args.root, val_fraction=args.val_fraction, seed=args.seed,
                                     frontal_only=args.frontal_only, check_files=args.check_files)
    return sources.folder_rows(args.folder, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                               seed=args.seed, split_by_patient=args.split_by_patient, reports=args.reports)


def cmd_manifest(args) -> int:
    from encoder.io import atomic_write_text
    from radgen.data.manifest import ManifestError
    from radgen.data.sources import SourceError, check_out_path, format_manifest

    if not getattr(args, "source", None):
        args._manifest_parser.print_help()
        return 2
    try:
        out = check_out_path(args.out)
        result = _run_source(args)
        print(result.format())
        if not result.rows:
            n = sum(result.skipped.values())
            raise ManifestError(out, f"nothing to write: all {n} rows were skipped (see above)" if n
                                else "nothing to write: no rows")
        atomic_write_text(out, format_manifest(result.rows, out))
    except (ManifestError, SourceError) as exc:
        print(f"radgen manifest {args.source}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(result.rows)} rows)")
    return 0
