"""CheXpert-14 observations: names, label convention and (later) labelers and F1 variants."""

from eval.chexpert.observations import (
    CHEXPERT_14,
    CHEXPERT_5,
    LABEL_VALUES,
    NO_FINDING,
    SUPPORT_DEVICES,
)

__all__ = ["CHEXPERT_14", "CHEXPERT_5", "LABEL_VALUES", "NO_FINDING", "SUPPORT_DEVICES"]
