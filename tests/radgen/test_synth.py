"""The synthetic generator: labels match what is drawn, reports match labels, determinism."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from eval.chexpert.observations import CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES
from radgen.config import ConfigError, load_config
from radgen.data.images import load_image
from radgen.data.manifest import read_manifest
from radgen.data.synth.case import CTR_THRESHOLD, Finding
from radgen.data.synth.generate import generate_dataset, make_example, sample_example_case
from radgen.data.synth.phantom import MASK_HEART, MASK_LEFT_LUNG, MASK_RIGHT_LUNG, render
from radgen.data.synth.report import write_report


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


def _midline_col(mask: np.ndarray) -> float:
    """Midline of the thorax: halfway between the lateral lung borders."""
    right = np.nonzero(mask == MASK_RIGHT_LUNG)[1]
    left = np.nonzero(mask == MASK_LEFT_LUNG)[1]
    return (right.min() + left.max()) / 2


def test_cardiomegaly_label_matches_measured_ctr():
    """Cardiothoracic ratio measured on the masks the way a radiologist does it (transverse
    cardiac diameter / widest internal thoracic diameter) is above 0.5 exactly when labelled."""
    seen = {True: 0, False: 0}
    for i in range(60):
        _, rendered, _, _, labels = make_example(11, i, 192, prevalence_scale=2.0)
        cols = np.nonzero(rendered.mask == MASK_HEART)[1]
        thorax = np.isin(rendered.mask, [MASK_RIGHT_LUNG, MASK_LEFT_LUNG, MASK_HEART])
        ctr = (cols.max() - cols.min() + 1) / _max_row_width(thorax)
        positive = labels["Cardiomegaly"] == 1
        assert (ctr > CTR_THRESHOLD) == positive, f"example {i}: measured CTR {ctr:.3f}, label {labels['Cardiomegaly']}"
        seen[positive] += 1
    assert seen[True] >= 5 and seen[False] >= 5


def test_heart_sits_two_thirds_left_and_overlaps_the_medial_lungs():
    for i in range(20):
        _, r, _, _, _ = make_example(3, i, 160)
        m = r.mask
        heart = m == MASK_HEART
        mid = _midline_col(m)
        cols = np.nonzero(heart)[1]
        left_share = (cols > mid).mean()  # image right = the patient's left
        assert cols.mean() > mid and 0.5 < left_share < 0.9, (i, left_share)
        # The silhouette borders lung on both sides (right atrial and left ventricular borders):
        # a dilated heart touches both lung masks, and lung lies above and lateral to it.
        grown = ndimage.binary_dilation(heart, iterations=2)
        assert (grown & (m == MASK_RIGHT_LUNG)).sum() > 5 and (grown & (m == MASK_LEFT_LUNG)).sum() > 5
        rows = np.nonzero(heart)[0]
        lung_rows = np.nonzero(np.isin(m, [MASK_RIGHT_LUNG, MASK_LEFT_LUNG]))[0]
        assert lung_rows.min() < rows.min() < lung_rows.max()


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


def test_right_hemidiaphragm_is_usually_higher():
    higher = 0
    n = 40
    for i in range(n):
        _, r, _, _, _ = make_example(4, i, 128)
        rows_r = np.nonzero(r.mask == MASK_RIGHT_LUNG)[0]
        rows_l = np.nonzero(r.mask == MASK_LEFT_LUNG)[0]
        higher += rows_r.max() < rows_l.max()  # lowest lung pixel = the dome / angle
    assert higher >= 0.8 * n, f"right dome higher in {higher}/{n}"


_FINDING_SPECS = {
    "Pleural Effusion": dict(side="right", severity="moderate"),
    "Pneumothorax": dict(side="left", severity="moderate"),
    "Consolidation": dict(side="right", location="right lower lobe", severity="lobar"),
    "Atelectasis": dict(side="left", severity="plate-like"),
    "Edema": dict(side="bilateral", severity="moderate"),
    "Lung Lesion": dict(side="left", severity="mass", size_cm=4.0, extra={"zone": "mid", "u": 0.5}),
    "Fracture": dict(side="right", severity="displaced", location="6th rib", extra={"rib": 6}),
    "Pleural Other": dict(side="right", severity="thickening"),
}


def test_sample_example_case_redraws_the_case_of_make_example():
    # An analysis redraws a set's cases without rendering them (docs/experiments/nuisance.py):
    # the case, and the generator's state after it, must be make_example's exactly.
    for seed, index in [(0, 0), (1, 7), (21, 3)]:
        made, _, findings, impression, labels = make_example(seed, index, 32, prevalence_scale=2.0)
        case, rng = sample_example_case(seed, index, prevalence_scale=2.0)
        assert repr(case) == repr(made)
        assert write_report(case, rng) == (findings, impression, labels)
    assert repr(sample_example_case(0, 1)[0]) != repr(sample_example_case(0, 0)[0])


def _with_only(case, findings):
    case = copy.deepcopy(case)
    case.findings = findings
    return case


@pytest.mark.parametrize("kind", sorted(_FINDING_SPECS))
def test_each_finding_shows_its_sign_where_it_is_drawn(kind: str):
    case, _, _, _, _ = make_example(5, 3, 160)
    clean = render(_with_only(case, []), 160).image
    sick_r = render(_with_only(case, [Finding(kind, **_FINDING_SPECS[kind])]), 160)
    sick = sick_r.image
    region = sick_r.regions[kind]
    assert region.sum() >= 8, f"{kind}: drawn region too small"
    # A large finding can move the exposure recognition (auto-ranging) of the whole film, as on
    # CR: allow for that global linear re-mapping, fitted outside the region, before differencing.
    a, b = np.polyfit(clean[~region], sick[~region], 1)
    diff = sick - (a * clean + b)
    # Then the rest of the film is untouched: changes concentrate in the drawn region.
    assert np.abs(diff[region]).mean() > 3 * np.abs(diff[~region]).mean(), kind
    if kind in ("Pleural Effusion", "Consolidation", "Edema", "Lung Lesion", "Atelectasis", "Pleural Other"):
        assert diff[region].mean() > 0.02, f"{kind} should add opacity where drawn"
    if kind == "Fracture":  # the cortical gap is darker than the intact rib
        assert diff[region].mean() < 0
    if kind == "Pneumothorax":
        # Darker, no lung markings beyond the visceral pleural line, and the line itself is a
        # fine white line: brighter than the pleural space just outside it.
        assert diff[region].mean() < -0.02
        before = render(_with_only(case, []), 160).markings
        inner = ndimage.binary_erosion(region, iterations=2)  # off the anti-aliased edge
        assert np.abs(sick_r.markings[inner]).max() < 1e-3 < np.abs(before[inner]).mean()
        line = ndimage.binary_dilation(region, iterations=2) & ~region & (sick_r.mask == MASK_LEFT_LUNG)
        beyond = region & ndimage.binary_dilation(line, iterations=3) & ~line  # the space next to it
        assert sick[line].mean() > sick[beyond].mean()


def test_devices_tips_where_the_labels_say():
    from radgen.data.synth.phantom import CM_PER_UNIT

    case, _, _, _, _ = make_example(6, 1, 256)
    case = copy.deepcopy(case)
    case.rotation_deg, case.yaw_deg = 0.0, 0.0
    for cm in (2.5, 6.0):
        devs = [Finding("Support Devices", severity="ett", extra={"tip_cm_above_carina": cm}),
                Finding("Support Devices", severity="ng_tube"),
                Finding("Support Devices", severity="central_line"),
                Finding("Support Devices", severity="pacemaker")]
        r = render(_with_only(case, devs), 256)
        lm, m = r.landmarks, r.mask
        px_per_cm = 256 * case.scale / 2 / CM_PER_UNIT
        measured = (lm["carina"][0] - lm["ett_tip"][0]) / px_per_cm
        assert measured == pytest.approx(cm, abs=0.3), "ET tube tip distance above the carina"
        mid = _midline_col(m)
        ng_r, ng_c = (int(round(v)) for v in lm["ng_tip"])
        left_dome_row = np.nonzero(m[:, ng_c] == MASK_LEFT_LUNG)[0].max()
        assert ng_c > mid and ng_r > left_dome_row, "NG tip under the left hemidiaphragm (stomach)"
        cv_r, cv_c = lm["cvc_tip"]
        heart_rows = np.nonzero(m == MASK_HEART)[0]
        assert cv_c < mid and lm["carina"][0] < cv_r < heart_rows.mean(), "CVC tip in the lower SVC"
        lr, lc = (int(round(v)) for v in lm["lead_tip"])
        assert m[lr, lc] == MASK_HEART, "pacing lead tip inside the cardiac silhouette (RV apex)"
        # The wires and tubes are radio-opaque: brighter than the same pixels without devices.
        plain = render(_with_only(case, []), 256).image
        assert r.image[lr, lc] > plain[lr, lc] - 0.05


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
    # Bone density falls with age: ribs over the lungs lose contrast (fine texture in the lungs).
    texture = []
    for density in (1.2, 0.5):
        case.bone_density = density
        r = render(case, 128)
        lungs = np.isin(r.mask, [MASK_RIGHT_LUNG, MASK_LEFT_LUNG])
        texture.append((r.image - ndimage.gaussian_filter(r.image, 3.0))[lungs].std())
    assert texture[0] > 1.05 * texture[1]


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
    from radgen.pixel_baseline import format_probe_table, pixel_baseline

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
