"""A small grammar that writes the findings section of a report from a :class:`Case`.

Each sentence generator returns its text together with the CheXpert labels that the sentence
asserts (1 positive, 0 negative, -1 uncertain), so the label vector is exactly what the report
says: an observation that no sentence mentions stays blank (``None``), as in the CheXpert
convention. Phrasing varies (synonyms, word order, optional pertinent negatives) the way
radiologists' does.
"""

from __future__ import annotations

import numpy as np

from eval.chexpert.observations import CHEXPERT_14, NO_FINDING, SUPPORT_DEVICES
from radgen.data.synth.case import Case

Labels = dict[str, "int | None"]
PARENCHYMAL = ("Consolidation", "Pneumonia", "Atelectasis", "Edema", "Lung Lesion")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _side_words(side: str | None) -> str:
    return {"right": "right", "left": "left", "bilateral": "bilateral"}.get(side or "", "")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _devices(c: Case, rng) -> list[tuple[str, Labels]]:
    out = []
    for f in c.get("Support Devices"):
        k = f.severity
        if k == "ett":
            d = f.extra.get("tip_cm_above_carina", 4.0)
            t = _pick(rng, [f"Endotracheal tube terminates {d} cm above the carina.",
                            f"The endotracheal tube tip is approximately {d} cm above the carina.",
                            f"ET tube in standard position, {d} cm above the carina."])
        elif k == "ng_tube":
            t = _pick(rng, ["Enteric tube courses below the diaphragm with tip in the stomach.",
                            "Nasogastric tube extends into the stomach.",
                            "An orogastric tube is seen with its tip in the stomach."])
        elif k == "central_line":
            t = _pick(rng, ["Right internal jugular central venous catheter terminates in the lower SVC.",
                            "Right-sided central line with tip in the superior vena cava.",
                            "A right subclavian catheter ends at the cavoatrial junction."])
        else:
            t = _pick(rng, ["Left chest wall pacemaker with lead terminating in the right ventricle.",
                            "Left-sided pacing device with a single lead in the right ventricle.",
                            "A left pectoral pacemaker is present; the lead is in expected position."])
        out.append((t, {SUPPORT_DEVICES: 1}))
    return out


def _heart_mediastinum(c: Case, rng) -> list[tuple[str, Labels]]:
    out = []
    card = c.get("Cardiomegaly")
    ecm = c.has("Enlarged Cardiomediastinum")
    if card:
        sev = card[0].severity
        t = {"mild": ["The heart is mildly enlarged.", "Mild cardiomegaly."],
             "moderate": ["Moderate cardiomegaly.", "The cardiac silhouette is moderately enlarged."],
             "severe": ["Marked enlargement of the cardiac silhouette.", "Severe cardiomegaly."]}[sev]
        out.append((_pick(rng, t), {"Cardiomegaly": 1}))
    if ecm:
        out.append((_pick(rng, ["The mediastinum is widened.", "Widened mediastinal contour.",
                                "The upper mediastinum appears enlarged."]),
                    {"Enlarged Cardiomediastinum": 1}))
    if not card and not ecm:
        r = rng.random()
        if r < 0.45:
            out.append((_pick(rng, ["Heart size is normal.", "Normal heart size.",
                                    "The cardiac silhouette is within normal limits."]),
                        {"Cardiomegaly": 0}))
            if rng.random() < 0.6:
                out.append((_pick(rng, ["Mediastinal contours are normal.",
                                        "The mediastinum is unremarkable."]),
                            {"Enlarged Cardiomediastinum": 0}))
        elif r < 0.9:
            out.append((_pick(rng, ["The cardiomediastinal silhouette is within normal limits.",
                                    "Normal cardiomediastinal silhouette.",
                                    "Heart size and mediastinal contours are normal."]),
                        {"Enlarged Cardiomediastinum": 0, "Cardiomegaly": 0}))
    elif not card:
        out.append(("Heart size is normal.", {"Cardiomegaly": 0}))
    if c.aortic_calcification and rng.random() < 0.6:
        out.append((_pick(rng, ["Atherosclerotic calcification of the aortic knob.",
                                "Calcification of the aortic arch."]), {}))
    return out


def _lungs(c: Case, rng) -> list[tuple[str, Labels]]:
    out: list[tuple[str, Labels]] = []
    for f in c.get("Edema"):
        if f.uncertain:
            t = _pick(rng, ["Possible mild interstitial edema.",
                            "Mild perihilar haziness may reflect early interstitial edema."])
            out.append((t, {"Edema": -1}))
        else:
            t = {"mild": ["Mild interstitial pulmonary edema.",
                          "Mild pulmonary vascular congestion with interstitial edema."],
                 "moderate": ["Moderate pulmonary edema with perihilar haziness and septal lines.",
                              "Moderate interstitial and perihilar edema."],
                 "severe": ["Severe pulmonary edema.",
                            "Extensive bilateral perihilar opacities consistent with severe pulmonary edema."]
                 }[f.severity]
            out.append((_pick(rng, t), {"Edema": 1}))
    pneu = {f.location: f for f in c.get("Pneumonia")}
    for f in c.get("Consolidation"):
        loc = f.location
        if f.severity == "lobar":
            t = _pick(rng, [f"Consolidation in the {loc}", f"Dense airspace consolidation within the {loc}",
                            f"Focal consolidation of the {loc}"])
        else:
            t = _pick(rng, [f"Patchy consolidation in the {loc}",
                            f"Patchy opacities in the {loc} consistent with consolidation"])
        labels: Labels = {"Consolidation": 1}
        p = pneu.get(loc)
        if p is not None:
            if p.uncertain:
                t += _pick(rng, [", which may represent pneumonia", "; pneumonia cannot be excluded",
                                 ", possibly pneumonia"])
                labels["Pneumonia"] = -1
            else:
                t += _pick(rng, [", consistent with pneumonia", " compatible with pneumonia"])
                labels["Pneumonia"] = 1
        out.append((t + ".", labels))
    for f in c.get("Atelectasis"):
        where = "bibasilar" if f.side == "bilateral" else f"{f.side} basilar"
        if f.uncertain:
            t = _pick(rng, [f"Linear opacity at the {f.side if f.side != 'bilateral' else 'lung'} "
                            f"base{'s' if f.side == 'bilateral' else ''}, likely atelectasis.",
                            f"Streaky {where} opacity may represent atelectasis."])
            out.append((t, {"Atelectasis": -1}))
        else:
            t = _pick(rng, [f"Plate-like atelectasis at the {'lung bases' if f.side == 'bilateral' else f.side + ' lung base'}.",
                            f"{_cap(where)} subsegmental atelectasis."])
            out.append((t, {"Atelectasis": 1}))
    for f in c.get("Lung Lesion"):
        noun = f.severity
        t = _pick(rng, [f"A {f.size_cm} cm {noun} in the {f.location}.",
                        f"There is a {f.size_cm} cm {noun} projecting over the {f.location}.",
                        f"{_cap(f.location)} {noun} measuring {f.size_cm} cm."])
        out.append((t, {"Lung Lesion": 1}))
    if not any(c.has(k) for k in PARENCHYMAL):
        r = rng.random()
        if r < 0.35:
            out.append((_pick(rng, ["The lungs are clear.", "Lungs are clear bilaterally."]), {}))
        elif r < 0.7:
            out.append((_pick(rng, ["No focal consolidation.", "There is no focal consolidation."]),
                        {"Consolidation": 0}))
        else:
            out.append((_pick(rng, ["No focal airspace opacity.", "No focal lung opacity."]),
                        {"Lung Opacity": 0}))
        if rng.random() < 0.25:
            out.append(("No pulmonary edema.", {"Edema": 0}))
    elif not c.has("Edema") and rng.random() < 0.3:
        out.append(("No pulmonary edema.", {"Edema": 0}))
    return out


def _pleura(c: Case, rng) -> list[tuple[str, Labels]]:
    out: list[tuple[str, Labels]] = []
    for f in c.get("Pleural Effusion"):
        plural = "s" if f.side == "bilateral" else ""
        if f.uncertain:
            t = _pick(rng, [f"Possible small {_side_words(f.side)} pleural effusion{plural}.",
                            f"Blunting of the {f.side} costophrenic angle may reflect a small effusion."
                            if f.side != "bilateral" else "Possible small bilateral pleural effusions."])
            out.append((t, {"Pleural Effusion": -1}))
        else:
            t = _pick(rng, [f"{_cap(f.severity)} {_side_words(f.side)} pleural effusion{plural}.",
                            f"There {'are' if plural else 'is a'} {f.severity} {_side_words(f.side)} "
                            f"pleural effusion{plural}."])
            out.append((t, {"Pleural Effusion": 1}))
    for f in c.get("Pneumothorax"):
        if f.uncertain:
            out.append((f"Possible tiny {f.side} apical pneumothorax.", {"Pneumothorax": -1}))
        else:
            t = _pick(rng, [f"{_cap(f.severity)} {f.side} pneumothorax.",
                            f"There is a {f.severity} {f.side} pneumothorax.",
                            f"{_cap(f.severity)} {f.side} apical pneumothorax is present."])
            out.append((t, {"Pneumothorax": 1}))
    eff, ptx = c.has("Pleural Effusion"), c.has("Pneumothorax")
    if not eff and not ptx:
        r = rng.random()
        if r < 0.7:
            out.append((_pick(rng, ["No pleural effusion or pneumothorax.",
                                    "There is no pneumothorax or pleural effusion.",
                                    "No pneumothorax or pleural effusion is seen."]),
                        {"Pleural Effusion": 0, "Pneumothorax": 0}))
        elif r < 0.85:
            out.append(("No pneumothorax.", {"Pneumothorax": 0}))
    elif not ptx:
        out.append((_pick(rng, ["No pneumothorax.", "There is no pneumothorax."]), {"Pneumothorax": 0}))
    elif not eff and rng.random() < 0.6:
        out.append(("No pleural effusion.", {"Pleural Effusion": 0}))
    for f in c.get("Pleural Other"):
        where = "Bilateral" if f.side == "bilateral" else _cap(f.side)
        out.append((_pick(rng, [f"{where} pleural thickening.",
                                f"{where} pleural thickening, likely chronic."]), {"Pleural Other": 1}))
    return out


def _bones(c: Case, rng) -> list[tuple[str, Labels]]:
    out: list[tuple[str, Labels]] = []
    for f in c.get("Fracture"):
        t = _pick(rng, [f"Acute {f.severity} fracture of the {f.side} {f.location}.",
                        f"{_cap(f.side)} {f.location} fracture, {f.severity}."])
        out.append((t, {"Fracture": 1}))
    if not c.has("Fracture"):
        r = rng.random()
        if r < 0.35:
            out.append(("No acute osseous abnormality.", {}))
        elif r < 0.55:
            out.append((_pick(rng, ["No displaced rib fracture.", "No acute rib fracture."]),
                        {"Fracture": 0}))
    if c.age >= 65 and rng.random() < 0.3:
        out.append(("Degenerative changes of the thoracic spine.", {}))
    return out


def write_report(c: Case, rng: np.random.Generator) -> tuple[str, str, Labels]:
    """Return ``(findings, impression, labels)`` for a case; labels cover all 14 observations."""
    sentences = _devices(c, rng) + _heart_mediastinum(c, rng) + _lungs(c, rng) + _pleura(c, rng) + _bones(c, rng)
    labels: Labels = {k: None for k in CHEXPERT_14}
    for _, lab in sentences:
        for k, v in lab.items():
            labels[k] = v
    # Lung Opacity is the parent of the parenchymal observations (CheXpert hierarchy).
    paren = [labels[k] for k in PARENCHYMAL if labels[k] in (1, -1)]
    if paren:
        labels["Lung Opacity"] = 1 if 1 in paren else -1
    pathology = [k for k in CHEXPERT_14 if k not in (NO_FINDING, SUPPORT_DEVICES)]
    if not any(labels[k] in (1, -1) for k in pathology):
        labels[NO_FINDING] = 1
    findings = " ".join(t for t, _ in sentences)
    impression = _impression(c, labels)
    return findings, impression, labels


def _impression(c: Case, labels: Labels) -> str:
    if labels[NO_FINDING] == 1:
        return "No acute cardiopulmonary process."
    main = [k.lower() for k in CHEXPERT_14
            if k not in (NO_FINDING, SUPPORT_DEVICES, "Lung Opacity") and labels[k] == 1]
    if not main:
        return "Findings as above."
    return _cap(", ".join(main)) + "."
