"""ViT/14 backbone for RAD-DINO: timm transformer blocks + DINOv2 token preparation.

The parameter names follow the original DINOv2 layout (``cls_token``, ``pos_embed``,
``mask_token``, ``register_tokens``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,
ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``), so DINOv2 checkpoints load by name and
the Hugging Face ``Dinov2Model`` layout is a fixed renaming (``encoder/weights.py``).

Token preparation is written here rather than taken from timm because parity with DINOv2 / HF
needs its exact recipe: masked patches replaced by a learnable mask token *before* position
embeddings are added, and registers inserted after the CLS token without position. How the
position grid is resized for other image sizes depends on where the weights came from, so it is
part of the config (``ViTConfig.pos_interp``, one of :data:`POS_INTERP`):

* ``bicubic``: float32 bicubic to the target grid, no antialiasing (transformers ``Dinov2Model``;
  the default, so models trained here keep their behaviour);
* ``bicubic_antialias``: the same with antialiasing (transformers ``Dinov2WithRegistersModel``,
  the original DINOv2 ``*_reg`` models, timm);
* ``dinov2_offset``: the original DINOv2 (non-register) code: bicubic, no antialiasing, with the
  scale factors ``((h + 0.1) / g0, (w + 0.1) / g0)`` instead of the target size, which shifts the
  sampling grid slightly (the 0.1 was a work-around for a float issue in DINO, kept for parity).

Under ``torch.use_deterministic_algorithms`` (``train.deterministic``) the resized grid keeps the
same forward values, but its gradient is a matmul with the resampling matrix instead of the
bicubic backward kernel, which CUDA computes with atomic adds (nondeterministic, so refused in
that mode). See :func:`resample_pos_grid_deterministic_grad`.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Block", "ViTConfig", "ViTEncoder", "ARCHS", "POS_INTERP", "build_vit", "resample_pos_grid",
           "square_size", "resample_pos_grid_deterministic_grad"]

# name -> (embed_dim, depth, num_heads)
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}

# Position-embedding interpolation recipes (module docstring).
POS_INTERP = ("bicubic", "bicubic_antialias", "dinov2_offset")
DINOV2_INTERP_OFFSET = 0.1  # original DINOv2's ``interpolate_offset``


def square_size(value, name: str = "img_size") -> int:
    """An int, or a square ``[h, w]`` pair as HF configs may store it, as one int.

    The position grid is square (DINOv2 and transformers assume it too), so ``h != w`` is refused.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        vals = list(value)
        if len(vals) == 2 and vals[0] == vals[1]:
            return square_size(vals[0], name)
    raise ValueError(f"{name} must be an int or a square [h, w] pair (the position grid is square), "
                     f"got {value!r}")


def resample_pos_grid(grid: torch.Tensor, h: int, w: int, pos_interp: str = "bicubic") -> torch.Tensor:
    """Resize a (1, C, g0, g0) position grid to (1, C, h, w) with one of :data:`POS_INTERP`.

    Computed in float32 (bicubic in half precision shifts the embeddings), returned in the
    grid's dtype, as DINOv2 and transformers do.
    """
    x = grid.float()
    if pos_interp == "dinov2_offset":
        # scale_factor, not size: PyTorch then samples at (i + 0.5) / scale - 0.5 with the given
        # scale, which is what makes the offset move the grid.
        scale = ((h + DINOV2_INTERP_OFFSET) / grid.shape[-2], (w + DINOV2_INTERP_OFFSET) / grid.shape[-1])
        out = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(out.shape[-2:]) != (h, w):  # floor(g0 * (h + 0.1) / g0) is h; checked, not assumed
            raise RuntimeError(f"offset interpolation gave a {tuple(out.shape[-2:])} grid, not {(h, w)}")
    elif pos_interp in ("bicubic", "bicubic_antialias"):
        out = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False,
                            antialias=pos_interp == "bicubic_antialias")
    else:
        raise ValueError(f"pos_interp must be one of {POS_INTERP}, got {pos_interp!r}")
    return out.to(grid.dtype)


@functools.lru_cache(maxsize=32)
def _resample_matrix(g0: int, h: int, w: int, pos_interp: str, device: torch.device) -> torch.Tensor:
    """(h*w, g0*g0) float32 ``M`` with ``resample(grid)[c] = M @ grid[c]`` (flattened), built on
    the CPU by resampling each one-hot grid (the resampling is linear in the grid)."""
    eye = torch.eye(g0 * g0).reshape(g0 * g0, 1, g0, g0)
    m = resample_pos_grid(eye, h, w, pos_interp).reshape(g0 * g0, h * w).T.contiguous()
    return m.to(device)


class _DeterministicGradResample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grid: torch.Tensor, h: int, w: int, pos_interp: str) -> torch.Tensor:
        ctx.meta = (grid.shape, grid.dtype, h, w, pos_interp)
        return resample_pos_grid(grid, h, w, pos_interp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (_, C, g0, _), dtype, h, w, pos_interp = ctx.meta
        m = _resample_matrix(g0, h, w, pos_interp, grad.device)  # (h*w, g0*g0)
        grad_in = grad.float().reshape(C, h * w) @ m  # the adjoint: M^T per channel
        return grad_in.reshape(1, C, g0, g0).to(dtype), None, None, None


def resample_pos_grid_deterministic_grad(grid: torch.Tensor, h: int, w: int,
                                         pos_interp: str = "bicubic") -> torch.Tensor:
    """:func:`resample_pos_grid` of a square (1, C, g0, g0) grid, same values, with a gradient
    computed as ``grad @ M`` (``M`` the cached resampling matrix): deterministic on every device."""
    return _DeterministicGradResample.apply(grid, h, w, pos_interp)


class Block(TimmBlock):
    """timm's transformer block; with ``grad_checkpointing`` (set by
    :meth:`ViTEncoder.set_grad_checkpointing`) it keeps only its input for backward and recomputes
    the rest there (``torch.utils.checkpoint``, non-reentrant, RNG preserved so drop-path
    recomputes the same). The checkpoint sits inside the block's ``forward``, so FSDP2's hooks on
    the block wrap it: the recompute runs while FSDP holds the block's parameters unsharded for
    its backward, with no second all-gather."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(super().forward, x, *args, use_reentrant=False, **kwargs)
        return super().forward(x, *args, **kwargs)


@dataclass
class ViTConfig:
    """Everything needed to rebuild the backbone (stored in checkpoints)."""

    arch: str = "vit_base"
    img_size: int = 518  # size the position embeddings are learned for (37 x 37 at patch 14)
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int | None = None  # None: from ``arch``
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_register_tokens: int = 0
    layerscale_init: float | None = 1e-5  # None disables LayerScale; 0.0 keeps it, starting at zero
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    # position-embedding resizing (POS_INTERP); set by the loaders from where the weights came from
    pos_interp: str = "bicubic"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.img_size = square_size(self.img_size, "img_size")
        self.patch_size = square_size(self.patch_size, "patch_size")
        if self.pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp must be one of {POS_INTERP}, got {self.pos_interp!r}")

    def resolved(self) -> "ViTConfig":
        if self.arch not in ARCHS and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)} or give "
                             "embed_dim, depth and num_heads")
        d, n, h = ARCHS.get(self.arch, (self.embed_dim, self.depth, self.num_heads))
        return ViTConfig(**{**asdict(self), "embed_dim": self.embed_dim or d,
                            "depth": self.depth or n, "num_heads": self.num_heads or h})

    def to_dict(self) -> dict:
        return asdict(self)


class ViTEncoder(nn.Module):
    """Vision transformer with patch size 14 (or any), mask token and registers.

    ``forward(images (B,3,H,W), masks (B,N) | None) -> dict`` with ``cls`` (B,C),
    ``patches`` (B,N,C) and ``registers`` (B,R,C), all after the final LayerNorm.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        C = cfg.embed_dim
        # timm builds the patch embedding, blocks (fused-qkv attention with SDPA, LayerScale,
        # drop-path) and final norm; token preparation is ours (see module docstring).
        vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            embed_dim=C, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            # timm builds no LayerScale for a falsy init value, but a LayerScale that starts at 0
            # (HF Dinov2's layerscale_value: 0.0) is still a trained parameter: built at 1, zeroed below
            qkv_bias=cfg.qkv_bias, init_values=1.0 if cfg.layerscale_init == 0 else cfg.layerscale_init,
            class_token=False,
            pos_embed="none", global_pool="", num_classes=0, dynamic_img_size=True,
            drop_path_rate=cfg.drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps), block_fn=Block,
        )
        if cfg.layerscale_init == 0:
            with torch.no_grad():
                for blk in vit.blocks:
                    blk.ls1.gamma.zero_()
                    blk.ls2.gamma.zero_()
        self.patch_embed = vit.patch_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        self.register_tokens = (nn.Parameter(torch.zeros(1, cfg.num_register_tokens, C))
                                if cfg.num_register_tokens else None)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    # ------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (see :class:`Block`): training memory falls to about
        one block's activations plus each block's input, for one more forward of the blocks."""
        for blk in self.blocks:
            blk.grad_checkpointing = enable

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.cfg.patch_size, width // self.cfg.patch_size

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid: (1, 1 + h*w, C), by ``cfg.pos_interp``."""
        n0 = self.pos_embed.shape[1] - 1
        g0 = int(round(n0**0.5))
        # native grid: as is, as DINOv2 and transformers (for dinov2_offset resampling it would
        # not be the identity)
        if h == g0 and w == g0:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # (1, C, g0, g0)
        if torch.are_deterministic_algorithms_enabled() and patch_pos.requires_grad:
            patch_pos = resample_pos_grid_deterministic_grad(patch_pos, h, w, self.cfg.pos_interp)
        else:
            patch_pos = resample_pos_grid(patch_pos, h, w, self.cfg.pos_interp)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,H,W) -> (B, 1 + R + N, C): [CLS, registers, patches] with positions added.

        A grayscale batch (B,1,H,W) is expanded to the input channels here, on its device (a view:
        the same numbers as a replicated copy, without moving three copies there)."""
        B, c, H, W = images.shape
        if c == 1 and self.cfg.in_chans != 1:
            images = images.expand(-1, self.cfg.in_chans, -1, -1)
        x = self.patch_embed(images)  # (B, h, w, C) (timm NHWC with dynamic size)
        h, w = x.shape[1], x.shape[2]
        x = x.reshape(B, h * w, -1)  # (B, N, C)
        if masks is not None:
            x = torch.where(masks.reshape(B, h * w, 1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: (B, 1 + R + N, C)."""
        x = self.prepare_tokens(images, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.forward_tokens(images, masks)
        r = self.num_prefix_tokens
        return {"cls": x[:, 0], "registers": x[:, 1:r], "patches": x[:, r:]}

    def get_intermediate_layers(self, images: torch.Tensor, layers: list[int] | int = 1,
                                norm: bool = True) -> list[dict[str, torch.Tensor]]:
        """Outputs of chosen blocks (indices, or the last ``n`` if an int), optionally normed."""
        depth = len(self.blocks)
        wanted = list(range(depth - layers, depth)) if isinstance(layers, int) else [
            i % depth for i in layers]
        x = self.prepare_tokens(images)
        outs = []
        r = self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                y = self.norm(x) if norm else x
                outs.append({"cls": y[:, 0], "registers": y[:, 1:r], "patches": y[:, r:]})
        return outs


def build_vit(arch: str = "vit_base", **kwargs) -> ViTEncoder:
    """Convenience factory: ``build_vit("vit_small", img_size=224)``."""
    return ViTEncoder(ViTConfig(arch=arch, **kwargs))
