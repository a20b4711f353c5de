"""The pixel control: a frozen ``ViTEncoder`` whose patch tokens are exactly the pixels of each patch.

Nothing is learned. ``pixel_encoder(patch, img_size)`` builds a one-block ViT whose

* patch embedding maps the first input channel of a ``patch x patch`` patch to its
  ``patch * patch`` pixel values (row-major: token channel ``k`` is pixel ``(k // patch, k % patch)``;
  the three input channels of a grayscale radiograph are equal copies, so the first is the image);
* position embeddings, CLS token and biases are zero;
* block has LayerScale gammas of zero, so it passes its input through unchanged
  (``x + 0 * attn(x) + 0 * mlp(x) == x``); its attention and MLP weights are zero too.

So ``get_intermediate_layers(x, [0], norm=False)[0]["patches"][b, i]`` equals the preprocessed
pixels of patch ``i`` of image ``b`` exactly, and the encoder goes wherever an encoder does
(features, probes, the report generator, a LLaVA export). It is the control that tells whether a
generator fails for want of information in its image tokens or for want of reading them: the
findings of a film are in its pixels.

Spec: ``pixels`` (14-pixel patches at 112 px: an 8 x 8 grid of 196-dim tokens), ``pixels:<patch>``
or ``pixels:<patch>:<img_size>``.
"""

from __future__ import annotations

import torch

from encoder.vit import ViTConfig, ViTEncoder

__all__ = ["PIXELS_PREFIX", "pixel_encoder", "parse_pixels_spec", "is_pixels_spec"]

PIXELS_PREFIX = "pixels"
DEFAULT_PATCH, DEFAULT_GRID = 14, 8


def is_pixels_spec(spec: str) -> bool:
    s = str(spec)
    return s == PIXELS_PREFIX or s.startswith(PIXELS_PREFIX + ":")


def parse_pixels_spec(spec: str) -> tuple[int, int]:
    """``pixels[:<patch>[:<img_size>]]`` -> ``(patch, img_size)``; ``img_size`` defaults to
    ``8 * patch``. Raises ``ValueError`` naming the spec when it does not parse."""
    parts = str(spec).split(":")
    if parts[0] != PIXELS_PREFIX or len(parts) > 3:
        raise ValueError(f"bad encoder spec {spec!r} (expected pixels, pixels:<patch> or pixels:<patch>:<img_size>)")
    try:
        patch = int(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_PATCH
        size = int(parts[2]) if len(parts) > 2 and parts[2] else DEFAULT_GRID * patch
    except ValueError:
        raise ValueError(f"bad encoder spec {spec!r}: patch and image size must be integers") from None
    if patch < 1 or size < patch:
        raise ValueError(f"bad encoder spec {spec!r}: need patch >= 1 and img_size >= patch")
    return patch, size


def _heads(dim: int) -> int:
    """A head count dividing ``dim`` (the block is a pass-through; any valid count will do)."""
    return next(h for h in (4, 3, 2, 1) if dim % h == 0)


def pixel_encoder(patch: int = DEFAULT_PATCH, img_size: int | None = None) -> ViTEncoder:
    """The frozen pixel encoder (see the module docstring): tokens (B, N, patch**2) = patch pixels."""
    size = int(img_size or DEFAULT_GRID * patch)
    dim = patch * patch
    cfg = ViTConfig(arch="pixels", img_size=size, patch_size=patch, embed_dim=dim, depth=1,
                    num_heads=_heads(dim), mlp_ratio=1.0, layerscale_init=1e-5,
                    extra={"control": "pixels"})
    enc = ViTEncoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()
        w = enc.patch_embed.proj.weight  # (dim, in_chans, patch, patch)
        k = torch.arange(dim)
        w[k, 0, k // patch, k % patch] = 1.0
    return enc.eval().requires_grad_(False)
