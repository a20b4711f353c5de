"""The features job (skip-and-record, outputs, cache) and the probe study (pretrained vs random)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import radgen.jobs.features as fj
from encoder.checkpoint import load_encoder, save_checkpoint
from encoder.vit import ViTConfig, ViTEncoder
from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset
from radgen.jobs.features import (FeatureJobError, extract_features, load_encoder_spec,
                                 load_features, random_like_spec)
from radgen.jobs.probe import (format_probe_study, probe_study, resolve_encoders,
                              summarize_probe_study)

TINY = dict(arch="test-tiny", embed_dim=32, depth=2, num_heads=2, img_size=56)
TARGETS = ("Cardiomegaly", "Pleural Effusion", "sex (F)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    cfg = load_config("synth", overrides=[f"out={out}", "n=60", "size=64", "workers=1", "splits.train=0.6",
                                          "splits.validate=0.2", "splits.test=0.2"])
    generate_dataset(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny 'pretrained' checkpoint in the format encoder.checkpoint writes."""
    torch.manual_seed(123)
    model = ViTEncoder(ViTConfig(**TINY))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, {"vit_config": model.cfg.to_dict(),
                           "model": {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}})
    return path


@pytest.fixture()
def messy_folder(synth: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(sorted((synth / "images").iterdir())[:3]):
        shutil.copy(f, folder / ("sub" if i == 2 else "") / f.name)
    (folder / "bad.png").write_text("this is not an image, just text with a png name\n")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def _sd_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------
def test_encoder_specs(ckpt: Path):
    pre = load_encoder_spec(str(ckpt))
    assert _sd_equal(pre, load_encoder(ckpt))
    state = torch.get_rng_state()
    r0 = load_encoder_spec(random_like_spec(str(ckpt), 0))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert r0.cfg == pre.cfg and not _sd_equal(r0, pre)
    assert _sd_equal(r0, load_encoder_spec(f"random-like:{ckpt}:0"))
    assert not _sd_equal(r0, load_encoder_spec(f"random-like:{ckpt}:1"))
    # same weights as encoder.checkpoint's own random: spec
    assert _sd_equal(load_encoder_spec("random:vit_tiny:56:3"), load_encoder("random:vit_tiny:56:3"))
    with pytest.raises(FeatureJobError):
        load_encoder_spec("no/such/checkpoint.pt")
    with pytest.raises(FeatureJobError):
        load_encoder_spec("random-like:" + str(ckpt))  # no seed


def test_skip_and_record_in_an_image_folder(messy_folder: Path, ckpt: Path, tmp_path: Path):
    out = tmp_path / "feats"
    ids, feats = fs = extract_features(str(ckpt), messy_folder, out, image_size=56, batch_size=2,
                                       progress=False, workers=2, loader="thread")
    assert len(ids) == 3 and feats.shape == (3, 32) and feats.dtype == np.float32
    assert {r["id"]: r["error"] for r in fs.skipped} == {"bad": "not_an_image", "empty": "empty_file"}
    assert all(Path(r["path"]).parent == messy_folder and r["reason"] for r in fs.skipped)
    lines = (out / "skipped.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == ["bad", "empty"]
    assert json.loads((out / "ids.json").read_text()) == ids
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["n_rows"], meta["n_features"], meta["n_skipped"], meta["dim"]) == (5, 3, 2, 32)
    assert meta["encoder"] == str(ckpt) and meta["image_size"] == 56 and meta["pool"] == "cls"
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(out / "features.safetensors")["features"], feats)
    # Same images without the bad ones, in memory only: identical features for the kept rows.
    for f in ("bad.png", "empty.jpg"):
        (messy_folder / f).unlink()
    ids2, feats2 = extract_features(str(ckpt), messy_folder, None, image_size=56, progress=False)
    assert ids2 == ids
    np.testing.assert_allclose(feats2, feats, rtol=1e-5, atol=1e-5)


def test_manifest_rows_with_missing_files_are_skipped(synth: Path, ckpt: Path, tmp_path: Path):
    rows = [json.loads(x) for x in (synth / "manifest.jsonl").read_text().splitlines()][:4]
    for r in rows:
        r["image"] = str(synth / r["image"])
    rows[1]["image"] = str(tmp_path / "gone.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, feats = fs = extract_features(f"random-like:{ckpt}:0", manifest, None, 56, pool="cls+mean",
                                       layers=[0, 1], progress=False)
    assert ids == [rows[i]["id"] for i in (0, 2, 3)] and feats.shape == (3, 128)
    assert [r["id"] for r in fs.skipped] == [rows[1]["id"]] and fs.skipped[0]["error"] == "load_error"
    with pytest.raises(FeatureJobError, match="pool"):
        extract_features(str(ckpt), manifest, None, 56, pool="max", progress=False)


def test_cache_reused_only_when_meta_matches(synth: Path, ckpt: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "cache"
    base = {"split": "test", "progress": False, "precision": "fp32"}
    ids, feats = first = extract_features(str(ckpt), synth, out, 56, **base)
    assert not first.cached and len(ids) == 12 and first.meta["precision"] == "fp32"
    stamp = (out / "meta.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("recomputed although the cache matches")

    with monkeypatch.context() as m:
        m.setattr(fj, "encode", boom)
        again = extract_features(str(ckpt), synth, out, 56, **base)
        assert again.cached and again.ids == ids
        np.testing.assert_array_equal(again.features, feats)
        assert (out / "meta.json").stat().st_mtime_ns == stamp
        assert load_features(out).meta == first.meta | {"features_sha256": again.meta["features_sha256"]}
        # how the features are computed, not what they are: the cache still holds
        assert extract_features(str(ckpt), synth, out, 56, **base, batch_size=5, workers=0).cached
        # any change of what the features depend on recomputes
        for kw in ({"pool": "mean"}, {"image_size": 42}, {"split": "validate"}, {"overwrite": True},
                   {"precision": "bf16"}):
            with pytest.raises(AssertionError, match="recomputed"):
                extract_features(str(ckpt), synth, out, **{"image_size": 56, **base, **kw})
        with pytest.raises(AssertionError, match="recomputed"):  # different weights, same shape
            extract_features(f"random-like:{ckpt}:0", synth, out, 56, **base)
        # a cache written before precision was recorded was fp32: reused for fp32 only
        meta = json.loads((out / "meta.json").read_text())
        del meta["precision"]
        (out / "meta.json").write_text(json.dumps(meta))
        assert extract_features(str(ckpt), synth, out, 56, **base).cached
        with pytest.raises(AssertionError, match="recomputed"):
            extract_features(str(ckpt), synth, out, 56, **{**base, "precision": "bf16"})
    # A damaged features file is detected and recomputed, not trusted.
    (out / "features.safetensors").write_bytes(b"garbage")
    fixed = extract_features(str(ckpt), synth, out, 56, **base)
    assert not fixed.cached
    np.testing.assert_array_equal(fixed.features, feats)
    # bf16 gets its own result, within the stated tolerance of fp32
    bf = extract_features(str(ckpt), synth, out, 56, **{**base, "precision": "bf16"})
    assert not bf.cached and bf.meta["precision"] == "bf16" and bf.ids == ids
    cos = (bf.features * feats).sum(1) / np.linalg.norm(bf.features, axis=1) / np.linalg.norm(feats, axis=1)
    assert cos.min() >= 0.999


@pytest.mark.parametrize("loader", ["process", "thread"])
def test_background_loaders_give_the_features_of_workers_0(messy_folder: Path, ckpt: Path, loader: str):
    """Worker processes or threads: same ids, features (bit for bit) and skipped records, in order."""
    kw = dict(image_size=56, batch_size=2, progress=False, precision="fp32")
    ref = extract_features(str(ckpt), messy_folder, None, workers=0, **kw)
    got = extract_features(str(ckpt), messy_folder, None, workers=2, loader=loader, **kw)
    assert got.ids == ref.ids and got.skipped == ref.skipped and len(got.ids) == 3
    np.testing.assert_array_equal(got.features, ref.features)
    assert got.meta["workers"] == 2 and got.meta["loader"] == loader and ref.meta["loader"] is None


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_streams_a_bounded_number_of_batches(messy_folder: Path, monkeypatch, workers: int):
    """The loader never holds more than ``prefetch`` batches beyond the one handed out."""
    from encoder.processor import RadDinoProcessor

    files = sorted(f for f in messy_folder.rglob("*.png") if f.name != "bad.png")
    paths = [str(files[i % 3]) for i in range(40)]
    ids = [f"r{i}" for i in range(40)]
    started: list[int] = []
    real = fj._load_row

    def counting(rid, path, proc):
        started.append(int(rid[1:]))
        return real(rid, path, proc)

    monkeypatch.setattr(fj, "_load_row", counting)
    batch, prefetch, seen = 4, 2, 0
    for b in fj.iter_image_batches(ids, paths, RadDinoProcessor(56, 56), batch, workers=workers,
                                   loader="thread", prefetch=prefetch):
        seen += b.rows
        assert b.ids == ids[seen - b.rows:seen] and b.images.shape == (b.rows, 3, 56, 56)
        assert len(started) <= seen + prefetch * batch  # loaded ahead: at most `prefetch` batches
    assert seen == 40 and sorted(started) == list(range(40))
    with pytest.raises(FeatureJobError, match="loader"):
        next(fj.iter_image_batches(ids, paths, RadDinoProcessor(56, 56), batch, 1, loader="gpu"))


def test_default_workers_leave_a_small_cpu_to_the_forward(monkeypatch):
    import os

    for n, cpu, gpu in ((2, 0, 1), (4, 0, 3), (16, 2, 4), (64, 4, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=n: set(range(n)), raising=False)
        assert fj.default_workers("cpu") == cpu
        monkeypatch.setattr(fj, "resolve_device", lambda d: torch.device("cuda"))
        assert fj.default_workers("cuda") == gpu
        monkeypatch.undo()


def test_probe_study_end_to_end(synth: Path, ckpt: Path, tmp_path: Path):
    encoders = {"pretrained": str(ckpt), "random-0": f"random-like:{ckpt}:0",
                "random-1": f"random-like:{ckpt}:1"}
    rows = probe_study(synth, encoders, image_size=56, targets=TARGETS, pixel_size=8,
                       n_resamples=30, seed=0, cache_dir=tmp_path / "cache", min_pos=1, batch_size=16)
    models = ["pretrained", "random-0", "random-1", "pixels-8"]
    assert [(r["model"], r["target"]) for r in rows] == [(m, t) for m in models for t in TARGETS]
    for r in rows:
        assert 0.0 <= r["auroc"] <= 1.0 and r["ci_low"] <= r["ci_high"]
        assert r["n_train"] > 0 and 0 < r["n_pos"] < r["n_test"] <= 24
    assert {r["kind"] for r in rows} == {"encoder", "random", "pixels"}
    assert {r["dim"] for r in rows} == {32, 64}
    for t in TARGETS:  # every model is scored on the same rows
        assert len({(r["n_test"], r["n_pos"]) for r in rows if r["target"] == t}) == 1
    for name in encoders:
        assert (tmp_path / "cache" / name / "meta.json").is_file()

    summary = summarize_probe_study(rows)
    assert [s["target"] for s in summary] == list(TARGETS)
    by = {(r["model"], r["target"]): r["auroc"] for r in rows}
    for s in summary:
        rand = [by["random-0", s["target"]], by["random-1", s["target"]]]
        assert s["n_random"] == 2 and s["random_spread"] == pytest.approx(max(rand) - min(rand))
        assert s["delta"] == pytest.approx(by["pretrained", s["target"]] - np.mean(rand))
        assert s["delta_pixels"] == pytest.approx(by["pretrained", s["target"]] - by["pixels-8", s["target"]])

    md = format_probe_study(rows, title="probe")
    for m in models:
        for t in TARGETS:
            assert f"| {m} | {t} |" in md
    assert "random spread" in md and "pixels-8" in md

    # Too few positives: a row with a note instead of a probe.
    strict = probe_study(synth, {"random-0": encoders["random-0"]}, 56, targets=("Pleural Effusion",),
                         pixel_size=None, n_resamples=10, cache_dir=tmp_path / "cache", min_pos=50)
    assert len(strict) == 1 and strict[0]["auroc"] is None and "too few" in strict[0]["note"]
    assert "—" in format_probe_study(strict)


def test_cli_parsers(synth: Path, ckpt: Path, tmp_path: Path, capsys):
    from radgen.jobs.features import add_features_parser
    from radgen.jobs.probe import add_probe_parser

    parser = argparse.ArgumentParser(prog="radgen")
    sub = parser.add_subparsers(dest="command")
    add_features_parser(sub)
    add_probe_parser(sub)

    feats = tmp_path / "f"
    args = parser.parse_args(["features", "--encoder", str(ckpt), "--data", str(synth), "--out", str(feats),
                              "--image-size", "56", "--split", "validate", "--quiet"])
    assert args.func(args) == 0
    assert "12 x 32" in capsys.readouterr().out and load_features(feats).meta["split"] == "validate"
    args = parser.parse_args(["features", "--encoder", "nope.pt", "--data", str(synth), "--out", str(feats)])
    assert args.func(args) == 2 and "nope.pt" in capsys.readouterr().err

    out = tmp_path / "p"
    args = parser.parse_args(["probe", "--data", str(synth), "--encoder", f"pretrained={ckpt}",
                              "--random-seeds", "2", "--out", str(out), "--resamples", "20",
                              "--min-pos", "1", "--pixel-size", "8", "--target", "sex (F)", "--quiet"])
    assert args.func(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["image_size"] == 56  # from the checkpoint's ViTConfig
    assert report["encoders"] == {"pretrained": str(ckpt), "random-0": f"random-like:{ckpt}:0",
                                  "random-1": f"random-like:{ckpt}:1"}
    assert [r["model"] for r in report["rows"]] == ["pretrained", "random-0", "random-1", "pixels-8"]
    assert report["summary"][0]["n_random"] == 2
    assert "| random-1 | sex (F) |" in (out / "probe.md").read_text()
    assert (out / "features" / "random-1" / "meta.json").is_file()

    enc, size = resolve_encoders({}, random_seeds=2, random_arch="vit_tiny", image_size=112)
    assert enc == {"random-0": "random:vit_tiny:112:0", "random-1": "random:vit_tiny:112:1"} and size == 112
    args = parser.parse_args(["probe", "--data", str(synth), "--random-seeds", "1"])
    assert args.func(args) == 2 and "random-arch" in capsys.readouterr().err


def test_pretrain_study_end_to_end(tmp_path):
    """One command: synthesise, pretrain a tiny encoder, probe it against random inits and pixels."""
    from radgen.jobs.study import run_study

    tiny = ["model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
            "model.img_size=56", "ssl.out_dim=32", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
            "crops.global_size=56", "crops.local_size=28", "crops.n_local=2", "optim.batch_size=8",
            "optim.max_steps=3", "data.image_size=64", "data.cache=true", "train.checkpoint_every=0"]
    table = run_study(str(tmp_path / "study"), ["cpu_tiny"], tiny, n=80, size=64, random_seeds=2,
                      n_resamples=50, progress=False)
    assert "pretrained" in table and "random-1" in table and "pixels-32" in table
    assert (tmp_path / "study" / "study.md").is_file() and (tmp_path / "study" / "study.json").is_file()
    assert (tmp_path / "study" / "pretrain" / "checkpoint.pt").is_file()
