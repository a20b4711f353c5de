"""The one checkpoint helper (atomic, checksummed, last K kept, a failed write loses nothing) and the
run guards (NaN/inf loss: stop or skip; collapse: stop), on the real training loops."""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import TINY_PRETRAIN

from encoder.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint
from encoder.guards import TrainingStopped
from radgen.config import load_config
from radgen.train import STATE_FORMAT

pytestmark = pytest.mark.reliability

TINY = [*TINY_PRETRAIN, "optim.epochs=2", "optim.steps_per_epoch=3", "optim.warmup_epochs=1",
        "teacher.warmup_temp_epochs=1", "train.checkpoint_every=2"]


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step))}


# ----------------------------------------------------------------------------------------------
# Checkpoint helper
# ----------------------------------------------------------------------------------------------
def test_last_k_kept_and_fallback_to_the_previous_one(tmp_path: Path):
    p = tmp_path / "checkpoint.pt"
    for step in range(1, 6):
        save_checkpoint(p, _state(step), keep=3)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "checkpoint.pt.1", "checkpoint.pt.1.sha256", "checkpoint.pt.2",
                     "checkpoint.pt.2.sha256", "checkpoint.pt.sha256"]
    assert [load_checkpoint(tmp_path / n)["step"] for n in ("checkpoint.pt", "checkpoint.pt.1", "checkpoint.pt.2")] == [5, 4, 3]
    # the newest is torn (a kill after the rename, before its checksum): the previous one is used
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(p)
    with pytest.warns(UserWarning, match="checksum"):
        assert load_latest_checkpoint(p)["step"] == 4
    # fewer kept than before: the extra old copies go
    save_checkpoint(p, _state(6), keep=1)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert load_latest_checkpoint(tmp_path / "none.pt") is None


def test_stale_checksum_after_a_crash_falls_back(tmp_path: Path):
    """A crash between renaming the new file in and writing its checksum."""
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _state(1), keep=2)
    old_sum = (tmp_path / "checkpoint.pt.sha256").read_text()
    save_checkpoint(p, _state(2), keep=2)
    (tmp_path / "checkpoint.pt.sha256").write_text(old_sum)
    with pytest.warns(UserWarning):
        assert load_latest_checkpoint(p)["step"] == 1


class _FullDisk:
    """A file whose ``write`` stores half the bytes, then fails as a full disk does."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize("where", ["data", "fsync", "checksum"])
def test_disk_full_leaves_the_previous_checkpoint_valid(tmp_path: Path, monkeypatch, where: str):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _state(1), keep=2)
    save_checkpoint(p, _state(2), keep=2)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    real_fdopen, calls = os.fdopen, {"n": 0}

    def fdopen(fd, *a, **k):  # call 1 writes the checkpoint bytes, call 2 its checksum
        calls["n"] += 1
        fh = real_fdopen(fd, *a, **k)
        return _FullDisk(fh) if (where == "data" and calls["n"] == 1) or (where == "checksum" and calls["n"] == 2) else fh

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", fdopen)
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(p, _state(3), keep=2)
    monkeypatch.undo()
    after = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    if where == "checksum":
        # the new file was renamed in, its checksum is the old one: it fails and the previous is used
        assert set(after) == set(before)
        with pytest.warns(UserWarning, match="checksum"):
            assert load_latest_checkpoint(p)["step"] == 2
    else:
        assert after == before  # no temporary file left, nothing rotated, nothing overwritten
        assert load_latest_checkpoint(p)["step"] == 2 and load_checkpoint(tmp_path / "checkpoint.pt.1")["step"] == 1


def test_weights_only_loading_refuses_pickled_code(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"format": "radgen-encoder/1", "x": Evil()}, p)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(p)


# ----------------------------------------------------------------------------------------------
# Guards on the pretraining loop
# ----------------------------------------------------------------------------------------------
def _images(n: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 1, 6, 6, generator=g)
    return list(torch.nn.functional.interpolate(low, size=64, mode="bicubic").clamp(0, 1))


def _poison_loss(monkeypatch, at_calls: set[int]):
    """Make the SSL loss NaN on the given forward calls (0-based)."""
    from encoder.ssl import SSLMetaArch

    real, calls = SSLMetaArch.forward, {"n": 0}

    def forward(self, batch, temp):
        loss, part = real(self, batch, temp)
        k = calls["n"]
        calls["n"] += 1
        if k in at_calls:
            loss = loss * float("nan")
            part = {**part, "loss": part["loss"] * float("nan")}  # logs are device tensors until read
        return loss, part

    monkeypatch.setattr(SSLMetaArch, "forward", forward)


def _log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_pretrain_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch, one_thread, ledger):
    from encoder.train import train

    out = tmp_path / "nan"
    _poison_loss(monkeypatch, {4})  # step 4; checkpoints at steps 2 and 4 (after step index 3)
    with pytest.raises(TrainingStopped, match=r"pretrain step 4: the loss or gradient is NaN/inf.*step 4\) is kept"):
        train(load_config("encoder", [], [f"out={out}", *TINY]), _images())
    ck = load_latest_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    monkeypatch.undo()
    # re-running resumes from it and finishes like a run that never met the NaN
    summary = train(load_config("encoder", [], [f"out={out}", *TINY]), _images())
    clean = tmp_path / "clean"
    train(load_config("encoder", [], [f"out={clean}", *TINY]), _images())
    assert summary["status"] == "finished" and summary["steps"] == 6
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
    assert strip(_log(out)) == strip(_log(clean))
    ledger.fault("pretrain-encoder", "NaN loss at step 4 (on_nonfinite=stop)",
                 "stopped, checkpoint of step 4 kept, resumed to the uninterrupted result", True)


def test_pretrain_nan_skip_drops_the_step(tmp_path: Path, monkeypatch, one_thread, ledger):
    from encoder.train import train

    out = tmp_path / "skip"
    _poison_loss(monkeypatch, {1, 3})
    s = train(load_config("encoder", [], [f"out={out}", *TINY, "train.on_nonfinite=skip"]), _images())
    assert s["status"] == "finished" and s["last"]["nonfinite_skipped"] == 2
    ck = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    rows = _log(out)
    assert [r["nonfinite_skipped"] for r in rows] == ["0", "1", "1", "2", "2", "2"]
    # a skipped step leaves the teacher, and so its share of its starting weights, unchanged
    share = [float(r["teacher_start_share"]) for r in rows]
    assert share[1] == share[0] and share[3] == share[2] and share[2] < share[1]
    kept = [float(r["momentum"]) for i, r in enumerate(rows) if i not in (1, 3)]
    assert share[-1] == pytest.approx(float(np.prod(kept)), rel=1e-4)
    # stopped after the first skip and resumed: the share is carried, not re-derived from the schedule
    split = tmp_path / "split"
    _poison_loss(monkeypatch, {1})
    train(load_config("encoder", [], [f"out={split}", *TINY, "train.on_nonfinite=skip", "optim.max_steps=2"]), _images())
    _poison_loss(monkeypatch, {1})  # the resumed run's second forward is step 3
    train(load_config("encoder", [], [f"out={split}", *TINY, "train.on_nonfinite=skip"]), _images())
    assert [r["teacher_start_share"] for r in _log(split)] == [r["teacher_start_share"] for r in rows]
    with pytest.raises(TrainingStopped, match="max_nonfinite_skips=1"):
        _poison_loss(monkeypatch, {0, 1})
        train(load_config("encoder", [], [f"out={tmp_path / 'many'}", *TINY, "train.on_nonfinite=skip",
                                          "train.max_nonfinite_skips=1"]), _images())
    ledger.fault("pretrain-encoder", "NaN loss at steps 1 and 3 (on_nonfinite=skip)", "steps skipped and counted",
                 True)


def test_collapse_monitor_stops_pretraining(tmp_path: Path, one_thread, ledger):
    """A teacher temperature far too high: every step is flagged 'uniform'; stop after 3 in a row."""
    from encoder.train import train

    out = tmp_path / "collapse"
    with pytest.raises(TrainingStopped, match=r"flagged 'uniform' for 3 steps in a row.*step 2\) is kept"):
        train(load_config("encoder", [], [f"out={out}", *TINY, "teacher.warmup_temp=1.0", "teacher.temp=1.0",
                                          "train.stop_on_collapse=3"]), _images())
    assert load_latest_checkpoint(out / "checkpoint.pt")["step"] == 2
    ledger.fault("pretrain-encoder", "collapse flagged 3 steps in a row (stop_on_collapse=3)",
                 "stopped, checkpoint of step 2 kept", True)


# ----------------------------------------------------------------------------------------------
# Guards on the report-generator loop
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from radgen.data.synth.generate import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "s"
    generate_dataset(load_config("synth", [], [f"out={out}", "n=16", "size=64", "workers=1", "seed=3"]), progress=False)
    return out


def _rg(out: Path, synth: Path, llm: Path, *extra: str):
    return load_config("reportgen", [], [f"out={out}", f"data.path={synth}", "encoder.spec=random:vit_tiny:56:0",
                                         f"llm.path={llm}", "train.precision=fp32", "data.workers=0", "train.log_every=1",
                                         "stage1.max_steps=3", "stage2.max_steps=3", "stage1.batch_size=2",
                                         "stage2.batch_size=2", "data.val_split=null", "train.checkpoint_every=1",
                                         "data.max_train_samples=6", *extra])


def _poison_generator(monkeypatch, at_calls: set[int]):
    from radgen.model.model import ReportGenerator

    real, calls = ReportGenerator.forward, {"n": 0}

    def forward(self, *a, **k):
        res = real(self, *a, **k)
        if "loss_sum" in res:
            if calls["n"] in at_calls:
                res = {**res, "loss_sum": res["loss_sum"] * float("inf")}
            calls["n"] += 1
        return res

    monkeypatch.setattr(ReportGenerator, "forward", forward)


def test_generator_inf_loss_stops_then_resumes_exactly(tmp_path: Path, synth: Path, tiny_llm_dir, monkeypatch,
                                                      one_thread, ledger):
    from radgen.train import run_train

    out = tmp_path / "inf"
    _poison_generator(monkeypatch, {4})  # stage 2, step 2 (one micro-batch per step)
    with pytest.raises(TrainingStopped, match=r"stage2 step 2: the loss or gradient is NaN/inf.*checkpoint is kept"):
        run_train(_rg(out, synth, tiny_llm_dir), progress=False)
    state = load_latest_checkpoint(out / "checkpoint.pt", fmt=STATE_FORMAT)
    assert (state["stage"], state["step"]) == ("stage2", 1)
    monkeypatch.undo()
    assert run_train(_rg(out, synth, tiny_llm_dir), progress=False)["status"] == "complete"
    clean = tmp_path / "clean"
    run_train(_rg(clean, synth, tiny_llm_dir), progress=False)
    strip = lambda p: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "target_tokens_per_s", "seconds")}
                       for r in csv.DictReader(open(p / "log.csv"))]
    assert strip(out) == strip(clean)
    ledger.fault("train", "inf loss at stage2 step 2 (on_nonfinite=stop)", "stopped, last good checkpoint kept, "
                 "resumed to the uninterrupted result", True)


def test_generator_nan_skip(tmp_path: Path, synth: Path, tiny_llm_dir, monkeypatch, one_thread, ledger):
    from radgen.train import run_train

    _poison_generator(monkeypatch, {1})
    s = run_train(_rg(tmp_path / "skip", synth, tiny_llm_dir, "train.on_nonfinite=skip"), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "skip" / "log.csv")))
    assert s["status"] == "complete" and rows[1]["loss"] in ("inf", "nan")
    assert all(torch.isfinite(v).all() for v in
               __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "skip" / "projector.safetensors").values())
    ledger.fault("train", "inf loss at stage1 step 2 (on_nonfinite=skip)", "step skipped", True)


def test_bad_pretrain_config_lists_every_problem(tmp_path: Path):
    from encoder.train import validate_config

    cfg = load_config("encoder", [], [f"out={tmp_path}", *TINY, "optim.batch_size=1", "crops.local_size=30",
                                      "train.on_nonfinite=ignore", "masking.style=zigzag",
                                      "crops.range_compression=[0.5,-0.5,0.1]", "crops.collimation_prob=2"])
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    text = str(err.value)
    for s in ("optim.batch_size", "crop sizes", "train.on_nonfinite", "masking.style",
              "crops.range_compression", "crops.collimation_prob"):
        assert s in text


@pytest.mark.parametrize("bad", ["[0.5,-0.5]", "[-1.5,0.2]", "[0.1]"])
def test_bad_range_compression_is_refused(tmp_path: Path, bad: str):
    # lo > hi, out of [-1, 1], and the wrong length are each refused before training
    from encoder.train import validate_config

    cfg = load_config("encoder", [], [f"out={tmp_path}", *TINY, f"crops.range_compression={bad}"])
    with pytest.raises(ValueError, match="crops.range_compression"):
        validate_config(cfg)
