"""``radgen manifest`` (radgen.data.sources): MIMIC-CXR, CheXpert and folder layouts -> manifests."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from eval.chexpert.observations import CHEXPERT_14
from radgen.cli import main
from radgen.data.manifest import read_manifest
from radgen.data.sources import assign_splits, folder_rows, report_sections

FAKE_NAME = "Doe^Janet Secretname"
FAKE_IDS = ("MRN-ZZ-918273", "MRN-ZZ-564738", "MRN-ZZ-102938")


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def _dicom(path: Path, patient_id: str | None, sex: str = "F", age: str = "062Y") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PatientName, ds.PatientSex, ds.PatientAge = "DX", FAKE_NAME, sex, age
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.Rows, ds.Columns = "MONOCHROME2", 1, 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (lambda: gzip.open(path, "wt", newline="")) if gz else (lambda: open(path, "w", newline=""))
    with opener() as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _labels(**kw) -> list[str]:
    return [kw.get(k.replace(" ", "_"), "") for k in CHEXPERT_14]


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.
 The cardiac silhouette is mildly enlarged.

 IMPRESSION:

 Mild cardiomegaly.  No acute process.
"""


# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def mimic(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    images = [("d1", "10000032", "50414267", "train", "PA"), ("d2", "10000032", "50414267", "train", "LATERAL"),
              ("d3", "10000033", "50000001", "validate", "AP"), ("d4", "11000011", "50000002", "test", "PA"),
              ("d5", "11000011", "50000003", "test", "PA")]  # d5: image file missing
    for dicom_id, subj, study, _, _ in images[:4]:
        _png(root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{dicom_id}.jpg")
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
               [[d, st, su, sp] for d, su, st, sp, _ in images], gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_14],
               [["10000032", "50414267", *_labels(Cardiomegaly="1.0", Pleural_Effusion="0.0", Edema="-1.0")],
                ["10000033", "50000001", *_labels(No_Finding="1.0")]])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
               [[d, su, st, v] for d, su, st, _, v in images])
    rep = tmp_path / "mimic-cxr-reports" / "files"
    (rep / "p10" / "p10000032").mkdir(parents=True)
    (rep / "p10" / "p10000032" / "s50414267.txt").write_text(REPORT)
    (rep / "p10" / "p10000033").mkdir(parents=True)
    (rep / "p10" / "p10000033" / "s50000001.txt").write_text(" FINAL REPORT\n IMPRESSION: \n\n Normal chest.\n")
    return root


def test_mimic_cxr_rows_labels_reports_and_skips(mimic: Path, tmp_path: Path, capsys):
    out = tmp_path / "out" / "manifest.csv"
    code = main(["manifest", "mimic-cxr", "--root", str(mimic), "--reports", str(tmp_path / "mimic-cxr-reports"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "mimic-cxr: 4 rows (train 2, validate 1, test 1)" in captured.out
    assert "image file missing" in captured.out and "d5.jpg" in captured.out
    text = out.read_text()
    # outside the manifest's folder: absolute (a relative path may not climb out of it)
    assert str((mimic / "files/p10/p10000032/s50414267/d1.jpg").resolve()) in text
    ds = read_manifest(out, keep_extra=["view"])  # check_files: every path resolves
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"d1", "d2", "d3", "d4"}
    d1 = rows["d1"]
    assert (d1["study_id"], d1["subject_id"], d1["split"], d1["view"]) == ("50414267", "10000032", "train", "PA")
    assert (d1["Cardiomegaly"], d1["Pleural Effusion"], d1["Edema"], d1["Pneumothorax"]) == (1, 0, -1, None)
    assert d1["findings"] == ("There is no focal consolidation, pleural effusion or pneumothorax. "
                              "The cardiac silhouette is mildly enlarged.")
    assert d1["impression"] == "Mild cardiomegaly. No acute process."
    assert rows["d2"]["findings"] == d1["findings"]  # one report per study, every image of it
    assert rows["d3"]["findings"] is None and rows["d3"]["impression"] == "Normal chest."
    assert rows["d3"]["No Finding"] == 1 and rows["d3"]["split"] == "validate"
    assert rows["d4"]["findings"] is None and rows["d4"]["Cardiomegaly"] is None  # no report, no labels
    assert Path(d1["images"][0]).is_file()


def test_mimic_cxr_views_dicom_layout_and_jsonl(mimic: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "mimic-cxr", "--root", str(mimic), "--views", "PA,AP", "--out", str(out)]) == 0
    assert "view not in AP,PA" in capsys.readouterr().out
    assert sorted(read_manifest(out)["id"]) == ["d1", "d3", "d4"]
    # MIMIC-CXR DICOM: the same tree with .dcm files; the tables may live elsewhere (--tables)
    dcm_root = tmp_path / "mimic-cxr"
    _dicom(dcm_root / "files" / "p10" / "p10000032" / "s50414267" / "d1.dcm", "x")
    out2 = tmp_path / "dcm.csv"
    assert main(["manifest", "mimic-cxr", "--root", str(dcm_root), "--tables", str(mimic), "--ext", "dcm",
                 "--out", str(out2)]) == 0
    assert read_manifest(out2)["id"] == ["d1"]
    assert main(["manifest", "mimic-cxr", "--root", str(dcm_root), "--tables", str(mimic), "--ext", "dcm",
                 "--no-check-files", "--out", str(out2)]) == 0
    assert len(read_manifest(out2, check_files=False)) == 5


def test_mimic_cxr_missing_table_or_column_is_one_clear_error(mimic: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.csv"
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    assert main(["manifest", "mimic-cxr", "--root", str(mimic), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mimic-cxr-2.0.0-split.csv" in err and str(mimic) in err and not out.exists()
    _write_csv(mimic / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "split"], [["d1", "50414267", "train"]])
    assert main(["manifest", "mimic-cxr", "--root", str(mimic), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mimic-cxr-2.0.0-split.csv" in err and "'subject_id'" in err and not out.exists()
    assert main(["manifest", "mimic-cxr", "--root", str(mimic), "--out", str(tmp_path / "m.parquet")]) == 2
    assert "use .csv, .tsv, .jsonl" in capsys.readouterr().err


def test_report_sections():
    assert report_sections(REPORT)[1] == "Mild cardiomegaly. No acute process."
    assert report_sections("no headers at all") == (None, None)
    assert report_sections("FINDINGS:\n\nIMPRESSION: Clear lungs.") == (None, "Clear lungs.")
    assert report_sections(" FINDINGS AND IMPRESSION:  No change.\n NOTIFICATION: called") == (None, "No change.")
    assert report_sections(" FINDINGS: a.\n ADDENDUM:\n FINDINGS: b.\n")[0] == "b."


# ---------------------------------------------------------------------------------------------
def test_chexpert_rows_splits_sex_labels(tmp_path: Path, capsys):
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_14]
    train = []
    for p in range(1, 7):
        for view in ("view1_frontal", "view2_lateral"):
            rel = f"CheXpert-v1.0-small/train/patient0000{p}/study1/{view}.jpg"
            if not (p == 6 and view == "view2_lateral"):  # one image missing
                _png(tmp_path / rel)
            train.append([rel, ["Male", "Female", "Unknown"][p % 3], str(60 + p),
                          "Frontal" if "frontal" in view else "Lateral", "AP" if "frontal" in view else "",
                          *_labels(Cardiomegaly="1.0", Edema="-1.0", Fracture="0.0")])
    _write_csv(root / "train.csv", header, train)
    rel = "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    _png(tmp_path / rel)
    _write_csv(root / "valid.csv", header, [[rel, "Female", "73", "Frontal", "PA", *_labels(No_Finding="1.0")]])

    out = tmp_path / "chexpert.csv"
    assert main(["manifest", "chexpert", "--root", str(root), "--val-fraction", "0.34", "--seed", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1  image file missing" in text
    ds = read_manifest(out, keep_extra=["view"])
    rows = {r["id"]: r for r in ds}
    assert len(rows) == 12
    r = rows["train/patient00001/study1/view1_frontal"]
    assert (r["sex"], r["age"], r["subject_id"], r["study_id"], r["view"]) == ("F", 61.0, "patient00001",
                                                                               "patient00001/study1", "AP")
    assert (r["Cardiomegaly"], r["Edema"], r["Fracture"], r["No Finding"]) == (1, -1, 0, None)
    assert rows["train/patient00002/study1/view1_frontal"]["sex"] is None  # Unknown -> blank
    assert rows["train/patient00003/study1/view1_frontal"]["sex"] == "M"
    test = rows["valid/patient64541/study1/view1_frontal"]
    assert test["split"] == "test" and test["No Finding"] == 1
    split_of_patient: dict[str, set] = {}
    for r in ds:
        split_of_patient.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_patient.values())  # patient-disjoint
    assert sum(s == {"validate"} for s in split_of_patient.values()) == 2  # round(0.34 * 6)

    assert main(["manifest", "chexpert", "--root", str(tmp_path), "--frontal-only", "--out", str(out)]) == 0
    assert "6  not frontal (--frontal-only)" in capsys.readouterr().out
    assert len(read_manifest(out)) == 7 and set(read_manifest(out)["split"]) == {"train", "test"}

    (root / "valid.csv").unlink()
    assert main(["manifest", "chexpert", "--root", str(root), "--out", str(out)]) == 2
    assert "valid.csv" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
def test_folder_split_by_patient_never_leaks_patient_id(tmp_path: Path, capsys):
    data = tmp_path / "hospital"
    for p, pid in enumerate(FAKE_IDS):
        for k in range(2):
            _dicom(data / f"series{p}" / f"img{k}.dcm", pid, sex="MF"[p % 2], age=f"0{60 + p}Y")
    _dicom(data / "noid.dcm", None)
    _png(data / "extra" / "film.png")
    (data / "broken.dcm").write_bytes(b"not a dicom file")
    _write_csv(tmp_path / "reports.csv", ["filename", "findings", "impression"],
               [["film.png", "Clear lungs.", "Normal."], ["series0/img0", "Left effusion.", ""],
                ["unmatched", "x", "y"]])
    out = tmp_path / "out" / "manifest.jsonl"
    code = main(["manifest", "folder", str(data), "--split-by-patient", "--val-fraction", "0.34",
                 "--test-fraction", "0.34", "--seed", "1", "--reports", str(tmp_path / "reports.csv"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "not a readable DICOM file" in captured.out
    ds = read_manifest(out)
    rows = {r["id"]: r for r in ds}
    assert set(rows) == {"series0/img0", "series0/img1", "series1/img0", "series1/img1", "series2/img0",
                         "series2/img1", "noid", "extra/film"}
    for p in range(3):
        a, b = rows[f"series{p}/img0"], rows[f"series{p}/img1"]
        assert a["split"] == b["split"] and a["subject_id"] == b["subject_id"] is not None
        assert a["sex"] == "MF"[p % 2] and a["age"] == 60 + p
    assert len({rows[f"series{p}/img0"]["subject_id"] for p in range(3)}) == 3
    assert rows["noid"]["subject_id"] is None and rows["extra/film"]["subject_id"] is None
    assert (rows["extra/film"]["findings"], rows["extra/film"]["impression"]) == ("Clear lungs.", "Normal.")
    assert rows["series0/img0"]["findings"] == "Left effusion." and rows["series0/img1"]["findings"] is None
    assert "1 report rows matched no image" in captured.out
    # hygiene: the fake PatientID / PatientName appear in no output file, nor on stdout/stderr
    secrets_ = [*FAKE_IDS, FAKE_NAME, "Secretname", "Doe^Janet"]
    outputs = [captured.out, captured.err]
    outputs += [f.read_text(errors="replace") for f in out.parent.rglob("*") if f.is_file()]
    assert not [s for s in secrets_ for o in outputs if s in o]
    assert [f.name for f in out.parent.iterdir()] == ["manifest.jsonl"]  # no temp file left behind


def test_folder_random_split_is_seeded_and_checks_fractions(tmp_path: Path, capsys):
    for k in range(6):
        _png(tmp_path / "imgs" / f"{k}.png", value=10 * k)
    a = folder_rows(tmp_path / "imgs", val_fraction=0.34, test_fraction=0.17, seed=5)
    b = folder_rows(tmp_path / "imgs", val_fraction=0.34, test_fraction=0.17, seed=5)
    assert [r["split"] for r in a.rows] == [r["split"] for r in b.rows]
    assert a.split_counts() == {"train": 3, "validate": 2, "test": 1}
    assert assign_splits(list(range(10)), {"test": 1.0}, 0) == {k: "test" for k in range(10)}
    out = tmp_path / "m.csv"
    assert main(["manifest", "folder", str(tmp_path / "imgs"), "--val-fraction", "0.6", "--test-fraction", "0.6",
                 "--out", str(out)]) == 2
    assert "> 1" in capsys.readouterr().err and not out.exists()
    assert main(["manifest", "folder", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["manifest", "folder", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    assert len(read_manifest(out)) == 6


def test_folder_with_real_films(shared_data: Path, tmp_path: Path):
    data = tmp_path / "real"
    data.mkdir()
    shutil.copy(shared_data / "cxr" / "images" / "00000001_000.png", data)
    shutil.copy(shared_data / "dicom" / "dx_mono2_nih.dcm", data)
    out = tmp_path / "real.csv"
    assert main(["manifest", "folder", str(data), "--split-by-patient", "--out", str(out)]) == 0
    ds = read_manifest(out)
    assert sorted(ds["id"]) == ["00000001_000", "dx_mono2_nih"]
    from radgen.data.images import load_image

    for r in ds:
        assert load_image(r["images"][0])[0].ndim == 2
    assert json.dumps(list(ds)) and ds["sex"][ds["id"].index("dx_mono2_nih")] == "M"
