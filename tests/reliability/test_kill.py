"""Real processes killed and resumed: encoder pretraining, report-generator training (both stages)
and ``radgen generate``, each with SIGKILL at a random step and SIGTERM as a pre-emption.

Each killed run is resumed with the same command and must end exactly where a run that was
never killed ends: the same log rows (losses, learning rates; timings aside) and bit-identical
weights. ``radgen demo`` is killed in tests/radgen/test_demo.py, against its shared run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import REPO, TINY_PRETRAIN, has_traceback

from encoder.checkpoint import load_checkpoint
from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# drop path on: the resumed run must also replay the random layer drops exactly
PRETRAIN = [*TINY_PRETRAIN, "model.drop_path_rate=0.1", "optim.epochs=1", "optim.steps_per_epoch=40",
            "train.checkpoint_every=3"]


def _rows(log: Path) -> list[dict]:
    try:
        with open(log, newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def _kill_at(cmd: list[str], progress, target: int, sig: int) -> tuple[int, int, str]:
    """Start ``cmd``, send ``sig`` once ``progress()`` reaches ``target``; (exit code, progress at
    the signal, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while progress() < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before the signal: {proc.stderr.read()[-1500:]}"
    at = progress()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, at, err


def _run(cmd: list[str], rc=(0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode in rc and not has_traceback(proc.stderr), proc.stderr[-3000:]
    return proc


def _strip(rows: list[dict], *timing: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill_synth") / "s"
    generate_dataset(load_config("synth", [], [f"out={out}", "n=16", "size=64", "workers=1", "seed=2"]), progress=False)
    return out


# ----------------------------------------------------------------------------------------------
# Encoder pretraining
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_reference(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_ref") / "run"
    _run(_pretrain_cmd(images, out))
    return out


def _pretrain_cmd(images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "radgen", "pretrain-encoder", "--data", str(images / "images"), "--out", str(out),
            *PRETRAIN]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_pretrain_killed_and_resumed_matches_an_uninterrupted_run(images, pretrain_reference, tmp_path, sig, ledger):
    out = tmp_path / "run"
    target = int(np.random.default_rng().integers(4, 30))
    rc, at, err = _kill_at(_pretrain_cmd(images, out), lambda: len(_rows(out / "log.csv")), target, sig)
    if sig == signal.SIGTERM:  # pre-emption: the step in flight finishes, a checkpoint is written, exit 143
        assert rc == 143 and not has_traceback(err), err[-2000:]
        assert load_checkpoint(out / "checkpoint.pt")["step"] >= at
    else:
        assert rc == -signal.SIGKILL
    _run(_pretrain_cmd(images, out))
    ref, got = _rows(pretrain_reference / "log.csv"), _rows(out / "log.csv")
    a, b = load_checkpoint(pretrain_reference / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    same = (_strip(ref, "images_per_s") == _strip(got, "images_per_s") and len(got) == 40
            and a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]))
    ledger.kill("pretrain-encoder", signal.Signals(sig).name, f"step {at} of 40", same)
    assert same


# ----------------------------------------------------------------------------------------------
# Report-generator training, both stages
# ----------------------------------------------------------------------------------------------
def _train_cmd(images: Path, out: Path, llm: Path) -> list[str]:
    return [sys.executable, "-m", "radgen", "train", "--data", str(images), "--encoder", "random:vit_tiny:56:0",
            "--out", str(out), "--quiet", f"llm.path={llm}", "train.precision=fp32", "data.workers=0",
            "stage1.max_steps=4", "stage2.max_steps=6", "stage1.batch_size=2", "stage2.batch_size=2",
            "data.val_split=null", "train.checkpoint_every=2", "train.log_every=1", "data.max_train_samples=8",
            "lora.dropout=0.1"]


@pytest.fixture(scope="module")
def train_reference(images, tiny_llm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_ref") / "run"
    _run(_train_cmd(images, out, tiny_llm_dir))
    return out


def _trained(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(run / "projector.safetensors"),
            **{f"lora.{k}": v for k, v in load_file(next((run / "adapter").glob("*.safetensors"))).items()}}


@pytest.mark.parametrize("sig,stage", [(signal.SIGKILL, "stage1"), (signal.SIGTERM, "stage1"),
                                       (signal.SIGKILL, "stage2"), (signal.SIGTERM, "stage2")],
                         ids=["SIGKILL-stage1", "SIGTERM-stage1", "SIGKILL-stage2", "SIGTERM-stage2"])
def test_train_killed_and_resumed_matches_an_uninterrupted_run(images, tiny_llm_dir, train_reference, tmp_path, sig,
                                                               stage, ledger):
    out = tmp_path / "run"
    # log rows: 4 of stage 1, then 6 of stage 2; signal after a random one of the chosen stage
    target = int(np.random.default_rng().integers(1, 4) if stage == "stage1" else np.random.default_rng().integers(5, 9))
    rc, at, err = _kill_at(_train_cmd(images, out, tiny_llm_dir), lambda: len(_rows(out / "log.csv")), target, sig)
    assert rc == (143 if sig == signal.SIGTERM else -signal.SIGKILL) and not has_traceback(err), err[-2000:]
    _run(_train_cmd(images, out, tiny_llm_dir))
    ref, got = _rows(train_reference / "log.csv"), _rows(out / "log.csv")
    a, b = _trained(train_reference), _trained(out)
    timing = ("tokens_per_s", "target_tokens_per_s", "seconds")
    same = (_strip(ref, *timing) == _strip(got, *timing) and len(got) == 10
            and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
    killed_in = got[at - 1]["stage"] if 0 < at <= len(got) else "start"
    ledger.kill("train", signal.Signals(sig).name, f"{killed_in} (log row {at} of 10)", same)
    assert same and not list(out.glob("checkpoint.pt*"))  # the training state goes once the run is complete


# ----------------------------------------------------------------------------------------------
# radgen generate under SIGTERM (SIGKILL: test_generate_kill.py)
# ----------------------------------------------------------------------------------------------
def test_generate_sigterm_then_resume(images, train_reference, tmp_path, ledger):
    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "radgen", "generate", "--model", str(train_reference), "--images",
                str(images / "images"), "--out", str(out), "--batch-size", "1", "--workers", "0",
                "--max-new-tokens", "24", "--quiet", *extra]

    out = tmp_path / "reports.jsonl"
    lines = lambda: out.read_bytes().count(b"\n") if out.is_file() else 0
    rc, at, err = _kill_at(cmd(out), lines, int(np.random.default_rng().integers(2, 12)), signal.SIGTERM)
    assert rc in (-signal.SIGTERM, 143) and not has_traceback(err), err[-2000:]
    _run(cmd(out, "--resume"))
    ref = tmp_path / "ref.jsonl"
    _run(cmd(ref))
    key = lambda p: [(r["id"], r["findings"]) for r in map(json.loads, p.read_text().splitlines())]
    same = sorted(key(out)) == sorted(key(ref)) and len(key(out)) == 16
    ledger.kill("generate", "SIGTERM", f"record {at} of 16", same)
    assert same
