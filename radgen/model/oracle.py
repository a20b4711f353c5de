"""The oracle control: image tokens that carry the film's own CheXpert labels from the manifest.

A diagnostic ceiling of the report generator alone, never a system result. When a generator
writes the same report for every film, the first question is whether it fails to *read* its image
tokens or whether the tokens carry too little; the oracle answers the first half: its tokens spell
the answer, so a generator trained on them that still writes "normal" for abnormal films has a
training problem, not an encoder problem.

Spec ``oracle`` (accepted wherever an encoder spec is). It reads no pixels: the "image" of a row is
its 14 CheXpert labels, one token per observation, ``(14, 18)``: a one-hot of the observation
(14) followed by a one-hot of its value (4: positive, negative, uncertain, not mentioned). It
therefore needs a manifest with label columns and refuses one without, and it names itself
"oracle" in every output, since its results come from the test film's labels.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from encoder.errors import InputError
from eval.chexpert import CHEXPERT_14

__all__ = ["ORACLE_SPEC", "ORACLE_DIM", "is_oracle_spec", "oracle_tokens", "OracleVision",
           "check_oracle_labels", "OracleError"]

ORACLE_SPEC = "oracle"
VALUES = (1, 0, -1, None)  # positive, negative, uncertain, not mentioned
ORACLE_DIM = len(CHEXPERT_14) + len(VALUES)


class OracleError(InputError):
    """The oracle control cannot run on this data (no labels); the message says why."""


def is_oracle_spec(spec) -> bool:
    return str(spec) == ORACLE_SPEC


def _value(v) -> int | None:
    if v is None or (isinstance(v, float) and v != v):  # None or NaN: not mentioned
        return None
    return int(v)


def oracle_tokens(labels: Mapping[str, object]) -> Tensor:
    """``{observation: 1 | 0 | -1 | None}`` -> tokens ``(14, 18)`` float32, CHEXPERT_14 order.

    Row ``j`` is observation ``j``: ``tokens[j, j] = 1`` and ``tokens[j, 14 + VALUES.index(v)] = 1``.
    """
    out = torch.zeros(len(CHEXPERT_14), ORACLE_DIM)
    for j, obs in enumerate(CHEXPERT_14):
        v = _value(labels.get(obs))
        if v not in VALUES:
            raise OracleError(f"label {obs!r} = {labels.get(obs)!r} is not 1, 0, -1 or blank")
        out[j, j] = 1.0
        out[j, len(CHEXPERT_14) + VALUES.index(v)] = 1.0
    return out


def check_oracle_labels(rows, source) -> None:
    """Refuse data whose rows carry no CheXpert label at all (a plain folder, a manifest without
    label columns): the oracle would see the same tokens for every film."""
    if not any(r.labels and any(_value(v) is not None for v in r.labels.values()) for r in rows):
        raise OracleError(f"{source}: the oracle encoder reads each film's CheXpert labels from the "
                          "manifest, and these rows have none (give a manifest with label columns)")


class OracleVision(nn.Module):
    """Stands where :class:`~radgen.model.vision.FrozenVision` does: ``forward(tokens (B, 14, 18))``
    returns them as they are (the data side built them from the labels with :func:`oracle_tokens`)."""

    embed_dim = ORACLE_DIM
    is_oracle = True

    def __init__(self):
        super().__init__()
        self.register_buffer("_device", torch.zeros(0), persistent=False)

    def num_tokens(self, image_size: int | None = None) -> int:
        return len(CHEXPERT_14)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (len(CHEXPERT_14), ORACLE_DIM):
            raise OracleError(f"oracle tokens must be (B, {len(CHEXPERT_14)}, {ORACLE_DIM}), got {tuple(tokens.shape)}")
        return tokens.to(self._device.device)
