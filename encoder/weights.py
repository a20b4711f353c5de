"""Weight interop: Hugging Face ``Dinov2Model`` folders and original DINOv2 / timm checkpoints.

Every loader takes a local path (nothing is downloaded). Weights are read with safetensors, or
with ``torch.load(weights_only=True)`` for ``.pth``/``.bin`` files; no remote code is executed.

Layouts:
* HF ``Dinov2Model`` (microsoft/rad-dino, facebook/dinov2-*): ``config.json`` + ``model.safetensors``
  (or sharded / ``pytorch_model.bin``), keys ``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``
  (optionally prefixed ``dinov2.``), separate query/key/value projections.
* Original DINOv2 (``dinov2_vitb14_pretrain.pth``) and timm: ``cls_token``, ``pos_embed``,
  ``blocks.N.*`` with fused ``attn.qkv`` — our own names, so they load by name (block-chunked
  FSDP keys ``blocks.C.N.*`` are flattened; a missing ``mask_token`` keeps its init).

Position-embedding interpolation (``ViTConfig.pos_interp``, see ``encoder/vit.py``) follows where
the weights came from: HF ``dinov2`` -> ``bicubic``, HF ``dinov2_with_registers`` ->
``bicubic_antialias`` (as transformers), original DINOv2 checkpoints -> ``dinov2_offset``
(registers: ``bicubic_antialias``), as the original code. An HF export cannot carry
``dinov2_offset`` (transformers has no such option): ``save_hf_dinov2`` warns and records it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from encoder.errors import InputError
from encoder.io import atomic_write_text
from encoder.vit import ViTConfig, ViTEncoder, resample_pos_grid, square_size

__all__ = [
    "WeightsError",
    "load_hf_dinov2",
    "save_hf_dinov2",
    "load_dinov2_checkpoint",
    "load_dinov2_state",
    "read_state_dict",
    "load_strict",
    "hf_to_ours",
    "ours_to_hf",
    "resize_pos_embed",
    "RAD_DINO_PREPROCESSOR",
    "HF_POS_INTERP",
    "preprocessor_for",
]

# microsoft/rad-dino's preprocessor (BitImageProcessor), written next to exported models.
RAD_DINO_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 518},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 518, "width": 518},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_std": [0.2583, 0.2583, 0.2583],
    "do_convert_rgb": True,
}

# The position-embedding interpolation transformers applies, per model_type.
HF_POS_INTERP = {"dinov2": "bicubic", "dinov2_with_registers": "bicubic_antialias"}


def preprocessor_for(img_size: int) -> dict:
    """rad-dino's preprocessor resized to ``img_size`` (same mean, std, resampling)."""
    return {**RAD_DINO_PREPROCESSOR, "size": {"shortest_edge": img_size},
            "crop_size": {"height": img_size, "width": img_size}}


class WeightsError(InputError):
    """A weights folder or file is missing, malformed, or of a layout we do not support."""


# ----------------------------------------------------------------------------------------------
# Reading state dicts safely
# ----------------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save`` file (``weights_only``), unwrapped
    from a ``teacher`` / ``model`` / ``state_dict`` entry when the file holds one."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict"):  # common wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict")
    return obj


def _read_hf_folder(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            sd.update(load_file(str(folder / s)))
        return sd
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        return read_state_dict(binf)
    raise WeightsError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# ----------------------------------------------------------------------------------------------
# HF <-> ours
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ViTConfig:
    """ViTConfig from a HF ``Dinov2Config`` dict."""
    if hf.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise WeightsError(f"model_type {hf.get('model_type')!r} is not a DINOv2 model")
    if hf.get("use_swiglu_ffn"):
        raise WeightsError("SwiGLU feed-forward (ViT-g) is not supported by this backbone")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(f"hidden_act {hf.get('hidden_act')!r} not supported (gelu only)")
    try:  # HF allows [h, w] lists; our position grid is square
        img_size = square_size(hf.get("image_size", 518), "image_size")
        patch_size = square_size(hf.get("patch_size", 14), "patch_size")
    except ValueError as exc:
        raise WeightsError(str(exc)) from exc
    return ViTConfig(
        arch="custom",
        img_size=img_size,
        patch_size=patch_size,
        in_chans=int(hf.get("num_channels", 3)),
        embed_dim=int(hf["hidden_size"]),
        depth=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        mlp_ratio=float(hf.get("mlp_ratio", 4)),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        num_register_tokens=int(hf.get("num_register_tokens", 0)),
        layerscale_init=float(hf.get("layerscale_value", 1.0)),
        drop_path_rate=0.0,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        pos_interp=HF_POS_INTERP[hf["model_type"]],
    )


def hf_config_from(cfg: ViTConfig) -> dict:
    """HF ``Dinov2Config`` dict for our backbone (what ``save_hf_dinov2`` writes)."""
    cfg = cfg.resolved()
    out = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": cfg.layerscale_init if cfg.layerscale_init is not None else 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": False,
        "torch_dtype": "float32",
    }
    if cfg.num_register_tokens:
        out.update(architectures=["Dinov2WithRegistersModel"], model_type="dinov2_with_registers",
                   num_register_tokens=cfg.num_register_tokens)
    if cfg.pos_interp != HF_POS_INTERP[out["model_type"]]:
        # transformers ignores this key; it records that features at other sizes will differ
        out["radgen_pos_interp"] = cfg.pos_interp
    return out


_HF_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def hf_to_ours(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a HF Dinov2Model state dict to our layout (q, k, v fused into qkv)."""
    sd = {re.sub(r"^(dinov2|model)\.", "", k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    for hk, ok in _HF_TOP.items():
        if hk in sd:
            out[ok] = sd[hk]
    if "mask_token" in out and out["mask_token"].dim() == 1:
        out["mask_token"] = out["mask_token"][None]
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for hk, ok in _HF_BLOCK.items():
            if p + hk not in sd:
                raise WeightsError(f"missing {p + hk} in the HF state dict")
            out[f"blocks.{i}.{ok}"] = sd[p + hk]
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{p}attention.attention.{n}.{kind}") for n in ("query", "key", "value")]
            if any(t is None for t in parts):
                if kind == "bias":
                    continue  # qkv_bias=False
                raise WeightsError(f"missing query/key/value {kind} in layer {i}")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def ours_to_hf(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_ours`."""
    out: dict[str, torch.Tensor] = {}
    for hk, ok in _HF_TOP.items():
        if ok in sd:
            out[hk] = sd[ok]
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for hk, ok in _HF_BLOCK.items():
            key = f"blocks.{i}.{ok}"
            if key not in sd and ok.endswith(".gamma"):
                # no LayerScale (layerscale_init=None); HF Dinov2 always has it: ones = identity
                out[p + hk] = torch.ones_like(sd[f"blocks.{i}.norm1.weight"])
            else:
                out[p + hk] = sd[key]
        for kind in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{kind}"
            if key in sd:
                q, k, v = sd[key].chunk(3, dim=0)
                for n, t in zip(("query", "key", "value"), (q, k, v)):
                    out[f"{p}attention.attention.{n}.{kind}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_dinov2(folder: str | os.PathLike) -> ViTEncoder:
    """Build our encoder from a local HF Dinov2Model folder (e.g. a copy of microsoft/rad-dino)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    hf = json.loads(cfg_path.read_text())
    cfg = config_from_hf(hf)
    model = ViTEncoder(cfg)
    sd = hf_to_ours(_read_hf_folder(folder), cfg.depth)
    if not hf.get("use_mask_token", True) and "mask_token" not in sd:
        # saved without one (Dinov2Config(use_mask_token=False)): keep our (zero) init, which
        # only matters for masked inputs (iBOT pretraining from these weights)
        sd["mask_token"] = model.mask_token.detach().clone()
    load_strict(model, sd, where=str(folder))
    return model


def save_hf_dinov2(model: ViTEncoder, folder: str | os.PathLike, preprocessor: dict | None = None) -> Path:
    """Export to a HF folder that ``transformers.AutoModel.from_pretrained`` loads as Dinov2Model.

    ``preprocessor`` (``preprocessor_config.json``) defaults to rad-dino's at the model's size.
    A model whose ``pos_interp`` is not what transformers does for its type (e.g. an original
    DINOv2 checkpoint's ``dinov2_offset``) gives the same features at its native size only: a
    warning says so and ``config.json`` records it as ``radgen_pos_interp``.
    """
    folder = Path(folder)
    hf_cfg = hf_config_from(model.cfg)
    if "radgen_pos_interp" in hf_cfg:
        warnings.warn(f"{folder}: transformers' {hf_cfg['architectures'][0]} resizes position "
                      f"embeddings with {HF_POS_INTERP[hf_cfg['model_type']]!r}, this model with "
                      f"{model.cfg.pos_interp!r}: features will differ at sizes other than "
                      f"{model.cfg.img_size} px (recorded as radgen_pos_interp in config.json)",
                      UserWarning, stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    sd = ours_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.cfg.depth)
    tmp = folder / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    atomic_write_text(folder / "config.json", json.dumps(hf_cfg, indent=2))
    atomic_write_text(folder / "preprocessor_config.json",
                      json.dumps(preprocessor or preprocessor_for(model.cfg.img_size), indent=2))
    return folder


def load_dinov2_checkpoint(model: ViTEncoder, path: str | os.PathLike, strict: bool = True,
                           pos_interp: str | None = None) -> ViTEncoder:
    """Load an original DINOv2 (or timm ``vit_*_dinov2``) checkpoint into ``model`` by name.

    ``model.cfg.pos_interp`` is set to the interpolation the weights were published with
    (``pos_interp`` overrides): ``dinov2_offset`` for original DINOv2 models, ``bicubic_antialias``
    for registers models (``dinov2_*_reg``) and timm-layout checkpoints (timm antialiases; its
    non-register DINOv2 files have the original names, so give ``pos_interp`` for those).
    The position embeddings are resized to the model's grid with that recipe when they differ, so
    a 518-px DINOv2 checkpoint initialises a 224-px model (as RAD-DINO initialised from DINOv2)
    that gives, at 224 px, what the original code gives at 224 px.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    return load_dinov2_state(model, read_state_dict(path), str(path), strict=strict, pos_interp=pos_interp)


def load_dinov2_state(model: ViTEncoder, sd: dict[str, torch.Tensor], where: str, strict: bool = True,
                      pos_interp: str | None = None) -> ViTEncoder:
    """:func:`load_dinov2_checkpoint` on a state dict already read (``where`` names it in errors)."""
    sd = {re.sub(r"^(backbone|module|student\.backbone|teacher\.backbone)\.", "", k): v for k, v in sd.items()}
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}  # FSDP chunks
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "dino_head", "ibot_head"))}
    pe = sd.get("pos_embed")
    # timm no_embed_class (its *_reg_dinov2 models): a square grid with no CLS position
    no_cls_pos = pe is not None and _is_square(pe.shape[1]) and not _is_square(pe.shape[1] - 1)
    timm_layout = "reg_token" in sd or no_cls_pos
    if "reg_token" in sd:  # timm name
        sd["register_tokens"] = sd.pop("reg_token")
    if pos_interp is None:  # DINOv2's hub: interpolate_antialias=True, offset 0 for *_reg models
        pos_interp = "bicubic_antialias" if timm_layout or "register_tokens" in sd else "dinov2_offset"
    model.cfg = replace(model.cfg, pos_interp=pos_interp)  # validates the name
    if "mask_token" not in sd:
        sd["mask_token"] = model.mask_token.detach().clone()
    if "mask_token" in sd and sd["mask_token"].dim() == 1:
        sd["mask_token"] = sd["mask_token"][None]
    if pe is not None:
        if no_cls_pos:  # a zero CLS position adds nothing, as in timm
            pe = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
        if pe.shape[1] != model.pos_embed.shape[1]:
            pe = resize_pos_embed(pe, model.pos_embed.shape[1] - 1, pos_interp)
        sd["pos_embed"] = pe
    return load_strict(model, sd, where=where, strict=strict)


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


def resize_pos_embed(pe: torch.Tensor, n_new: int, pos_interp: str = "bicubic") -> torch.Tensor:
    """(1, 1 + g0*g0, C) position embeddings -> (1, 1 + n_new, C) by resampling the grid with
    ``pos_interp`` (see ``encoder/vit.py``)."""
    g0, g1 = int(round((pe.shape[1] - 1) ** 0.5)), int(round(n_new**0.5))
    grid = pe[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    grid = resample_pos_grid(grid, g1, g1, pos_interp)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g1 * g1, -1)], dim=1)


def load_strict(model: torch.nn.Module, sd: dict, where: str, strict: bool = True) -> torch.nn.Module:
    """Load ``sd`` into ``model`` by name; with ``strict``, a missing, unexpected or misshapen key
    raises :class:`WeightsError` naming the first few (``where`` says which file)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if strict and (missing or unexpected or shape_bad):
        msg = []
        if missing:
            msg.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            msg.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shape_bad:
            msg.append("shape mismatch " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                     for k in shape_bad[:5]))
        raise WeightsError(f"{where}: weights do not fit the model: " + "; ".join(msg))
    model.load_state_dict({k: v for k, v in sd.items() if k in own and own[k].shape == v.shape},
                          strict=False)
    return model
