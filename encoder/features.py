"""Frozen features of a :class:`~encoder.vit.ViTEncoder`: tensors in, tensors out.

``encode(model, images)`` runs the backbone under ``torch.inference_mode()`` in eval mode and
pools its output tokens into one vector per image:

* ``"cls"``: the CLS token after the final LayerNorm (DINOv2's linear-probe feature);
* ``"mean"``: the mean of the patch tokens (registers excluded);
* ``"cls+mean"``: both, concatenated (``2 * C``);
* ``"cls+grid2"``: CLS and the patch tokens average-pooled on a 2×2 grid of the image
  (``5 * C``) — keeps coarse layout (heart vs lung bases, left vs right) that a global mean loses;
* ``"patches"``: every patch token, flattened row-major as ``(h, w, C)`` (``h * w * C``), for
  dense probes such as segmentation (square images).

With ``layers`` the pooled outputs of the chosen blocks (each through the final LayerNorm, as
DINOv2's ``get_intermediate_layers(norm=True)``) are concatenated in the order given, so
``layers=[-4, -3, -2, -1]`` with ``pool="cls+mean"`` gives ``8 * C`` features.
``encode_batches`` does the same over an iterable of batches and stacks the result on the CPU.

``encode`` runs only what the features need: it stops after the last block asked for, and for
``pool="cls"`` computes just the CLS row of that block (keys and values of every token, query,
attention, projection and MLP of one), which at 518 px saves ~80 % of the last block (~7 % of a
ViT-B forward) with the same result (tested against the full forward). For bf16 weights and
``torch.compile`` see :func:`encoder.inference.prepare_encoder`; ``encode`` takes such a model
unchanged.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor
from tqdm import tqdm

from encoder.vit import ViTEncoder

__all__ = ["POOLS", "encode", "encode_batches", "feature_dim", "resolve_layers"]

POOLS = ("cls", "mean", "cls+mean", "cls+grid2", "patches")
_POOL_TOKENS = {"cls": 1, "mean": 1, "cls+mean": 2, "cls+grid2": 5}  # feature = tokens * C


def resolve_layers(model: ViTEncoder, layers: Sequence[int] | int | None) -> list[int] | None:
    """Block indices in ``[0, depth)`` in the order given (an int ``n``: the last ``n`` blocks).

    ``None`` means the final output (no intermediate layers). Negative indices count from the end.
    Out-of-range and repeated blocks are errors.
    """
    if layers is None:
        return None
    depth = len(model.blocks)
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"layers={layers}: the model has {depth} blocks")
        return list(range(depth - layers, depth))
    out = []
    for i in layers:
        i = int(i)
        if not -depth <= i < depth:
            raise ValueError(f"layer {i} out of range for a model with {depth} blocks")
        out.append(i % depth)
    if not out:
        raise ValueError("layers is empty (use None for the final output)")
    if len(set(out)) != len(out):
        raise ValueError(f"layers {list(layers)} name a block more than once")
    return out


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")


def feature_dim(model: ViTEncoder, layers: Sequence[int] | int | None = None, pool: str = "cls",
                image_size: int | None = None) -> int:
    """Length of the feature vector :func:`encode` returns for these settings (``"patches"``
    depends on the image side, default the model's ``img_size``)."""
    _check_pool(pool)
    blocks = resolve_layers(model, layers)
    if pool == "patches":
        side = (image_size or model.cfg.img_size) // model.cfg.patch_size
        tokens = side * side
    else:
        tokens = _POOL_TOKENS[pool]
    return model.embed_dim * tokens * (1 if blocks is None else len(blocks))


def _pool(out: dict[str, Tensor], pool: str) -> Tensor:
    if pool == "cls":
        return out["cls"]
    if pool == "patches":
        return out["patches"].flatten(1)  # (B, h*w*C), row-major tokens
    if pool == "cls+grid2":
        p = out["patches"]  # (B, h*w, C), row-major; probe images are square
        B, N, C = p.shape
        side = int(round(N ** 0.5))
        if side * side != N:
            raise ValueError(f"pool 'cls+grid2' needs a square patch grid, got {N} patches")
        grid = torch.nn.functional.adaptive_avg_pool2d(p.transpose(1, 2).reshape(B, C, side, side), 2)
        return torch.cat([out["cls"], grid.flatten(2).transpose(1, 2).reshape(B, 4 * C)], dim=-1)
    mean = out["patches"].mean(dim=1)
    if pool == "mean":
        return mean
    return torch.cat([out["cls"], mean], dim=-1)


def _cls_shortcut_ok(blk: torch.nn.Module) -> bool:
    """Whether :func:`_cls_only_block` reproduces ``blk`` (a plain timm ViT block, no extras)."""
    attn = getattr(blk, "attn", None)
    return (isinstance(blk, Block) and isinstance(attn, Attention)
            and isinstance(attn.qkv, torch.nn.Linear) and getattr(attn, "gate", None) is None)


def _cls_only_block(blk: Block, x: Tensor) -> Tensor:
    """Row 0 (CLS) of ``blk(x)``: ``(B, T, C) -> (B, 1, C)``, computing only what that row needs.

    The CLS output needs keys and values of every token but the query, attention output,
    projection and MLP of one token, about a fifth of a block at 1,370 tokens. Eval mode only
    (no dropout or drop-path). Same math as timm's ``Block.forward`` with fused attention.
    """
    attn = blk.attn
    B, T, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    A = H * d
    h = blk.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias  # rows: q (A), k (A), v (A), as timm's reshape
    q = F.linear(h[:, :1], w[:A], None if b is None else b[:A]).reshape(B, 1, H, d).transpose(1, 2)
    kv = F.linear(h, w[A:], None if b is None else b[A:])
    k, v = kv.reshape(B, T, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, A)
    y = x[:, :1] + blk.ls1(attn.proj(attn.norm(o)))
    return y + blk.ls2(blk.mlp(blk.norm2(y)))


def _forward_pooled(model: ViTEncoder, x: Tensor, blocks: list[int] | None, pool: str) -> Tensor:
    """The pooled features of ``blocks`` (``None``: the final output), running only what they need.

    Equal to pooling ``model(x)`` / ``model.get_intermediate_layers(x, blocks, norm=True)``
    (tested), but stops after the last block asked for, normalises only the tokens the pool reads
    and, for ``pool="cls"``, computes only the CLS row of that last block.
    """
    wanted = [len(model.blocks) - 1] if blocks is None else blocks
    last, r = max(wanted), model.num_prefix_tokens
    cls_only = pool == "cls"
    tokens = model.prepare_tokens(x)
    outs: dict[int, dict[str, Tensor]] = {}
    for i, blk in enumerate(model.blocks[:last + 1]):
        if i == last and cls_only and _cls_shortcut_ok(blk):
            outs[i] = {"cls": model.norm(_cls_only_block(blk, tokens))[:, 0]}
            break
        tokens = blk(tokens)
        if i in wanted:
            # LayerNorm is per token: norming only the rows the pool reads changes nothing
            if cls_only:
                outs[i] = {"cls": model.norm(tokens[:, 0])}
            else:
                y = model.norm(tokens)
                outs[i] = {"cls": y[:, 0], "patches": y[:, r:]}
    return torch.cat([_pool(outs[b], pool) for b in wanted], dim=-1)


def encode(model: ViTEncoder, images: Tensor, layers: Sequence[int] | int | None = None,
           pool: str = "cls") -> Tensor:
    """Frozen features of preprocessed images ``(B, 3, H, W)`` -> ``(B, D)`` float32.

    Runs in eval mode under ``torch.inference_mode()`` (the model's train/eval mode is restored
    afterwards); the result is an ordinary tensor without grad history. Images are moved to the
    model's device and dtype (bf16 for a model from :func:`encoder.inference.prepare_encoder` with
    ``precision="bf16"``); the result is float32 on that device. ``D = feature_dim(model, layers,
    pool)``.
    """
    _check_pool(pool)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    blocks = resolve_layers(model, layers)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = images.to(device=param.device, dtype=param.dtype, non_blocking=True)
            feats = _forward_pooled(model, x, blocks, pool)
    finally:
        model.train(was_training)
    # A normal tensor (not an inference tensor), so callers may feed it to trainable modules.
    return feats.float().clone()


def encode_batches(model: ViTEncoder, batches: Iterable[Tensor], layers: Sequence[int] | int | None = None,
                   pool: str = "cls", progress: bool = False, total: int | None = None,
                   desc: str = "encode") -> Tensor:
    """:func:`encode` over an iterable of image batches -> ``(N, D)`` float32 on the CPU.

    ``progress`` shows a tqdm bar counting images (``total``: the number of images, if known).
    An empty iterable gives ``(0, D)``.
    """
    dim = feature_dim(model, layers, pool)
    chunks: list[Tensor] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            if len(batch) == 0:
                continue
            chunks.append(encode(model, batch, layers=layers, pool=pool).cpu())
            bar.update(len(batch))
    if not chunks:
        return torch.empty(0, dim)
    return torch.cat(chunks)
