"""The 14 CheXpert observations and the label convention shared by every part of radgen.

Label convention (CheXpert, Irvin et al. 2019): ``1`` positive, ``0`` negative, ``-1`` uncertain,
``None`` (blank in CSV) not mentioned.
"""

from __future__ import annotations

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

# Column order as in the CheXpert / MIMIC-CXR label files.
CHEXPERT_14: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# The five "competition" observations used for F1-5.
CHEXPERT_5: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

LABEL_VALUES = (1, 0, -1, None)


def parse_label(value: object) -> int | None:
    """CSV/JSON cell -> 1 / 0 / -1 / None. Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, float):
        if value != value:  # NaN = blank
            return None
        if value in (1.0, 0.0, -1.0):
            return int(value)
    if isinstance(value, bool):
        raise ValueError(f"label must be 1, 0, -1 or blank, got {value!r}")
    if isinstance(value, int) and value in (1, 0, -1):
        return value
    if isinstance(value, str):
        s = value.strip()
        if s == "":
            return None
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"label must be 1, 0, -1 or blank, got {value!r}") from None
        if f in (1.0, 0.0, -1.0):
            return int(f)
    raise ValueError(f"label must be 1, 0, -1 or blank, got {value!r}")
