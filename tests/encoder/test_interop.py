"""Interop edge cases (issue 8): registers models, original DINOv2 interpolation, export of models
without LayerScale, HF folders without a mask token, exported preprocessor size, list sizes.

Reference models are random transformers models with every parameter perturbed (LayerScale,
norms, CLS/mask/register tokens, position embeddings), so a wrong mapping of any of them shows.
Tiny widths keep the tests fast; the 518-px position grid (37 x 37) is kept where interpolation
is tested, since resampling 37 -> 16 is where the recipes differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from encoder.vit import ViTConfig, ViTEncoder, build_vit
from encoder.weights import (
    RAD_DINO_PREPROCESSOR,
    WeightsError,
    config_from_hf,
    load_dinov2_checkpoint,
    load_hf_dinov2,
    save_hf_dinov2,
)

# fp32 parity measured 0.0 on every case below; 1e-6 leaves room for a different SDPA kernel
# while a LayerNorm eps of 1e-5 instead of 1e-6 (shifts of ~1e-4) fails it.
TOL = 1e-6

TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=4, image_size=518,
            patch_size=14, num_channels=3, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
            use_swiglu_ffn=False, hidden_act="gelu", drop_path_rate=0.0)

# microsoft/rad-dino's sizes (ViT-B/14 at 518 px); the rest of its config is TINY's.
RAD_DINO_SIZE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its constant init so a wrong or missing mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(hf: nn.Module, folder: Path) -> Path:
    hf.save_pretrained(folder)
    return folder


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# 1. Registers models interpolate with antialiasing (transformers, original DINOv2 reg models)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reg_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    hf = _perturb(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)))
    return _save(hf, tmp_path_factory.mktemp("reg"))


@pytest.mark.parametrize("hw", [(518, 518), (224, 224), (224, 168), (700, 602)])
def test_registers_parity_with_transformers_at_any_size(reg_folder: Path, hw):
    hf = AutoModel.from_pretrained(reg_folder).eval()
    ours = load_hf_dinov2(reg_folder).eval()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    n = (hw[0] // 14) * (hw[1] // 14)
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[1, ::3] = True
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out = ours.forward_tokens(x, masks)
    assert out.shape == ref.shape == (2, 1 + 4 + n, 48)
    assert _max_diff(out, ref) <= TOL
    assert ours.cfg.pos_interp == "bicubic_antialias"


def test_registers_export_round_trip(reg_folder: Path, tmp_path: Path):
    ours = load_hf_dinov2(reg_folder).eval()
    save_hf_dinov2(ours, tmp_path / "exp")  # antialias recipe = what transformers does: no warning
    back = AutoModel.from_pretrained(tmp_path / "exp").eval()
    assert type(back).__name__ == "Dinov2WithRegistersModel"
    x = torch.randn(1, 3, 224, 196, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _max_diff(back(pixel_values=x).last_hidden_state, ours.forward_tokens(x)) <= TOL


@pytest.mark.slow
def test_registers_parity_rad_dino_config_at_224(tmp_path: Path):
    """ViT-B/14 with rad-dino's config plus 4 registers, evaluated at 224 px (grid 37 -> 16)."""
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(**{**TINY, **RAD_DINO_SIZE}, num_register_tokens=4)
    hf = Dinov2WithRegistersModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # perturb the constant-initialised and the position parameters
        for name, p in hf.named_parameters():
            if any(s in name for s in ("lambda1", "mask_token", "register_tokens", "cls_token",
                                       "position_embeddings", "norm")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    folder = _save(hf, tmp_path / "reg_b")
    ours = load_hf_dinov2(folder).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
    assert _max_diff(out["cls"], ref.pooler_output) <= 1e-5
    assert _max_diff(out["patches"], ref.last_hidden_state[:, 5:]) <= 1e-5
    assert _max_diff(out["registers"], ref.last_hidden_state[:, 1:5]) <= 1e-5


# ----------------------------------------------------------------------------------------------
# 2. Original DINOv2 checkpoints: scale factor (g + 0.1) / g0, no antialias
# ----------------------------------------------------------------------------------------------
def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.75, as PyTorch's non-antialiased bicubic)."""
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) resampling matrix: half-pixel source coordinate (i + 0.5) / scale - 0.5,
    four taps, indices clamped at the border."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        for k in range(i0 - 1, i0 + 3):
            w[i, min(max(k, 0), n_in - 1)] += _cubic(np.array(src - k))
    return w


def _dinov2_reference_pos(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Original DINOv2 (non-register) recipe, from its formula: bicubic resampling of the g0 x g0
    grid with scale factors ((h + 0.1) / g0, (w + 0.1) / g0), output h x w, CLS position kept."""
    pe = pos_embed[0].double().numpy()
    g0 = int(round((pe.shape[0] - 1) ** 0.5))
    grid = pe[1:].reshape(g0, g0, -1)
    rows = _bicubic_matrix(g0, h, (h + 0.1) / g0)
    cols = _bicubic_matrix(g0, w, (w + 0.1) / g0)
    out = np.einsum("ia,abc,jb->ijc", rows, grid, cols).reshape(h * w, -1)
    return torch.from_numpy(np.concatenate([pe[:1], out])[None])


def _original_pth(model: ViTEncoder, path: Path) -> Path:
    """Save ``model`` as an original DINOv2 ``.pth`` (mask token stored as (C,))."""
    sd = dict(model.state_dict())
    sd["mask_token"] = sd["mask_token"][0]
    torch.save(sd, path)
    return path


def test_original_checkpoint_uses_dinov2_interpolation(tmp_path: Path):
    torch.manual_seed(0)
    src = _perturb(build_vit("vit_tiny", img_size=518, embed_dim=48, depth=2, num_heads=3))
    pth = _original_pth(src, tmp_path / "dinov2_vitt14_pretrain.pth")
    model = load_dinov2_checkpoint(build_vit("vit_tiny", img_size=518, embed_dim=48, depth=2,
                                             num_heads=3), pth).eval()
    for H, W in [(224, 168), (700, 630)]:  # down and up
        h, w = H // 14, W // 14
        x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
        ref = _dinov2_reference_pos(src.pos_embed.detach(), h, w)
        with torch.no_grad():
            tokens = model.prepare_tokens(x)
            no_pos = torch.cat([model.cls_token, model.patch_embed(x).reshape(1, h * w, -1)], dim=1)
        # float32 source coordinates (as PyTorch computes them) against a float64 reference
        assert _max_diff(tokens - no_pos, ref.float()) <= 1e-5, (H, W)
    assert model.cfg.pos_interp == "dinov2_offset"
    assert ViTConfig(**model.cfg.to_dict()).pos_interp == "dinov2_offset"  # kept in checkpoints
    ref = _dinov2_reference_pos(src.pos_embed.detach(), 16, 12)
    # The offset matters: the size-based recipe (transformers) is measurably different.
    plain = ViTEncoder(ViTConfig(**{**model.cfg.to_dict(), "pos_interp": "bicubic"}))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert _max_diff(plain.interpolate_pos_embed(16, 12), ref.float()) > 1e-3


def test_original_checkpoint_resize_follows_its_recipe(tmp_path: Path):
    """A 518-px original checkpoint loaded into a 224-px model gives, at 224 px, the original
    code's features at 224 px (the grid is resized with the offset recipe)."""
    torch.manual_seed(0)
    kw = dict(embed_dim=48, depth=2, num_heads=3)
    src = _perturb(build_vit("vit_tiny", img_size=518, **kw))
    pth = _original_pth(src, tmp_path / "dinov2.pth")
    dst = load_dinov2_checkpoint(build_vit("vit_tiny", img_size=224, **kw), pth).eval()
    ref = _dinov2_reference_pos(src.pos_embed.detach(), 16, 16).float()
    assert _max_diff(dst.pos_embed.detach(), ref) <= 1e-5
    assert dst.cfg.pos_interp == "dinov2_offset"


def test_original_registers_checkpoint_uses_antialias(tmp_path: Path):
    """DINOv2 *_reg checkpoints were published with antialias on and no offset."""
    torch.manual_seed(0)
    kw = dict(embed_dim=48, depth=2, num_heads=3, num_register_tokens=4)
    src = _perturb(build_vit("vit_tiny", img_size=518, **kw))
    pth = _original_pth(src, tmp_path / "dinov2_reg.pth")
    model = load_dinov2_checkpoint(build_vit("vit_tiny", img_size=518, **kw), pth)
    grid = src.pos_embed.detach()[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    ref = nn.functional.interpolate(grid, size=(16, 12), mode="bicubic", antialias=True)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 16 * 12, -1)
    with torch.no_grad():
        assert _max_diff(model.interpolate_pos_embed(16, 12)[:, 1:], ref) <= 1e-6
    assert model.cfg.pos_interp == "bicubic_antialias"
    assert load_dinov2_checkpoint(build_vit("vit_tiny", img_size=518, **kw), pth,
                                  pos_interp="bicubic").cfg.pos_interp == "bicubic"  # override


def test_export_of_dinov2_recipe_warns_and_records(tmp_path: Path):
    m = build_vit("vit_tiny", img_size=56, embed_dim=48, depth=2, num_heads=3, pos_interp="dinov2_offset")
    with pytest.warns(UserWarning, match="position"):
        save_hf_dinov2(m, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["radgen_pos_interp"] == "dinov2_offset"
    assert type(AutoModel.from_pretrained(tmp_path / "e")).__name__ == "Dinov2Model"
    # A registers model trained here (default recipe) exports to the antialiasing HF class.
    r = build_vit("vit_tiny", img_size=56, embed_dim=48, depth=2, num_heads=3, num_register_tokens=2)
    with pytest.warns(UserWarning, match="bicubic_antialias"):
        save_hf_dinov2(r, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["radgen_pos_interp"] == "bicubic"
    # Loading follows what transformers does with the folder (its model_type), not the record.
    assert load_hf_dinov2(tmp_path / "e").cfg.pos_interp == "bicubic"


def test_pos_interp_defaults_and_old_configs():
    old = {k: v for k, v in ViTConfig().to_dict().items() if k != "pos_interp"}  # older checkpoint
    assert ViTConfig(**old).pos_interp == "bicubic"
    assert ViTEncoder(ViTConfig(arch="vit_tiny", img_size=56, num_register_tokens=4)).cfg.pos_interp == "bicubic"
    with pytest.raises(ValueError, match="pos_interp"):
        ViTConfig(pos_interp="nearest")


# ----------------------------------------------------------------------------------------------
# 3. Export of a model without LayerScale
# ----------------------------------------------------------------------------------------------
def test_export_without_layerscale(tmp_path: Path):
    torch.manual_seed(0)
    m = _perturb(build_vit("vit_tiny", img_size=112, embed_dim=48, depth=2, num_heads=3,
                           layerscale_init=None))
    save_hf_dinov2(m, tmp_path / "nols")
    hf = AutoModel.from_pretrained(tmp_path / "nols").eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(hf(pixel_values=x).last_hidden_state, m.forward_tokens(x)) <= TOL
        back = load_hf_dinov2(tmp_path / "nols").eval()
        assert _max_diff(back.forward_tokens(x), m.forward_tokens(x)) <= TOL


@pytest.mark.parametrize("perturb", [False, True])
def test_hf_folder_with_zero_layerscale_value(tmp_path: Path, perturb: bool):
    """``layerscale_value: 0.0`` only sets the gammas' initial value: transformers' Dinov2 still has
    them (trained to anything), so the folder loads with them (it was refused: unexpected
    ``blocks.0.ls1.gamma``, timm building no LayerScale for a falsy init value)."""
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(**{**TINY, "layerscale_value": 0.0}))
    hf = _perturb(hf) if perturb else hf.eval()
    folder = _save(hf, tmp_path / "ls0")
    ours = load_hf_dinov2(folder).eval()
    assert ours.cfg.layerscale_init == 0.0 and all(hasattr(b.ls1, "gamma") for b in ours.blocks)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(ours.forward_tokens(x), hf(pixel_values=x).last_hidden_state) <= TOL
    fresh = ViTEncoder(ViTConfig(arch="vit_tiny", img_size=56, depth=1, layerscale_init=0.0))
    assert fresh.blocks[0].ls1.gamma.abs().sum() == 0 and fresh.blocks[0].ls2.gamma.abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# 4. HF folders saved with use_mask_token=False
# ----------------------------------------------------------------------------------------------
def test_hf_folder_without_mask_token(tmp_path: Path):
    torch.manual_seed(0)
    hf = _perturb(Dinov2Model(Dinov2Config(**TINY, use_mask_token=False)))
    assert hf.embeddings.mask_token is None
    folder = _save(hf, tmp_path / "nomask")
    ours = load_hf_dinov2(folder).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(ours.forward_tokens(x), hf(pixel_values=x).last_hidden_state) <= TOL


def test_hf_folder_missing_mask_token_it_declares(tmp_path: Path):
    """A folder whose config says it has a mask token but whose weights lack it is still refused."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    folder = _save(Dinov2Model(Dinov2Config(**TINY)), tmp_path / "broken")
    sd = load_file(str(folder / "model.safetensors"))
    del sd["embeddings.mask_token"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="mask_token"):
        load_hf_dinov2(folder)


# ----------------------------------------------------------------------------------------------
# 5. Exported preprocessor sized to the model
# ----------------------------------------------------------------------------------------------
def test_export_preprocessor_matches_model_size(tmp_path: Path):
    m = build_vit("vit_tiny", img_size=112, embed_dim=48, depth=2, num_heads=3)
    save_hf_dinov2(m, tmp_path / "small")
    pre = json.loads((tmp_path / "small" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 112} and pre["crop_size"] == {"height": 112, "width": 112}
    for k in ("image_mean", "image_std", "resample", "rescale_factor", "image_processor_type"):
        assert pre[k] == RAD_DINO_PREPROCESSOR[k]
    proc = AutoImageProcessor.from_pretrained(tmp_path / "small")
    img = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    assert proc(images=img, return_tensors="pt")["pixel_values"].shape == (1, 3, 112, 112)
    # A given preprocessor is written as it is.
    mine = {**RAD_DINO_PREPROCESSOR, "image_mean": [0.5, 0.5, 0.5]}
    save_hf_dinov2(m, tmp_path / "given", preprocessor=mine)
    assert json.loads((tmp_path / "given" / "preprocessor_config.json").read_text()) == mine
    assert RAD_DINO_PREPROCESSOR["size"] == {"shortest_edge": 518}  # the constant is not mutated


# ----------------------------------------------------------------------------------------------
# Tolerances and sizes
# ----------------------------------------------------------------------------------------------
def test_parity_tolerance_catches_a_wrong_norm_eps(tmp_path: Path):
    torch.manual_seed(0)
    hf = _perturb(Dinov2Model(Dinov2Config(**TINY)))
    ours = load_hf_dinov2(_save(hf, tmp_path / "eps")).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        assert _max_diff(ours.forward_tokens(x), ref) <= TOL
        for mod in ours.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.eps = 1e-5
        assert _max_diff(ours.forward_tokens(x), ref) > 10 * TOL


def test_list_image_size(tmp_path: Path):
    base = dict(model_type="dinov2", hidden_size=48, num_hidden_layers=2, num_attention_heads=3)
    assert config_from_hf({**base, "image_size": [56, 56], "patch_size": [14, 14]}).img_size == 56
    with pytest.raises(WeightsError, match="image_size"):
        config_from_hf({**base, "image_size": [56, 42]})
    with pytest.raises(WeightsError, match="image_size"):
        config_from_hf({**base, "image_size": "big"})
    assert ViTEncoder(ViTConfig(arch="vit_tiny", img_size=[56, 56])).cfg.img_size == 56
    with pytest.raises(ValueError, match="img_size"):
        ViTConfig(arch="vit_tiny", img_size=(56, 42))
    # A HF folder whose config stores image_size as a list loads and matches transformers.
    torch.manual_seed(0)
    hf = _perturb(Dinov2Model(Dinov2Config(**{**TINY, "image_size": [112, 112]})))
    ours = load_hf_dinov2(_save(hf, tmp_path / "lst")).eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(ours.forward_tokens(x), hf(pixel_values=x).last_hidden_state) <= TOL
