"""Measure a CheXpert report labeler on real reports: the IU X-ray (Open-i) development split.

The IU file (``../shared/data/reports/iu_xray_dev.csv``) has, per report, ``uid``, ``findings``,
``impression`` and hand-made gold labels (1 = present, 0 = not) for the 14 ChestX-ray14 findings
plus ``normal`` (NegBio gold standard, Peng et al. 2018). The labeler reads the findings and the
impression together (joined by a line break, so each keeps its own sentence ends) and its CheXpert
output is compared with the gold labels after the mapping below.

Mapping of the IU gold findings onto CheXpert observations

| IU gold finding(s)      | CheXpert observation | in micro F1 | why |
|-------------------------|----------------------|-------------|-----|
| Atelectasis             | Atelectasis          | yes | same concept |
| Cardiomegaly            | Cardiomegaly         | yes | same concept |
| Effusion                | Pleural Effusion     | yes | same concept |
| Mass OR Nodule          | Lung Lesion          | yes | CheXpert folds masses and nodules into Lung Lesion; gold = 1 if either is 1 |
| Pneumonia               | Pneumonia            | yes | same concept |
| Pneumothorax            | Pneumothorax         | yes | same concept |
| Consolidation           | Consolidation        | yes | same concept |
| Edema                   | Edema                | yes | same concept |
| Pleural_Thickening      | Pleural Other        | yes | pleural thickening is the main member of Pleural Other |
| Infiltration            | Lung Opacity         | no (shown) | CheXpert's Lung Opacity also covers every opacity, airspace disease and scarring, the IU gold marks only "infiltrate" wording, so a disagreement measures the definitions, not the labeler |
| normal                  | No Finding           | no (shown) | IU "normal" = no abnormality at all (a granuloma or scoliosis makes it 0); CheXpert No Finding only looks at the 13 other observations |
| Emphysema, Fibrosis, Hernia | —                | excluded | no CheXpert counterpart |
| —                       | Enlarged Cardiomediastinum, Fracture, Support Devices | excluded | no IU gold column |

Binarisation: labeler output 1 is "present"; 0 and not-mentioned are "absent". Uncertain (-1) is
the open question, and the gold answers it by wording: the IU annotators marked a finding present
when the report *names* it, alone or as one of several alternatives ("atelectasis or scarring",
"effusion versus thickening"), and absent when the report only *raises it as a possibility*
("may represent atelectasis", "possible pneumonia", "concerning for pneumonia"). CheXpert's
single -1 value merges those two. On the dev split, of the (report, observation) pairs that
``RuleLabeler`` marks -1 in the nine micro rows, 81 of 89 "named alternative" ones are gold-present
and only 25 of 157 "hedged" ones are. Three policies are computed:

| policy         | uncertain (-1) counted as | needs |
|----------------|---------------------------|-------|
| ``present``      | present | any labeler |
| ``absent``       | absent  | any labeler |
| ``alternatives`` | present when the labeler says the -1 comes only from a named alternative, otherwise absent | a labeler with ``label_with_alternatives`` (``RuleLabeler``) |

``uncertain="auto"`` (the default) uses ``alternatives`` when the labeler offers it and ``present``
otherwise; ``micro`` always carries the F1 of the two labeler-agnostic policies as well, so two
labelers can be compared on the same footing (``f1_uncertain_present``, ``f1_uncertain_absent``).

Micro F1 pools true/false positives and false negatives over the nine "in micro F1" rows only.

Measured on the dev split (1,925 reports) with ``RuleLabeler`` ("rules-v1"): micro F1 0.938
(alternatives policy; precision 0.942, recall 0.934), 0.864 with uncertain = present, 0.864 with
uncertain = absent. Another split of the collection is kept aside to measure the labeler; the
rules were written as general clinical language, not per report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from eval.chexpert.observations import CHEXPERT_14

__all__ = [
    "IU_EXCLUDED",
    "IU_MAPPING",
    "POLICIES",
    "evaluate_labeler_on_iu",
    "format_table",
    "load_iu_reports",
]

# CheXpert observation -> (IU gold columns OR-ed together, counted in micro F1?)
IU_MAPPING: dict[str, tuple[tuple[str, ...], bool]] = {
    "Atelectasis": (("Atelectasis",), True),
    "Cardiomegaly": (("Cardiomegaly",), True),
    "Pleural Effusion": (("Effusion",), True),
    "Lung Lesion": (("Mass", "Nodule"), True),
    "Pneumonia": (("Pneumonia",), True),
    "Pneumothorax": (("Pneumothorax",), True),
    "Consolidation": (("Consolidation",), True),
    "Edema": (("Edema",), True),
    "Pleural Other": (("Pleural_Thickening",), True),
    "Lung Opacity": (("Infiltration",), False),
    "No Finding": (("normal",), False),
}
# IU gold columns with no CheXpert counterpart.
IU_EXCLUDED: tuple[str, ...] = ("Emphysema", "Fibrosis", "Hernia")

Labeler = Callable[[Sequence[str]], np.ndarray]


def load_iu_reports(csv_path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """IU CSV -> (report texts = findings + newline + impression, {gold column: (N,) 0/1 array})."""
    import pandas as pd  # local: only this loader needs pandas

    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"IU report file not found: {path}")
    df = pd.read_csv(path, dtype={"findings": str, "impression": str}, keep_default_na=False)
    needed = {"findings", "impression"} | {c for cols, _ in IU_MAPPING.values() for c in cols}
    missing = sorted(needed - set(df.columns))
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    texts = [f"{f.strip()}\n{i.strip()}".strip() for f, i in zip(df["findings"], df["impression"])]
    gold = {}
    for col in sorted(needed - {"findings", "impression"}):
        vals = df[col].to_numpy()
        if not np.isin(vals, (0, 1)).all():
            raise ValueError(f"{path}: column {col!r} must hold only 0/1 gold labels")
        gold[col] = vals.astype(int)
    return texts, gold


POLICIES = ("present", "absent", "alternatives")


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _run_labeler(labeler: Labeler, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels (N, 14), alternatives mask or None when the labeler has no such output)."""
    want = (len(texts), len(CHEXPERT_14))
    if hasattr(labeler, "label_with_alternatives"):
        labels, alternatives = labeler.label_with_alternatives(texts)
        alternatives = np.asarray(alternatives, dtype=bool)
    else:
        labels, alternatives = labeler(texts), None
    labels = np.asarray(labels, dtype=float)
    if labels.shape != want or (alternatives is not None and alternatives.shape != want):
        name = getattr(labeler, "name", labeler)
        raise ValueError(f"labeler {name!r} returned shape {labels.shape}, expected {want}")
    return labels, alternatives


def _present(col: np.ndarray, alt: np.ndarray | None, policy: str) -> np.ndarray:
    """Binarise one label column under an uncertainty policy."""
    if policy == "present":
        return (col == 1) | (col == -1)
    if policy == "absent":
        return col == 1
    assert alt is not None
    return (col == 1) | ((col == -1) & alt)


def evaluate_labeler_on_iu(
    csv_path: str | Path, labeler: Labeler | None = None, uncertain: str = "auto"
) -> tuple[list[dict], dict]:
    """Label the IU reports and score them against the mapped gold.

    ``uncertain``: "auto", "present", "absent" or "alternatives" (see the module docstring).
    Returns ``rows`` — one dict per mapped observation: chexpert, iu, support, in_micro, and for
    the chosen policy tp, fp, fn, precision, recall, f1, plus f1_uncertain_present and
    f1_uncertain_absent — and ``micro``: precision, recall, f1 over the in-micro rows for the
    chosen policy, f1_uncertain_present, f1_uncertain_absent, uncertain_policy, n_reports, labeler.
    """
    if uncertain not in ("auto",) + POLICIES:
        raise ValueError(f"uncertain must be 'auto' or one of {POLICIES}, got {uncertain!r}")
    if labeler is None:
        from eval.chexpert.labeler import RuleLabeler

        labeler = RuleLabeler()
    texts, gold = load_iu_reports(csv_path)
    labels, alternatives = _run_labeler(labeler, texts)
    policy = uncertain if uncertain != "auto" else ("alternatives" if alternatives is not None else "present")
    if policy == "alternatives" and alternatives is None:
        raise ValueError("uncertain='alternatives' needs a labeler with label_with_alternatives()")
    policies = [policy] + [p for p in ("present", "absent") if p != policy]
    totals = {p: np.zeros(3, int) for p in policies}
    rows: list[dict] = []
    for obs, (cols, in_micro) in IU_MAPPING.items():
        g = np.zeros(len(texts), bool)
        for c in cols:
            g |= gold[c] == 1
        j = CHEXPERT_14.index(obs)
        row: dict = {"chexpert": obs, "iu": " + ".join(cols), "support": int(g.sum()), "in_micro": in_micro}
        for pol in policies:
            pred = _present(labels[:, j], None if alternatives is None else alternatives[:, j], pol)
            counts = np.array([(pred & g).sum(), (pred & ~g).sum(), (~pred & g).sum()])
            if in_micro:
                totals[pol] += counts
            prec, rec, f1 = _prf(*counts)
            if pol == policy:
                row.update(tp=int(counts[0]), fp=int(counts[1]), fn=int(counts[2]),
                           precision=prec, recall=rec, f1=f1)
            if pol in ("present", "absent"):
                row[f"f1_uncertain_{pol}"] = f1
        rows.append(row)
    p, r, f = _prf(*totals[policy])
    micro = {
        "precision": p,
        "recall": r,
        "f1": f,
        "f1_uncertain_present": _prf(*totals["present"])[2],
        "f1_uncertain_absent": _prf(*totals["absent"])[2],
        "uncertain_policy": policy,
        "n_reports": len(texts),
        "labeler": getattr(labeler, "name", type(labeler).__name__),
    }
    return rows, micro


def format_table(rows: list[dict], micro: dict) -> str:
    """Markdown table of the per-observation scores, with the micro F1 printed last."""
    lines = [
        f"IU X-ray dev: labeler {micro['labeler']} on {micro['n_reports']} reports (findings + impression), "
        f"uncertain policy '{micro['uncertain_policy']}'",
        "",
        "| CheXpert | IU gold | support | TP | FP | FN | precision | recall | F1 "
        "| F1 (unc.=present) | F1 (unc.=absent) | in micro |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chexpert']} | {r['iu']} | {r['support']} | {r['tp']} | {r['fp']} | {r['fn']} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['f1_uncertain_present']:.3f} | {r['f1_uncertain_absent']:.3f} | "
            f"{'yes' if r['in_micro'] else 'no'} |"
        )
    lines += [
        "",
        f"micro precision {micro['precision']:.3f}, recall {micro['recall']:.3f}; "
        f"micro F1 with uncertain = present {micro['f1_uncertain_present']:.3f}, "
        f"= absent {micro['f1_uncertain_absent']:.3f}",
        f"micro F1 ({micro['uncertain_policy']}): {micro['f1']:.3f}",
    ]
    return "\n".join(lines)
