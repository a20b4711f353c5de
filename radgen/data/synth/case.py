"""Sampling a synthetic patient: anatomy, acquisition and findings (no pixels here).

A :class:`Case` holds every random choice for one image, so rendering (``phantom.py``) and report
writing (``report.py``) are pure functions of it. Findings co-occur through a latent clinical
setting (outpatient / inpatient / ICU) and simple dependencies (edema with cardiomegaly, effusion
with edema, pneumothorax with rib fracture, devices in the ICU), so prevalences look like a
hospital population rather than independent coin flips.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Thresholds that define the labels; the renderer draws geometry on the right side of them with a
# margin, so a measurement on the masks recovers the label.
CTR_THRESHOLD = 0.50  # cardiothoracic ratio above which Cardiomegaly is labelled
MEDIASTINAL_THRESHOLD = 0.30  # upper-mediastinal width / thoracic width for Enlarged CM


@dataclass
class Finding:
    """One drawn abnormality. ``kind`` is a CheXpert observation or a device type."""

    kind: str
    side: str | None = None  # "right" | "left" | "bilateral" | None
    severity: str | None = None  # "small"/"moderate"/"large", "mild"/..., etc.
    location: str | None = None  # lobe / zone
    size_cm: float | None = None
    uncertain: bool = False  # reported with hedging -> CheXpert label -1
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """Everything random about one synthetic radiograph."""

    sex: str  # "M" | "F"
    age: int
    setting: str  # "outpatient" | "inpatient" | "icu"
    view: str  # "PA" | "AP"
    # Anatomy (body coordinates: thorax centred at 0, x to the image right = patient's left).
    thorax_halfwidth: float
    body_margin: float  # soft tissue beyond the ribs (habitus)
    apex_y: float
    dome_y_right: float
    dome_y_left: float
    dome_height: float
    ctr: float
    mediastinal_ratio: float
    heart_height: float
    heart_tilt_deg: float  # long axis of the left ventricle, from horizontal
    aortic_knob_r: float
    aortic_calcification: bool
    bone_density: float
    breast_size: float  # 0 for none
    n_marking_seeds: int
    # Acquisition / pose / processing.
    scale: float  # field of view: body units per half image side, inverted
    shift: tuple[float, float]
    rotation_deg: float  # in-plane tilt of the image
    aspect: float
    yaw_deg: float  # patient rotation about the vertical axis: anterior structures shift sideways
    depth_cm: float  # antero-posterior diameter of the chest
    supine: bool  # AP supine (ICU): effusions layer posteriorly
    arms_up: bool  # arms out of the field (PA) vs at the sides with humeral heads in view
    kvp: float  # relative beam energy: >1 lowers bone and soft-tissue contrast
    photons: float  # unattenuated quanta per pixel at 256 px (quantum noise)
    scatter: float  # scatter-to-primary fraction reaching the detector
    range_compression: float  # CR/DX multi-scale processing: large-scale range reduction
    detail_gain: float  # CR/DX processing: mid-frequency enhancement
    tone_slope: float  # sigmoid tone curve steepness
    tone_centre: float
    fine_unsharp: float  # small-kernel edge enhancement
    gastric_bubble: float  # radius of the stomach air (body units), 0 for none
    collimation: tuple[float, float, float, float]  # left, right, top, bottom borders (fraction)
    collimation_white: bool
    marker: str | None  # "L" | "R" | None
    marker_corner: int
    findings: list[Finding] = field(default_factory=list)
    seed: int = 0

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.findings)

    def get(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict:
        return asdict(self)


DEVICE_KINDS = ("ett", "ng_tube", "central_line", "pacemaker")


def _side(rng: np.random.Generator, p_bilateral: float = 0.0) -> str:
    if rng.random() < p_bilateral:
        return "bilateral"
    return "right" if rng.random() < 0.5 else "left"


def sample_case(rng: np.random.Generator, prevalence_scale: float = 1.0, seed: int = 0) -> Case:
    """Draw one synthetic patient.

    Args:
        rng: the case's own generator (one per image, so output is independent of worker count).
        prevalence_scale: multiplies every finding probability (1.0 = the built-in population).
    """
    setting = rng.choice(["outpatient", "inpatient", "icu"], p=[0.55, 0.30, 0.15])
    sex = "F" if rng.random() < 0.5 else "M"
    age_mean = {"outpatient": 52, "inpatient": 63, "icu": 64}[setting]
    age = int(np.clip(rng.normal(age_mean, 16), 18, 95))
    p_ap = {"outpatient": 0.08, "inpatient": 0.5, "icu": 0.95}[setting]
    view = "AP" if rng.random() < p_ap else "PA"
    supine = bool(view == "AP" and (setting == "icu" or rng.random() < 0.3))
    ps = prevalence_scale
    old = max(0.0, (age - 50) / 40)
    icu, inp = setting == "icu", setting == "inpatient"

    def p(base: float) -> bool:
        return rng.random() < min(0.95, base * ps)

    findings: list[Finding] = []
    cardiomegaly = p(0.10 + 0.10 * inp + 0.15 * icu + 0.12 * old)
    edema = p(0.02 + 0.25 * cardiomegaly + 0.06 * icu)
    effusion = p(0.04 + 0.20 * edema + 0.10 * cardiomegaly + 0.10 * icu)
    consolidation = p(0.05 + 0.08 * inp + 0.12 * icu)
    atelectasis = p(0.04 + 0.12 * icu + 0.15 * effusion + 0.04 * inp)
    fracture = p(0.03 + 0.04 * icu + 0.03 * old)
    pneumothorax = p(0.015 + 0.05 * icu + 0.30 * fracture)
    lesion = p(0.03 + 0.06 * old)
    enlarged_cm = p(0.03 + 0.06 * old + 0.04 * icu)
    pleural_other = p(0.02 + 0.03 * old)
    devices = p({"outpatient": 0.02, "inpatient": 0.25, "icu": 0.85}[setting])

    # --- anatomy -----------------------------------------------------------------------------
    male = sex == "M"
    thorax_halfwidth = float(rng.normal(0.79 if male else 0.76, 0.04))
    body_margin = float(np.clip(rng.normal(0.16, 0.06), 0.06, 0.35))
    inspiration = rng.normal(0.0, 0.05) - (0.06 if view == "AP" else 0.0)  # + = deeper breath
    apex_y = float(rng.normal(-0.74, 0.03))
    dome_y_right = float(0.40 + inspiration + rng.normal(0, 0.02))
    dome_y_left = float(dome_y_right + 0.05 + rng.normal(0, 0.015))
    if cardiomegaly:
        ctr = float(0.515 + rng.beta(1.2, 3.0) * 0.17)  # mostly mild, as in practice
    else:
        ctr = float(np.clip(rng.normal(0.45, 0.03), 0.36, 0.485))
    if enlarged_cm:
        mediastinal_ratio = float(rng.uniform(0.34, 0.42))
    else:
        mediastinal_ratio = float(np.clip(rng.normal(0.23, 0.02), 0.17, 0.27))
    bone_density = float(np.clip(1.15 - 0.008 * (age - 20) + rng.normal(0, 0.06), 0.45, 1.3))
    aortic_knob_r = float(0.045 + 0.0006 * (age - 20) + abs(rng.normal(0, 0.006)))
    aortic_calcification = bool(rng.random() < np.clip((age - 45) / 45, 0, 0.85))
    breast_size = float(rng.uniform(0.3, 1.1)) if not male else (
        float(rng.uniform(0.15, 0.3)) if rng.random() < 0.1 else 0.0
    )

    # --- acquisition -------------------------------------------------------------------------
    scale = float(rng.uniform(0.85, 1.2))
    shift = (float(np.clip(rng.normal(0, 0.05), -0.15, 0.15)), float(np.clip(rng.normal(0.1, 0.06), -0.05, 0.25)))
    rotation_deg = float(np.clip(rng.normal(0, 2.5), -8, 8))
    aspect = float(rng.uniform(0.9, 1.12))
    coll = tuple(float(x) for x in (rng.uniform(0, 0.08, 4) * (rng.random(4) < 0.2)))
    marker = None if rng.random() < 0.4 else str(rng.choice(["L", "R"]))

    # --- findings with their descriptors ------------------------------------------------------
    if cardiomegaly:
        sev = "mild" if ctr < 0.58 else ("moderate" if ctr < 0.64 else "severe")
        findings.append(Finding("Cardiomegaly", severity=sev))
    if enlarged_cm:
        findings.append(Finding("Enlarged Cardiomediastinum"))
    if edema:
        sev = str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.4, 0.15]))
        findings.append(Finding("Edema", side="bilateral", severity=sev,
                                uncertain=sev == "mild" and rng.random() < 0.35))
    if effusion:
        side = _side(rng, p_bilateral=0.35 if edema else 0.15)
        sev = str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        findings.append(Finding("Pleural Effusion", side=side, severity=sev,
                                uncertain=sev == "small" and rng.random() < 0.2))
    if consolidation:
        side = _side(rng, p_bilateral=0.1)
        lobes = {"right": ["right upper lobe", "right middle lobe", "right lower lobe"],
                 "left": ["left upper lobe", "left lower lobe"]}
        loc = "bilateral lower lobes" if side == "bilateral" else str(rng.choice(lobes[side]))
        pattern = str(rng.choice(["lobar", "patchy"]))
        findings.append(Finding("Consolidation", side=side, location=loc, severity=pattern))
        if rng.random() < 0.6:  # the reader calls it pneumonia, often hedged
            findings.append(Finding("Pneumonia", side=side, location=loc,
                                    uncertain=rng.random() < 0.5))
    if atelectasis:
        side = _side(rng, p_bilateral=0.3)
        findings.append(Finding("Atelectasis", side=side, severity="plate-like",
                                location="base", uncertain=rng.random() < 0.15))
    if lesion:
        side = _side(rng)
        is_mass = rng.random() < 0.25
        size = float(rng.uniform(3.5, 6.0) if is_mass else rng.uniform(1.0, 2.6))
        zone = str(rng.choice(["upper", "mid", "lower"]))
        findings.append(Finding("Lung Lesion", side=side, severity="mass" if is_mass else "nodule",
                                location=f"{side} {zone} lung zone", size_cm=round(size, 1),
                                extra={"zone": zone, "u": float(rng.uniform(0.3, 0.75))}))
    if pneumothorax:
        side = _side(rng)
        sev = str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        findings.append(Finding("Pneumothorax", side=side, severity=sev,
                                uncertain=sev == "small" and rng.random() < 0.15))
    if fracture:
        side = _side(rng)
        rib = int(rng.integers(4, 9))
        findings.append(Finding("Fracture", side=side, location=f"{_ordinal(rib)} rib",
                                severity=str(rng.choice(["displaced", "nondisplaced"])),
                                extra={"rib": rib}))
    if pleural_other:
        side = _side(rng, p_bilateral=0.4)
        findings.append(Finding("Pleural Other", side=side, severity="thickening"))
    if devices:
        kinds = []
        if icu and rng.random() < 0.7:
            kinds.append("ett")
        if (icu and rng.random() < 0.6) or ("ett" in kinds and rng.random() < 0.5):
            kinds.append("ng_tube")
        if rng.random() < (0.7 if icu else 0.4):
            kinds.append("central_line")
        if rng.random() < (0.1 if icu else 0.35) + 0.2 * old:
            kinds.append("pacemaker")
        if not kinds:
            kinds.append(str(rng.choice(["central_line", "pacemaker"])))
        for k in kinds:
            extra = {}
            if k == "ett":
                extra["tip_cm_above_carina"] = round(float(rng.uniform(2.5, 6.5)), 1)
            findings.append(Finding("Support Devices", severity=k, extra=extra))

    return Case(
        sex=sex, age=age, setting=str(setting), view=view,
        thorax_halfwidth=thorax_halfwidth, body_margin=body_margin, apex_y=apex_y,
        dome_y_right=dome_y_right, dome_y_left=dome_y_left,
        dome_height=float(rng.uniform(0.08, 0.14)),
        ctr=ctr, mediastinal_ratio=mediastinal_ratio,
        heart_height=float(rng.uniform(0.22, 0.28)),
        heart_tilt_deg=float(rng.uniform(20, 40)),
        aortic_knob_r=aortic_knob_r, aortic_calcification=aortic_calcification,
        bone_density=bone_density, breast_size=breast_size,
        n_marking_seeds=int(rng.integers(0, 2**31 - 1)),
        scale=scale, shift=shift, rotation_deg=rotation_deg, aspect=aspect,
        yaw_deg=float(np.clip(rng.normal(0, 3.0), -9, 9)),
        depth_cm=float(np.clip(rng.normal(21.5 if male else 19.5, 2.0), 15, 28) + 20 * (body_margin - 0.16)),
        supine=supine, arms_up=bool(view == "PA" and rng.random() < 0.85),
        kvp=float(rng.uniform(0.85, 1.2)),
        photons=float(np.exp(rng.uniform(np.log(5e4), np.log(8e5)))),
        scatter=float(rng.uniform(0.25, 0.6) if view == "PA" else rng.uniform(0.5, 1.0)),
        range_compression=float(rng.uniform(0.45, 0.9)), detail_gain=float(rng.uniform(0.4, 1.5)),
        tone_slope=float(rng.uniform(2.5, 5.5)), tone_centre=float(rng.uniform(0.45, 0.65)),
        fine_unsharp=float(rng.uniform(0.0, 0.5)),
        gastric_bubble=float(rng.uniform(0.05, 0.13)) if rng.random() < 0.75 else 0.0,
        collimation=coll, collimation_white=bool(rng.random() < 0.5),
        marker=marker, marker_corner=int(rng.integers(0, 4)),
        findings=findings, seed=seed,
    )


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
