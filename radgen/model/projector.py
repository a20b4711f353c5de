"""Projectors: encoder features (B, N, C_vision) -> LLM embeddings (B, N, C_text), by name.

Adding a projector is one function decorated with ``@register_projector("name")`` taking
``(in_dim, out_dim)`` and returning an ``nn.Module``. Built-ins:

* ``linear``: one linear map (LLaVA v1).
* ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5, LLaVA-Rad); the layout of transformers'
  ``LlavaMultiModalProjector``, so it exports to a plain LLaVA folder.
* ``mlp4x_gelu``: four linear layers with GELU between them (MAIRA-2's 4-layer MLP).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["PROJECTORS", "register_projector", "build_projector"]

PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_projector(name: str) -> Callable:
    """Decorator: make ``fn(in_dim, out_dim) -> nn.Module`` buildable by ``name``."""
    def deco(fn: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} registered twice")
        PROJECTORS[name] = fn
        return fn
    return deco


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """The projector ``name`` mapping ``in_dim`` features to ``out_dim`` embeddings."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](int(in_dim), int(out_dim))


def _mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@register_projector("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@register_projector("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    return _mlp(in_dim, out_dim, 2)


@register_projector("mlp4x_gelu")
def mlp4x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    return _mlp(in_dim, out_dim, 4)
