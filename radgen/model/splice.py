"""The seams where image features meet text: placeholder expansion, labels, padding, splice.

Every function here is pure (no model, no tokenizer) and tested on its own. The scheme is the one
of transformers' LLaVA: the prompt holds one ``<image>`` token, which is expanded into exactly as
many image-token ids as the projector emits features, so ``input_ids``, ``attention_mask`` and
``labels`` have their final length before the model runs; the splice is then one
``masked_scatter`` of the projected features into the token embeddings, and nothing is re-padded.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "expand_image_placeholder", "build_example", "pad_batch",
           "splice_image_features"]

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips


def expand_image_placeholder(ids: Sequence[int], image_token_id: int, n_tokens: int) -> list[int]:
    """Replace the single ``image_token_id`` in ``ids`` by ``n_tokens`` copies of it.

    Exactly one placeholder must be present: a prompt without one would train a text-only model,
    and two would silently receive the image twice.
    """
    count = sum(1 for t in ids if t == image_token_id)
    if count != 1:
        raise ValueError(f"the prompt must hold exactly one image placeholder (id {image_token_id}), found {count}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    i = list(ids).index(image_token_id)
    return list(ids[:i]) + [image_token_id] * n_tokens + list(ids[i + 1:])


def build_example(prompt_ids: Sequence[int], target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one training example: the prompt (image positions included) is
    context only (``IGNORE_INDEX``), the target is predicted.

    Shapes: ``len(input_ids) == len(labels) == len(prompt_ids) + len(target_ids)``.
    """
    return list(prompt_ids) + list(target_ids), [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              labels: Sequence[Sequence[int]] | None = None) -> dict[str, Tensor]:
    """Pad token sequences into a batch.

    Returns ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long (1 = real token),
    ``position_ids`` (B, L) long (0, 1, ... over each row's real tokens, 1 on padding, as
    transformers computes them from the mask), and ``labels`` (B, L) with ``IGNORE_INDEX`` on
    padding when ``labels`` are given. ``side="right"`` for training, ``"left"`` for batched
    generation (every row's last real token then sits in the last column).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("empty batch")
    if labels is not None and [len(s) for s in labels] != [len(s) for s in sequences]:
        raise ValueError("labels and sequences differ in length")
    B, L = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    pos = torch.ones((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for b, seq in enumerate(sequences):
        n = len(seq)
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        ids[b, sl] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[b, sl] = 1
        pos[b, sl] = torch.arange(n)
        if lab is not None:
            lab[b, sl] = torch.as_tensor(list(labels[b]), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    if lab is not None:
        out["labels"] = lab
    return out


def splice_image_features(inputs_embeds: Tensor, input_ids: Tensor, image_features: Tensor,
                          image_token_id: int) -> Tensor:
    """Put projected image features at the image-token positions of the embeddings.

    Args:
        inputs_embeds: (B, L, D) token embeddings.
        input_ids: (B, L) token ids; row ``b`` holds exactly ``N`` copies of ``image_token_id``
            (its expanded placeholder).
        image_features: (B, N, D) projected features, one image per row.
        image_token_id: the placeholder id.

    Returns:
        (B, L, D): ``inputs_embeds`` with the ``N`` image positions of row ``b`` replaced, in
        order, by ``image_features[b]``; every other position unchanged. Differentiable with
        respect to ``image_features``.
    """
    if inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(f"embeddings {tuple(inputs_embeds.shape)} do not match ids {tuple(input_ids.shape)}")
    B, N, D = image_features.shape
    if B != input_ids.shape[0] or D != inputs_embeds.shape[-1]:
        raise ValueError(f"image features {tuple(image_features.shape)} do not fit embeddings "
                         f"{tuple(inputs_embeds.shape)}")
    mask = input_ids == image_token_id  # (B, L)
    counts = mask.sum(dim=1)
    if not torch.all(counts == N):
        raise ValueError(f"each row needs {N} image tokens, found {counts.tolist()}")
    # masked_scatter fills the True positions in row-major order: row b's N slots take
    # image_features[b] in order, since every row holds exactly N of them.
    return inputs_embeds.masked_scatter(mask[..., None], image_features.to(inputs_embeds.dtype))
