"""The synthetic generator: labels match what is drawn, reports match labels, determinism."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from eval.chexpert.observations import CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES
from radgen.config import ConfigError, load_config
from radgen.data.images import load_image
from radgen.data.manifest import read_manifest
from radgen.data.synth.case import CTR_THRESHOLD, Finding
from radgen.data.synth.generate import generate_dataset, make_example
from radgen.data.synth.phantom import MASK_HEART, MASK_LEFT_LUNG, MASK_RIGHT_LUNG, render


def _max_row_width(mask: np.ndarray) -> int:
    best = 0
    for row in mask:
        cols = np.flatnonzero(row)
        if cols.size:
            best = max(best, cols[-1] - cols[0] + 1)
    return best


def _cfg(out: Path, **kw):
    over = [f"out={out}", "n=24", "size=96", "seed=7", "workers=2"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config("synth", overrides=over)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_dataset(_cfg(out), progress=False)
    return out


def test_writes_images_masks_manifest_config(small_set: Path):
    rows = [json.loads(line) for line in (small_set / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for r in rows:
        assert (small_set / r["image"]).is_file() and (small_set / r["mask"]).is_file()
        assert set(CHEXPERT_14) <= set(r)
        assert all(r[k] in (1, 0, -1, None) for k in CHEXPERT_14)
        assert r["sex"] in ("M", "F") and 18 <= r["age"] <= 95
    assert (small_set / "config.yaml").is_file() and (small_set / "manifest.csv").is_file()
    splits = [r["split"] for r in rows]
    assert splits.count("validate") == 2 and splits.count("test") == 2 and splits.count("train") == 20
    ds = read_manifest(small_set, keep_extra=["mask", "view"])
    assert len(ds) == 24 and ds[0]["images"][0].endswith(".png")
    img, info = load_image(ds[0]["images"][0])
    assert img.shape == (96, 96) and info.format == "png"


def test_deterministic_and_independent_of_workers(small_set: Path, tmp_path: Path):
    again = tmp_path / "b"
    generate_dataset(_cfg(again, workers=1), progress=False)
    assert (again / "manifest.jsonl").read_bytes() == (small_set / "manifest.jsonl").read_bytes()
    for f in sorted((small_set / "images").iterdir()):
        assert (again / "images" / f.name).read_bytes() == f.read_bytes()
    other = tmp_path / "c"
    generate_dataset(_cfg(other, seed=8), progress=False)
    assert (other / "manifest.jsonl").read_bytes() != (small_set / "manifest.jsonl").read_bytes()


def test_refuses_non_empty_output_and_bad_config(small_set: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="not empty"):
        generate_dataset(_cfg(small_set), progress=False)
    with pytest.raises(ConfigError, match="sum to 1"):
        generate_dataset(_cfg(tmp_path / "d", **{"splits.train": 0.5}), progress=False)
    with pytest.raises(ConfigError, match="size"):
        generate_dataset(_cfg(tmp_path / "e", size=8), progress=False)


def test_cardiomegaly_label_matches_measured_ctr():
    """Measured on the rendered masks: heart width / thoracic width > 0.5 exactly when labelled."""
    seen = {True: 0, False: 0}
    for i in range(60):
        _, rendered, _, _, labels = make_example(11, i, 192, prevalence_scale=2.0)
        heart = rendered.mask == MASK_HEART
        thorax = np.isin(rendered.mask, [MASK_RIGHT_LUNG, MASK_LEFT_LUNG, MASK_HEART])
        ctr = _max_row_width(heart) / _max_row_width(thorax)
        positive = labels["Cardiomegaly"] == 1
        assert (ctr > CTR_THRESHOLD) == positive, f"example {i}: measured CTR {ctr:.3f}, label {labels['Cardiomegaly']}"
        seen[positive] += 1
    assert seen[True] >= 5 and seen[False] >= 5


def test_masks_are_anatomical():
    _, rendered, _, _, _ = make_example(0, 0, 128)
    m = rendered.mask
    right_cols = np.nonzero(m == MASK_RIGHT_LUNG)[1]
    left_cols = np.nonzero(m == MASK_LEFT_LUNG)[1]
    heart_cols = np.nonzero(m == MASK_HEART)[1]
    # The patient's right lung is on the image left; the heart sits between, shifted to the left lung.
    assert right_cols.mean() < heart_cols.mean() < left_cols.mean()
    for v in (MASK_RIGHT_LUNG, MASK_LEFT_LUNG, MASK_HEART):
        assert (m == v).sum() > 200


_FINDING_SPECS = {
    "Pleural Effusion": dict(side="right", severity="moderate"),
    "Pneumothorax": dict(side="left", severity="moderate"),
    "Consolidation": dict(side="right", location="right lower lobe", severity="lobar"),
    "Atelectasis": dict(side="left", severity="plate-like"),
    "Edema": dict(side="bilateral", severity="moderate"),
    "Lung Lesion": dict(side="left", severity="mass", size_cm=4.0, extra={"zone": "mid", "u": 0.5}),
    "Fracture": dict(side="right", severity="displaced", location="6th rib", extra={"rib": 6}),
    "Pleural Other": dict(side="right", severity="thickening"),
    "Support Devices": dict(severity="pacemaker"),
}


@pytest.mark.parametrize("kind", sorted(_FINDING_SPECS))
def test_each_finding_has_a_visible_correlate(kind: str):
    case, base, _, _, _ = make_example(5, 3, 160)
    case = copy.deepcopy(case)
    case.findings = []
    clean = render(case, 160).image
    case.findings = [Finding(kind, **_FINDING_SPECS[kind])]
    sick = render(case, 160).image
    diff = sick - clean
    # Every finding adds density somewhere (pneumothorax: the pleural line) and changes a
    # region of at least a few pixels clearly.
    assert (np.abs(diff) > 0.05).sum() >= 8, f"{kind}: no visible change"
    if kind in ("Pleural Effusion", "Consolidation", "Edema", "Lung Lesion"):
        assert diff.sum() > 0, f"{kind} should add opacity"
    if kind == "Pneumothorax":
        assert (diff < -0.02).sum() > 20, "pneumothorax should darken the space without lung markings"


def test_sex_and_age_are_in_the_image():
    case, _, _, _, _ = make_example(1, 0, 128)
    case = copy.deepcopy(case)
    case.findings = []
    case.breast_size = 0.0
    male = render(case, 128).image
    case.breast_size = 1.0
    female = render(case, 128).image
    assert (female - male).sum() > 5  # breast shadows add density
    case.breast_size = 0.0
    case.bone_density = 1.2
    young = render(case, 128).image
    case.bone_density = 0.5
    old = render(case, 128).image
    assert (young - old).sum() > 5  # bone density falls with age


def test_reports_consistent_with_labels():
    for i in range(120):
        case, _, findings, impression, labels = make_example(21, i, 32, prevalence_scale=2.0)
        text = findings.lower()
        assert text and impression
        for f in case.findings:
            assert labels[f.kind] in (1, -1), f"{f.kind} drawn but labelled {labels[f.kind]}"
            if f.side in ("left", "right") and f.kind in ("Pleural Effusion", "Pneumothorax", "Fracture"):
                assert f.side in text
        if labels["Pleural Effusion"] == 1:
            assert "effusion" in text
        if labels["Pneumothorax"] == 0:
            assert re.search(r"no (pleural effusion or )?pneumothorax|no pneumothorax", text)
        if labels["Pneumothorax"] == 1:
            assert "pneumothorax" in text and not text.startswith("no pneumothorax")
        if labels["Cardiomegaly"] == 1:
            assert "cardiomegaly" in text or "enlarge" in text
        if labels["Pneumonia"] == -1:
            assert re.search(r"may represent|cannot be excluded|possibly", text)
        pathology = [k for k in CHEXPERT_14 if k not in (NO_FINDING, SUPPORT_DEVICES)]
        has_pathology = any(labels[k] in (1, -1) for k in pathology)
        assert (labels[NO_FINDING] == 1) == (not has_pathology)
        if labels[SUPPORT_DEVICES] == 1:
            assert re.search(r"tube|catheter|line|pacemaker|pacing", text)


def test_dicom_output_goes_through_the_dicom_path(tmp_path: Path):
    out = tmp_path / "dcm"
    cfg = load_config("synth", overrides=[f"out={out}", "n=3", "size=64", "format=dicom", "workers=1"])
    generate_dataset(cfg, progress=False)
    ds = read_manifest(out)
    for row in ds:
        img, info = load_image(row["images"][0])
        assert info.format == "dicom" and info.source_mode == "MONOCHROME2" and info.bits == 12
        assert info.dicom["PatientSex"] == row["sex"] and img.shape == (64, 64)


def test_pixel_baseline_runs(tmp_path: Path):
    from radgen.jobs.baselines import format_probe_table, pixel_baseline

    out = tmp_path / "pb"
    cfg = load_config("synth", overrides=[f"out={out}", "n=120", "size=64", "seed=3",
                                          "splits.train=0.6", "splits.validate=0.2", "splits.test=0.2"])
    generate_dataset(cfg, progress=False)
    results = pixel_baseline(out, size=16, n_resamples=50, progress=False)
    names = {r.target for r in results}
    assert "sex (F)" in names
    for r in results:
        assert 0.0 <= r.auroc <= 1.0 and r.n_test <= 48  # uncertain rows are dropped per target
    assert next(r for r in results if r.target == "sex (F)").n_test == 48
    assert "AUROC" in format_probe_table(results)
