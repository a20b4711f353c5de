"""Manifests (CSV / JSONL -> datasets.Dataset) and image-folder mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radgen.data.manifest import ManifestError, group_by_study, image_folder_dataset, read_manifest


@pytest.fixture()
def img_dir(shared_data: Path) -> Path:
    return shared_data / "cxr" / "images"


def test_csv_mimic_style(tmp_path: Path, img_dir: Path):
    """One row per image, several images per study, relative paths resolved via root."""
    csv = tmp_path / "m.csv"
    csv.write_text(
        "image,study_id,subject_id,split,findings,Cardiomegaly,Pleural Effusion,sex,age\n"
        "00000001_000.png,s1,p1,train,Heart is enlarged.,1,,M,58\n"
        "00027426_000.png,s1,p1,train,Heart is enlarged.,1.0,0,M,58\n"
        "00870a9c.jpg,s2,p2,val,No effusion.,,0,F,\n"
    )
    ds = read_manifest(csv, root=img_dir)
    assert len(ds) == 3
    assert ds[0]["images"] == [str(img_dir / "00000001_000.png")]
    assert ds[0]["Cardiomegaly"] == 1 and ds[0]["Pleural Effusion"] is None
    assert ds[1]["Cardiomegaly"] == 1 and ds[1]["Pleural Effusion"] == 0
    assert ds[2]["split"] == "validate" and ds[2]["age"] is None and ds[2]["sex"] == "F"
    assert ds[0]["id"] == "00000001_000"
    assert group_by_study(ds) == {"s1": [0, 1], "s2": [2]}
    assert len(read_manifest(csv, root=img_dir, split="validate")) == 1


def test_jsonl_multi_image_study(tmp_path: Path, img_dir: Path):
    f = tmp_path / "m.jsonl"
    rows = [{"id": "a", "images": ["00000001_000.png", "00027426_000.png"], "findings": "x",
             "impression": "y", "No Finding": 1, "Edema": -1}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = read_manifest(f, root=img_dir)
    assert len(ds[0]["images"]) == 2 and ds[0]["Edema"] == -1 and ds[0]["impression"] == "y"


@pytest.mark.parametrize(
    "body, message",
    [
        ("findings\nabc\n", "no image path"),
        ("image,Cardiomegaly\n00000001_000.png,2\n", "Cardiomegaly"),
        ("image,split\n00000001_000.png,holdout\n", "unknown split"),
        ("image\nmissing.png\n", "not found"),
        ("image,id\n00000001_000.png,a\n00027426_000.png,a\n", "duplicate id"),
        ("image,age\n00000001_000.png,old\n", "age"),
    ],
)
def test_manifest_errors_name_file_and_row(tmp_path: Path, img_dir: Path, body: str, message: str):
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(f, root=img_dir)
    assert "bad.csv" in str(err.value)
    if "row" in str(err.value):
        assert err.value.row is not None


def test_bad_jsonl_line(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"image": "a.png"}\n{not json}\n')
    with pytest.raises(ManifestError, match="row 2"):
        read_manifest(f, check_files=False)


def test_image_folder_recursive(tmp_path: Path, img_dir: Path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name, target in [("00000001_000.png", "sub/a.png"), ("00870a9c.jpg", "sub/deeper/b.jpg"),
                         ("00870a9c.jpg", ".hidden/c.jpg")]:
        (tmp_path / target).write_bytes((img_dir / name).read_bytes())
    (tmp_path / "notes.txt").write_text("x")
    ds = image_folder_dataset(tmp_path)
    assert ds["id"] == ["sub/a", "sub/deeper/b"]
    assert ds[1]["images"] == [str(tmp_path / "sub" / "deeper" / "b.jpg")]


def test_empty_folder(tmp_path: Path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ManifestError, match="no image files"):
        image_folder_dataset(tmp_path / "e")


def test_split_with_no_rows_is_an_empty_table(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "a.png", "split": "train"}\n')
    ds = read_manifest(tmp_path / "m.jsonl", split="test", check_files=False)
    assert len(ds) == 0 and "findings" in ds.column_names
