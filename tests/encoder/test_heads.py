"""DINOHead shapes, fixed-norm prototype layer and layer count."""

from __future__ import annotations

import copy

import torch
from torch import nn

from encoder.heads import DINOHead


def _linears(head: DINOHead) -> list[nn.Linear]:
    return [m for m in head.mlp if isinstance(m, nn.Linear)]


def test_output_shape_and_cosine_logits() -> None:
    head = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(2, 5, 16)
    out = head(x)
    assert out.shape == (2, 5, 50)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck . unit prototypes = cosine
    assert len(_linears(head)) == 3


def test_last_layer_unit_norm_rows_and_fixed_g() -> None:
    head = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8)
    w = head.last_layer.weight  # (out_dim, bottleneck)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(50))
    p = head.last_layer.parametrizations.weight
    assert not p.original0.requires_grad
    assert p.original1.requires_grad
    assert head.last_layer.bias is None
    trainable = {n for n, q in head.named_parameters() if q.requires_grad}
    assert "last_layer.parametrizations.weight.original0" not in trainable

    # after an optimiser step on v the rows stay unit-norm
    opt = torch.optim.SGD([q for q in head.parameters() if q.requires_grad], lr=1.0)
    head(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))


def test_nlayers_one_and_batchnorm() -> None:
    head = DINOHead(16, 10, nlayers=1, bottleneck_dim=8)
    assert len(head.mlp) == 1 and head.mlp[0].in_features == 16 and head.mlp[0].out_features == 8
    assert head(torch.randn(3, 16)).shape == (3, 10)

    bn = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8, nlayers=4, use_bn=True)
    assert len(_linears(bn)) == 4
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 3
    assert bn(torch.randn(2, 3, 16)).shape == (2, 3, 10)


def test_init_and_deepcopy_for_teacher() -> None:
    head = DINOHead(64, 20, hidden_dim=128, bottleneck_dim=32)
    for lin in _linears(head):
        assert torch.all(lin.bias == 0)
        assert abs(lin.weight.std().item() - 0.02) < 0.002
    teacher = copy.deepcopy(head)
    x = torch.randn(3, 64)
    torch.testing.assert_close(teacher(x), head(x))
    teacher.load_state_dict(head.state_dict())
