"""``radgen generate`` killed for real (SIGKILL, half-way) and resumed: nothing lost, nothing twice.

A folder of 100 good phantoms and 20 bad files with interleaved names (built by
``corpus.bad_files_for_kill``: empty, random bytes named .png and .dcm, truncated PNGs, text named
.jpg, a DICOM without pixel data, a PNG declaring 60,000 x 60,000 pixels) goes through a real ``python -m radgen generate`` process. The process is killed
once some records are on disk; ``--resume`` must end with exactly 120 records (100 reports, 20
error records), no duplicate ids, no torn line, and the same reports as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import bad_files_for_kill

from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset
from radgen.generation import read_records
from radgen.train import run_train

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_and_folder(tmp_path_factory, tiny_llm_dir, one_thread):
    root = tmp_path_factory.mktemp("kill")
    synth = root / "synth"
    generate_dataset(load_config("synth", [], [f"out={synth}", "n=100", "size=64", "workers=1", "seed=5"]),
                     progress=False)
    run = root / "run"
    cfg = load_config("reportgen", [], [f"out={run}", f"data.path={synth}", "encoder.spec=random:vit_tiny:56:0",
                                        f"llm.path={tiny_llm_dir}", "train.precision=fp32", "data.workers=0",
                                        "stage1.max_steps=1", "stage2.max_steps=1", "stage1.batch_size=2",
                                        "stage2.batch_size=2", "data.val_split=null", "data.max_train_samples=4"])
    assert run_train(cfg, progress=False)["status"] == "complete"
    folder = root / "in"
    folder.mkdir()
    pngs = sorted((synth / "images").glob("*.png"))
    assert len(pngs) == 100
    # one folder, names interleaving good and bad files, so a kill can land anywhere among both
    for i, p in enumerate(pngs):
        (folder / f"{6 * i:04d}_good_{p.name}").write_bytes(p.read_bytes())
    bad = []
    for j, name in enumerate(bad_files_for_kill(root / "bad", pngs[0].read_bytes())):
        bad.append(f"{30 * j + 3:04d}_{name}")
        (root / "bad" / name).rename(folder / bad[-1])
    return run, folder, bad


def _cmd(run: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "radgen", "generate", "--model", str(run), "--images", str(folder),
            "--out", str(out), "--batch-size", "1", "--workers", "0", "--max-new-tokens", "24", "--quiet", *extra]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_half_way_then_resume_gives_exactly_120_records(run_and_folder, tmp_path, ledger):
    run, folder, bad = run_and_folder
    out = tmp_path / "reports.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(run, folder, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    target = int(np.random.default_rng().integers(20, 80))  # a random point, away from both ends
    deadline = time.monotonic() + 600
    while _lines(out) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"generate ended before the kill ({_lines(out)} records): {proc.stderr.read()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _lines(out)
    assert 0 < partial < 120, partial

    resumed = subprocess.run(_cmd(run, folder, out, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 3, resumed.stderr[-2000:]  # 3: finished, some inputs failed
    assert "Traceback" not in resumed.stderr
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    recs = [json.loads(line) for line in text.splitlines()]  # every line whole: no torn record
    assert recs == read_records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == 120 and len(set(ids)) == 120
    ok = [r for r in recs if r["status"] == "ok"]
    errors = [r for r in recs if r["status"] == "error"]
    assert len(ok) == 100 and all("_good_" in r["id"] and isinstance(r["findings"], str) for r in ok)
    assert len(errors) == 20 and {r["id"] for r in errors} == set(bad)
    assert all(r["findings"] is None and r["error"] and r["reason"] for r in errors)
    # the same reports as a run that was never killed
    ref = tmp_path / "uninterrupted.jsonl"
    subprocess.run(_cmd(run, folder, ref), cwd=REPO, env=env, capture_output=True, timeout=600)
    same = {r["id"]: (r["findings"], r.get("error")) for r in read_records(ref)} == \
        {r["id"]: (r["findings"], r.get("error")) for r in recs}
    ledger.kill("generate", "SIGKILL", f"record {partial} of 120", identical=same)
    assert same
    print(f"\nreliability: generate SIGKILLed after {partial} of 120 records, resumed to 120 "
          f"(100 reports, 20 error records: {sorted({r['error'] for r in errors})}), 0 duplicates")
