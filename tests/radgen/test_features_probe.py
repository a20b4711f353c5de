"""The features job (skip-and-record, outputs, cache) and the probe study (pretrained vs random)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import radgen.features as fj
from encoder.checkpoint import CheckpointError, save_checkpoint
from encoder.specs import load_encoder
from encoder.vit import ViTConfig, ViTEncoder
from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset
from encoder.specs import EncoderSpecError, encoder_config, load_encoder_spec, missing_file, random_like_spec, which_of
from radgen.features import FeatureJobError, extract_features, load_features
from radgen.probes import (ProbeStudyError, format_report, resolve_encoders, run_probes, summarize,
                              write_report)

TINY = dict(arch="test-tiny", embed_dim=32, depth=2, num_heads=2, img_size=56)
TARGETS = ("Cardiomegaly", "Pleural Effusion", "sex (F)")
# A 2-block ViT that pretrains in seconds (on top of configs/encoder/cpu_tiny.yaml).
TINY_PRETRAIN = ["model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                 "model.img_size=56", "ssl.out_dim=32", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
                 "crops.global_size=56", "crops.local_size=28", "crops.n_local=2", "optim.batch_size=8",
                 "optim.max_steps=2", "data.image_size=64", "data.cache=true", "train.checkpoint_every=0"]


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
def test_encoder_specs(ckpt: Path, tmp_path: Path):
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
    with pytest.raises(EncoderSpecError):
        load_encoder_spec("no/such/checkpoint.pt")
    with pytest.raises(EncoderSpecError):
        load_encoder_spec("random-like:" + str(ckpt))  # no seed
    # student:<checkpoint> reads the student backbone; its config and random-like controls are the teacher's
    with pytest.raises(CheckpointError, match="no student backbone"):  # the fixture holds a teacher only
        load_encoder_spec(f"student:{ckpt}")
    both = tmp_path / "both.pt"
    other = ViTEncoder(ViTConfig(**TINY))
    save_checkpoint(both, {"vit_config": pre.cfg.to_dict(),
                           "model": {**{f"teacher.backbone.{k}": v for k, v in pre.state_dict().items()},
                                     **{f"student.backbone.{k}": v for k, v in other.state_dict().items()}}})
    student = load_encoder_spec(f"student:{both}")
    assert _sd_equal(student, other) and _sd_equal(load_encoder_spec(str(both)), pre)
    assert encoder_config(f"student:{both}") == pre.cfg
    assert _sd_equal(load_encoder_spec(random_like_spec(f"student:{both}", 0)), r0)
    assert missing_file(f"student:{both}") is None and missing_file("pixels:16") is None
    assert which_of(f"student:{both}") == "student" and which_of(str(both)) == "teacher"
    for bad in (f"student:{tmp_path}", "student:"):  # a folder, nothing: refused before any work
        assert "training checkpoint file" in missing_file(bad)
        with pytest.raises(EncoderSpecError, match="training checkpoint file"):
            load_encoder_spec(bad)


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
        # the data changed: an image file rewritten (new mtime) invalidates the cache
        import os

        test_row = next(r for r in map(json.loads, (synth / "manifest.jsonl").open()) if r["split"] == "test")
        img = synth / test_row["image"]
        st = img.stat()
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        try:
            with pytest.raises(AssertionError, match="recomputed"):
                extract_features(str(ckpt), synth, out, 56, **base)
        finally:
            os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
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
        seen += b.n
        assert [rid for rid, _ in b.items] == ids[seen - b.n:seen] and b.inputs.shape == (b.n, 3, 56, 56)
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


def test_run_probes_end_to_end(synth: Path, ckpt: Path, tmp_path: Path):
    encoders = {"pretrained": str(ckpt), "random-0": f"random-like:{ckpt}:0",
                "random-1": f"random-like:{ckpt}:1"}
    run = run_probes(synth, encoders, image_size=56, targets=TARGETS, pixel_size=8, mask_size=32,
                     seg_pixel_grid=8, seg_epochs=3, n_resamples=30, seed=0, cache_dir=tmp_path / "cache",
                     min_pos=1, batch_size=16)
    rows = run.rows
    models = ["pretrained", "random-0", "random-1", "pixels-8"]
    assert list(dict.fromkeys(r["model"] for r in rows)) == models
    assert {r["kind"] for r in rows} == {"encoder", "random", "pixels"}
    keys = {(r["probe"], r["target"], r["metric"]) for r in rows}
    for t in TARGETS:
        assert {("logistic", t, "auroc"), ("logistic", t, "ap"), ("knn", t, "auroc")} <= keys
    assert {("logistic", "macro", "auroc"), ("ridge", "age", "mae"), ("ridge", "age", "r2"),
            ("segment", "heart", "dice"), ("segment", "right_lung", "iou")} <= keys
    for r in rows:
        if r["value"] is not None and r["metric"] != "mae":
            assert r["low"] <= r["value"] <= r["high"] and r["n_train"] > 0
    for key in keys:  # every model is scored on the same test rows
        assert len({r["n_test"] for r in rows if (r["probe"], r["target"], r["metric"]) == key}) == 1
    for name in encoders:
        assert (tmp_path / "cache" / name / "meta.json").is_file()
        assert (tmp_path / "cache" / name / "patches" / "meta.json").is_file()
    assert next(r for r in rows if r["probe"] == "logistic" and r["model"] == "pretrained")["extra"]["C_chosen_on"] \
        == "validation"

    summary = summarize(rows)
    by = {(r["model"], r["probe"], r["target"], r["metric"]): r["value"] for r in rows}
    for s in summary:
        rand = [by["random-0", s["probe"], s["target"], s["metric"]], by["random-1", s["probe"], s["target"], s["metric"]]]
        if None in rand or s["value"] is None:
            continue
        assert s["n_random"] == 2 and s["random_spread"] == pytest.approx(max(rand) - min(rand))
        assert s["delta"] == pytest.approx(s["value"] - np.mean(rand))
        assert s["better_by"] == pytest.approx(-s["delta"] if s["metric"] == "mae" else s["delta"])

    md = format_report(run, title="probe")
    assert "macro AUROC" in md and "heart Dice" in md and "age MAE" in md and "| pixels-8 |" in md
    assert "Time per stage" in md and "features pretrained" in run.timings
    written = write_report(run, tmp_path / "out", {"data": str(synth)}, "probe")
    from PIL import Image

    for w in written:
        assert w.is_file()
        if w.suffix == ".png":
            with Image.open(w) as im:
                assert min(im.size) > 100
    assert {w.name for w in written} >= {"probe.json", "probe.csv", "probe.md", "logistic_auroc.png",
                                         "segment_dice.png", "age.png", "segment_examples.png"}

    # Too few positives: a row with a note instead of a probe.
    strict = run_probes(synth, {"random-0": encoders["random-0"]}, 56, probes=("logistic",),
                        targets=("Pleural Effusion",), pixel_size=None, n_resamples=10,
                        cache_dir=tmp_path / "cache", min_pos=50)
    assert len(strict.rows) == 1 and strict.rows[0]["value"] is None and "too few" in strict.rows[0]["note"]
    with pytest.raises(ProbeStudyError, match="unknown probe"):
        run_probes(synth, encoders, 56, probes=("logistic", "svm"))


def test_paired_gaps_reproduce_the_probes_numbers(synth: Path, ckpt: Path, tmp_path: Path):
    """The paired gap of each headline number is recomputed from per-image inputs: its point
    equals pretrained minus the random inits' mean of the probes' own numbers, its CI holds it, and
    the verdict follows the CI's sign; the tables and probe.json carry it."""
    from radgen.probes import HEADLINE

    encoders = {"pretrained": str(ckpt), "random-0": f"random-like:{ckpt}:0", "random-1": f"random-like:{ckpt}:1"}
    run = run_probes(synth, encoders, image_size=56, targets=TARGETS, pixel_size=None, mask_size=32,
                     seg_epochs=3, n_resamples=50, seed=0, cache_dir=tmp_path / "cache", min_pos=1, batch_size=16)
    by = {(r["model"], r["probe"], r["target"], r["metric"]): r["value"] for r in run.rows}
    keys = {(g["probe"], g["target"], g["metric"]) for g in run.paired}
    pixel = {("segment", s, "pixel_auroc") for s in ("right_lung", "left_lung", "heart")}
    assert keys <= {h[:3] for h in HEADLINE} | pixel  # the Dice's threshold-free companions too
    assert {("logistic", "macro", "auroc"), ("knn", "macro", "auroc"), ("segment", "heart", "dice"),
            ("ridge", "age", "mae")} | pixel <= keys
    for g in run.paired:
        key = (g["probe"], g["target"], g["metric"])
        want = by[("pretrained", *key)] - np.mean([by[("random-0", *key)], by[("random-1", *key)]])
        assert g["model"] == "pretrained" and g["n_random"] == 2
        assert g["delta"] == pytest.approx(want, abs=1e-9), key
        assert g["low"] <= g["delta"] <= g["high"]
        good = -1 if g["metric"] == "mae" else 1
        assert g["beyond"] == (min(good * g["low"], good * g["high"]) > 0)
        assert g["behind"] == (max(good * g["low"], good * g["high"]) < 0)
    gap = next(s for s in summarize(run.rows, run.paired) if s["model"] == "pretrained" and s["target"] == "heart"
               and s["metric"] == "dice")
    assert gap["paired_low"] is not None and gap["beyond_paired_ci"] in (True, False)
    assert "paired CI" in format_report(run)
    write_report(run, tmp_path / "out", {"data": str(synth)})
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["paired"] == json.loads(json.dumps(run.paired))


def test_probe_accepts_a_hugging_face_dinov2_folder(synth: Path, tmp_path: Path):
    """A local HF Dinov2 folder (as microsoft/rad-dino is) goes through the same command."""
    from transformers import Dinov2Config, Dinov2Model

    from radgen.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "hf-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                             patch_size=14, layerscale_value=1.0)).save_pretrained(folder)
    out = tmp_path / "p"
    code = main(["probe", "--data", str(synth), "--encoder", f"hf={folder}", "--random-seeds", "1",
                 "--probes", "logistic,segment", "--target", "sex (F)", "--pixel-size", "0",
                 "--seg-epochs", "2", "--mask-size", "28", "--min-pos", "1", "--resamples", "10",
                 "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["image_size"] == 56 and report["encoders"]["hf"] == str(folder)
    assert {r["model"] for r in report["rows"]} == {"hf", "random-0"}
    assert any(r["probe"] == "segment" and r["model"] == "hf" and r["value"] is not None for r in report["rows"])


def test_probe_scaling_curve_and_resume(synth: Path, tmp_path: Path, capsys):
    """Three nested fractions pretrained and probed; a second run reuses every finished fraction."""
    from radgen.cli import main
    from radgen.pipelines.scaling import nested_subsets

    subsets = nested_subsets(36, [0.25, 0.5, 1.0], seed=0)
    assert [len(s) for s in subsets] == [9, 18, 36]
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2])
    out = tmp_path / "scaling"
    args = ["probe", "scaling", "--data", str(synth), "--out", str(out), "--config", "cpu_tiny",
            "--fractions", "0.25", "0.5", "1.0", "--random-seeds", "1", "--probes", "logistic,segment",
            "--target", "sex (F)", "--pixel-size", "8", "--seg-epochs", "2", "--mask-size", "28",
            "--min-pos", "1", "--resamples", "10", "--quiet", *TINY_PRETRAIN]
    assert main(args) == 0
    assert "ran different numbers of steps" not in capsys.readouterr().err  # every fraction ran 2
    scaling = json.loads((out / "scaling.json").read_text())
    points = scaling["points"]
    assert scaling["steps"] == {"pretrained-9img": 2, "pretrained-18img": 2, "pretrained-36img": 2}
    assert {p["steps"] for p in points if "random init" not in p["series"]} == {2}
    assert "| series | pretraining images | steps |" in (out / "scaling.md").read_text()
    for series in ("sex AUROC (logistic)", "heart Dice"):
        assert sorted(p["n_images"] for p in points if p["series"] == series) == [9, 18, 36]
    assert any("random init" in p["series"] for p in points)
    from PIL import Image

    for name in ("scaling.png", "scaling_dice.png"):
        with Image.open(out / name) as im:
            assert min(im.size) > 100
    ckpts = sorted(out.glob("pretrain-*/checkpoint.pt"))
    assert len(ckpts) == 3
    stamps = [c.stat().st_mtime_ns for c in ckpts]
    assert main(args) == 0  # resumed: nothing is pretrained again
    assert [c.stat().st_mtime_ns for c in ckpts] == stamps


def test_scaling_steps_note():
    """Fractions that ran different step counts (same epochs, more images) are flagged; equal ones are not."""
    from radgen.pipelines.scaling import steps_note

    assert steps_note({"pretrained-400img": 400, "pretrained-800img": 400}) is None
    note = steps_note({"pretrained-400img": 100, "pretrained-800img": 200, "pretrained-1600img": 400})
    assert note is not None and "(100, 200, 400)" in note and "steps_per_epoch" in note


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
    from radgen.cli import main  # user-fixable errors map to exit 2 in one place, the CLI's entry point
    assert main(["features", "--encoder", "nope.pt", "--data", str(synth), "--out", str(feats)]) == 2
    assert "nope.pt" in capsys.readouterr().err

    out = tmp_path / "p"
    args = parser.parse_args(["probe", "--data", str(synth), "--encoder", f"pretrained={ckpt}",
                              "--random-seeds", "2", "--out", str(out), "--resamples", "20",
                              "--min-pos", "1", "--pixel-size", "8", "--target", "sex (F)", "--quiet",
                              "--probes", "logistic,knn"])
    assert args.func(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["image_size"] == 56  # from the checkpoint's ViTConfig
    assert report["encoders"] == {"pretrained": str(ckpt), "random-0": f"random-like:{ckpt}:0",
                                  "random-1": f"random-like:{ckpt}:1"}
    assert list(dict.fromkeys(r["model"] for r in report["rows"])) == ["pretrained", "random-0", "random-1",
                                                                        "pixels-8"]
    assert report["summary"][0]["n_random"] == 2
    assert "| random-1 | logistic | sex (F) | auroc |" in (out / "probe.md").read_text()
    assert (out / "features" / "random-1" / "meta.json").is_file()

    enc, size = resolve_encoders({}, random_seeds=2, random_arch="vit_tiny", image_size=112)
    assert enc == {"random-0": "random:vit_tiny:112:0", "random-1": "random:vit_tiny:112:1"} and size == 112
    assert main(["probe", "--data", str(synth), "--random-seeds", "1"]) == 2
    assert "random-arch" in capsys.readouterr().err


def test_pretrain_study_end_to_end(tmp_path):
    """One command: synthesise, pretrain a tiny encoder, probe it against random inits and pixels."""
    from radgen.pipelines.study import run_study

    tiny = ["model.arch=vit_tiny", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
            "model.img_size=56", "ssl.out_dim=32", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
            "crops.global_size=56", "crops.local_size=28", "crops.n_local=2", "optim.batch_size=8",
            "optim.max_steps=3", "data.image_size=64", "data.cache=true", "train.checkpoint_every=0"]
    table = run_study(str(tmp_path / "study"), ["cpu_tiny"], tiny, n=80, size=64, random_seeds=2,
                      n_resamples=50, progress=False)
    assert "pretrained" in table and "random-1" in table and "pixels-32" in table
    assert (tmp_path / "study" / "study.md").is_file() and (tmp_path / "study" / "probe" / "probe.json").is_file()
    assert (tmp_path / "study" / "pretrain" / "checkpoint.pt").is_file()


def test_segmentation_probe_smoke_on_real_lung_masks(shared_data: Path, tmp_path: Path):
    """Real radiographs with binary lung masks (lung_seg: 512 px squares; cxr: non-square films,
    cropped like the encoder's preprocessing): the probe runs end to end and the raw-pixel head
    (intensity + position) already finds the dark lung fields."""
    rows = [{"id": f"seg{i}", "image": str(shared_data / "lung_seg" / f"{i}.jpg"),
             "mask": str(shared_data / "lung_seg" / f"{i}-mask.png"), "split": "train"} for i in (1, 2, 3, 4)]
    for split, name in (("validate", "ARDSSevere.png"), ("test", "pneumocystis-pneumonia-1.jpg"),
                        ("test", "X-ray_of_cyst_in_pneumocystis_pneumonia_1.jpg")):
        stem = Path(name).stem
        rows.append({"id": stem, "image": str(shared_data / "cxr" / "images" / name),
                     "mask": str(shared_data / "cxr" / "lung_masks" / f"{stem}_mask.png"), "split": split})
    manifest = tmp_path / "real.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_probes(manifest, {"random-0": "random:vit_tiny:56:0"}, 56, probes=("segment",), pixel_size=16,
                     mask_size=48, seg_pixel_grid=24, seg_epochs=40, n_resamples=20)
    dice = {r["model"]: r for r in run.rows if r["metric"] == "dice"}
    assert set(dice) == {"random-0", "pixels-16"} and all(r["target"] == "lungs" for r in dice.values())
    assert all(0.0 <= r["value"] <= 1.0 and r["n_test"] == 2 for r in dice.values())
    assert dice["pixels-16"]["value"] > 0.5, dice["pixels-16"]
    assert run.predictions["segment_examples"]["true"].shape == (2, 48, 48)


def test_probes_without_validate_rows_and_with_partial_masks(synth: Path, tmp_path: Path):
    """No 'validate' split: regularisation falls back to the grid's middle (said so in the row).
    Rows without a mask take no part in segmentation (they are not scored as all background)."""
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    for i, r in enumerate(rows):
        r["image"] = str(synth / r["image"])
        r["mask"] = str(synth / r["mask"]) if i % 2 == 0 else ""
        r["split"] = "train" if r["split"] == "validate" else r["split"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = run_probes(manifest, {"random-0": "random:vit_tiny:56:0"}, 56, targets=("sex (F)",), pixel_size=None,
                     mask_size=28, seg_epochs=2, n_resamples=10, min_pos=1)
    by = {(r["probe"], r["target"], r["metric"]): r for r in run.rows}
    assert by["logistic", "sex (F)", "auroc"]["extra"]["C_chosen_on"] == "default (validation unusable)"
    assert by["ridge", "age", "mae"]["value"] is not None
    n_test_masked = sum(1 for i, r in enumerate(rows) if r["split"] == "test" and i % 2 == 0)
    assert by["segment", "heart", "dice"]["n_test"] <= n_test_masked


def test_results_page_judges_the_gap_by_its_paired_ci(tmp_path: Path):
    """With paired gaps the page's verdict column and its plain-words line follow the paired CI
    (a pretrained value below the random mean but inside the CI is not called behind); a
    probe.json from before the paired gap keeps the old screen."""
    from radgen.report.page import _section_probe

    def rows(value: float) -> list[dict]:
        return [{"model": m, "kind": k, "spec": "x", "dim": 3, "probe": "segment", "target": "heart",
                 "metric": "dice", "value": v, "low": v - 0.05, "high": v + 0.05, "n_train": 10, "n_test": 20,
                 "n_pos": None} for m, k, v in (("pretrained", "encoder", value), ("random-0", "random", 0.5))]

    def page(value: float, low: float, high: float, behind: bool, with_paired: bool = True) -> str:
        paired = [{"model": "pretrained", "probe": "segment", "target": "heart", "metric": "dice",
                   "delta": value - 0.5, "low": low, "high": high, "n_test": 20, "n_random": 1,
                   "beyond": low > 0, "behind": behind}] if with_paired else []
        folder = tmp_path / f"p{value}{with_paired}"
        folder.mkdir()
        r = rows(value)
        (folder / "probe.json").write_text(json.dumps({"rows": r, "summary": summarize(r, paired), "paired": paired}))
        return _section_probe({"probe": [folder / "probe.json"]}, folder, folder)

    level = page(0.49, -0.03, 0.01, behind=False)
    assert "level [-0.030, +0.010]" in level and "Plainly" not in level
    behind = page(0.3, -0.25, -0.15, behind=True)
    assert "behind [-0.250, -0.150]" in behind and "beyond the paired 95% CI on 1 of 1" in behind
    old = page(0.49, 0, 0, behind=False, with_paired=False)
    assert "beyond CI" in old and "behind random init on 1 of 1" in old
