"""The pure seams of the report generator: placeholder expansion, labels, padding, splice."""

from __future__ import annotations

import pytest
import torch

from radgen.model.projector import PROJECTORS, build_projector, register_projector
from radgen.model.splice import (IGNORE_INDEX, build_example, expand_image_placeholder, pad_batch,
                                 splice_image_features)

IMG = 99


def test_expand_placeholder_exactly_once():
    assert expand_image_placeholder([1, 2, IMG, 3], IMG, 4) == [1, 2, IMG, IMG, IMG, IMG, 3]
    with pytest.raises(ValueError, match="found 0"):
        expand_image_placeholder([1, 2, 3], IMG, 4)
    with pytest.raises(ValueError, match="found 2"):
        expand_image_placeholder([IMG, 2, IMG], IMG, 4)


def test_build_example_masks_prompt_and_image():
    prompt = expand_image_placeholder([5, IMG, 6], IMG, 3)  # [5, I, I, I, 6]
    ids, labels = build_example(prompt, [10, 11, 2])
    assert ids == [5, IMG, IMG, IMG, 6, 10, 11, 2]
    assert labels == [IGNORE_INDEX] * 5 + [10, 11, 2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch(side):
    seqs = [[1, 2, 3], [4, 5], [6]]
    labs = [[-100, 2, 3], [-100, 5], [6]]
    b = pad_batch(seqs, pad_id=0, side=side, labels=labs)
    assert b["input_ids"].shape == (3, 3)
    if side == "right":
        assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [6, 0, 0]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
        assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 1], [0, 1, 1]]
        assert b["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100], [6, -100, -100]]
    else:  # the last real token of every row in the last column
        assert b["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5], [0, 0, 6]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
        assert b["position_ids"].tolist() == [[0, 1, 2], [1, 0, 1], [1, 1, 0]]
        assert b["labels"].tolist() == [[-100, 2, 3], [-100, -100, 5], [-100, -100, 6]]
    # padding never carries a label
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_splice_puts_features_exactly_at_placeholders():
    torch.manual_seed(0)
    ids = torch.tensor([[7, IMG, IMG, IMG, 8, 9], [0, 0, 7, IMG, IMG, IMG]])  # right / left padded
    emb = torch.randn(2, 6, 5)
    feats = torch.randn(2, 3, 5, requires_grad=True)
    out = splice_image_features(emb, ids, feats, IMG)
    mask = ids == IMG
    assert torch.equal(out[~mask], emb[~mask])          # every other position untouched
    assert torch.equal(out[0, 1:4], feats[0].detach())  # in order, row by row
    assert torch.equal(out[1, 3:6], feats[1].detach())
    out.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))  # differentiable into the features


def test_splice_rejects_wrong_counts_and_shapes():
    emb = torch.zeros(2, 4, 3)
    ids = torch.tensor([[IMG, IMG, 1, 2], [IMG, 1, 2, 3]])
    with pytest.raises(ValueError, match="image tokens"):
        splice_image_features(emb, ids, torch.zeros(2, 2, 3), IMG)
    with pytest.raises(ValueError, match="do not fit"):
        splice_image_features(emb, ids, torch.zeros(2, 2, 4), IMG)


def test_projector_registry():
    assert {"linear", "mlp2x_gelu", "mlp4x_gelu"} <= set(PROJECTORS)
    x = torch.randn(2, 7, 12)
    for name, n_linear in (("linear", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)):
        p = build_projector(name, 12, 20)
        assert p(x).shape == (2, 7, 20)
        assert sum(isinstance(m, torch.nn.Linear) for m in p.modules()) == n_linear
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("nope", 1, 1)

    @register_projector("_test_identity")
    def _identity(in_dim, out_dim):
        return torch.nn.Identity()

    try:
        assert isinstance(build_projector("_test_identity", 3, 3), torch.nn.Identity)
        with pytest.raises(ValueError, match="twice"):
            register_projector("_test_identity")(_identity)
    finally:
        PROJECTORS.pop("_test_identity")
