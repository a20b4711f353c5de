"""Continued pretraining from a checkpoint in the dinov2 trainer's layout (issue 20, item 3).

The source is one of our own SSL models with every parameter and centre perturbed, rewritten
here into dinov2's names by hand (``student.``/``teacher.`` prefixes, FSDP block chunks,
``nn.utils.weight_norm`` names for the prototypes, ``ibot_patch_loss.center`` of shape (1, 1, K)),
so a part that is not loaded, or loaded into the wrong place, shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from encoder.checkpoint import load_checkpoint
from encoder.ssl_checkpoint import HEAD_RISK, load_training_checkpoint
from encoder.train import build_model, train
from encoder.weights import WeightsError
from radgen.config import load_config

from test_train import TINY, _images  # noqa: E402  (pytest puts this folder on sys.path)

SEPARATE = ["ssl.ibot_separate_head=true"]


def _cfg(out: Path, *extra: str):
    return load_config("encoder", [], [f"out={out}", *TINY, *SEPARATE, *extra])


def _perturbed_source(tmp_path: Path):
    torch.manual_seed(11)
    meta = build_model(_cfg(tmp_path / "src"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in list(meta.parameters()) + [meta.dino_loss.center, meta.ibot_loss.center]:
            t.add_(0.3 * torch.randn(t.shape, generator=g))
    return meta.eval()


def _dinov2_layout(meta, chunk: int = 1, heads: bool = True, teacher: bool = True) -> dict:
    """Our SSLMetaArch state dict in the names the dinov2 trainer writes."""
    out = {}
    for k, v in meta.state_dict().items():
        net = k.split(".", 1)[0]
        if net not in ("student", "teacher", "dino_loss", "ibot_loss"):
            continue
        if net == "teacher" and not teacher:
            continue
        if "_head." in k and not heads:
            continue
        k = re.sub(r"backbone\.blocks\.(\d+)\.", lambda m: f"backbone.blocks.{int(m[1]) // chunk}.{m[1]}.", k)
        k = k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        k = k.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        if k == "ibot_loss.center":
            k, v = "ibot_patch_loss.center", v.reshape(1, 1, -1)
        out[k] = v.clone()
    return out


def _save(sd: dict, path: Path) -> Path:
    torch.save({"model": sd, "optimizer": {}, "iteration": 1250}, path)
    return path


def _outputs(meta, net: str) -> dict:
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    h = torch.randn(3, 48, generator=torch.Generator().manual_seed(3))
    nets = getattr(meta, net)
    with torch.no_grad():
        return {"backbone": nets["backbone"].eval().forward_tokens(x),
                "dino_head": nets["dino_head"](h), "ibot_head": nets["ibot_head"](h)}


def test_every_part_loads_and_gives_the_saved_outputs(tmp_path: Path):
    src = _perturbed_source(tmp_path)
    path = _save(_dinov2_layout(src, chunk=1), tmp_path / "model_0001249.rank_0.pth")
    torch.manual_seed(99)  # another init: only what is loaded can match
    got = build_model(_cfg(tmp_path / "o", f"model.init_from={path}"))
    for net in ("student", "teacher"):
        want, have = _outputs(src, net), _outputs(got, net)
        for part in want:
            torch.testing.assert_close(have[part], want[part], atol=1e-6, rtol=0, msg=f"{net}.{part}")
    assert torch.equal(got.dino_loss.center, src.dino_loss.center)
    assert torch.equal(got.ibot_loss.center, src.ibot_loss.center)
    # the prototypes' norms stay fixed at 1 (not trained), as in our own runs
    assert not got.student["dino_head"].last_layer.parametrizations.weight.original0.requires_grad


def test_fsdp_chunked_blocks_and_report(tmp_path: Path):
    src = _perturbed_source(tmp_path)
    path = _save(_dinov2_layout(src, chunk=2), tmp_path / "chunked.pth")
    torch.manual_seed(99)
    meta = build_model(_cfg(tmp_path / "o"))
    report = load_training_checkpoint(meta, path)
    assert set(report["loaded"]) >= {"student.backbone", "teacher.backbone", "student.dino_head",
                                     "teacher.dino_head", "student.ibot_head", "teacher.ibot_head",
                                     "dino_loss.center", "ibot_patch_loss.center"}
    assert report["random"] == []
    torch.testing.assert_close(_outputs(meta, "teacher")["backbone"], _outputs(src, "teacher")["backbone"])


def test_missing_heads_are_named_with_the_risk(tmp_path: Path):
    src = _perturbed_source(tmp_path)
    path = _save(_dinov2_layout(src, heads=False, teacher=False), tmp_path / "backbone_only.pth")
    meta = build_model(_cfg(tmp_path / "o"))
    report = load_training_checkpoint(meta, path)
    assert set(report["random"]) == {"student.dino_head", "student.ibot_head", "teacher.dino_head",
                                     "teacher.ibot_head"}
    assert any(HEAD_RISK in n for n in report["notes"]) and any("teacher starts from the student" in n
                                                                 for n in report["notes"])
    # the teacher backbone is the student's
    torch.testing.assert_close(_outputs(meta, "teacher")["backbone"], _outputs(src, "student")["backbone"])
    with pytest.warns(UserWarning, match="dinov2#204"):  # a plain backbone file: said at build time
        torch.save(src.student["backbone"].state_dict(), tmp_path / "plain.pth")
        build_model(_cfg(tmp_path / "o2", f"model.init_from={tmp_path / 'plain.pth'}"))


def test_heads_of_another_size_are_refused_with_the_keys_to_set(tmp_path: Path):
    path = _save(_dinov2_layout(_perturbed_source(tmp_path)), tmp_path / "k64.pth")
    with pytest.raises(WeightsError, match=r"ssl\.out_dim.*65536"):
        build_model(_cfg(tmp_path / "o", f"model.init_from={path}", "ssl.out_dim=32"))


def test_a_run_continued_from_it_starts_from_its_heads(tmp_path: Path):
    """One pretraining step from the checkpoint: the teacher (EMA, momentum 0.9 here) is still
    next to the file's heads and far from the random ones the same seed would give."""
    src = _perturbed_source(tmp_path)
    path = _save(_dinov2_layout(src), tmp_path / "ckpt.pth")
    out = tmp_path / "cont"
    cfg = _cfg(out, f"model.init_from={path}", "optim.max_steps=1")
    train(cfg, _images())
    sd = load_checkpoint(out / "checkpoint.pt")["model"]
    key = "teacher.dino_head.mlp.0.weight"
    saved = src.state_dict()[key]
    torch.manual_seed(cfg.seed)
    random_init = build_model(_cfg(tmp_path / "r")).state_dict()[key]
    moved, random_gap = (sd[key] - saved).abs().mean(), (random_init - saved).abs().mean()
    assert moved < 0.2 * random_gap, (moved, random_gap)


def test_a_missing_init_from_is_refused_before_work(tmp_path: Path):
    from encoder.train import validate_config

    with pytest.raises(ValueError, match="model.init_from: .*no such file"):
        validate_config(_cfg(tmp_path / "o", f"model.init_from={tmp_path / 'absent.pth'}"))
