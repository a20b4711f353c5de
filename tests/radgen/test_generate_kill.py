"""``radgen generate`` killed for real (SIGKILL, half-way) and resumed: nothing lost, nothing twice.

A folder of 100 good phantoms and 20 bad files (built here: empty, random bytes named .png and
.dcm, truncated PNGs, text named .jpg, a DICOM without pixel data, a PNG declaring 60,000 x
60,000 pixels) goes through a real ``python -m radgen generate`` process. The process is killed
once some records are on disk; ``--resume`` must end with exactly 120 records (100 reports, 20
error records), no duplicate ids and no torn line.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from radgen.config import load_config
from radgen.data.synth.generate import generate_dataset
from radgen.jobs.generate import read_records
from radgen.jobs.train import run_train

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
REPO = Path(__file__).resolve().parents[2]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring ``width x height`` and no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF))


def _dicom_without_pixels(path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.save_as(path, enforce_file_format=True)


def make_bad_files(folder: Path, good_png: bytes) -> list[str]:
    """20 files no loader can read, of 7 kinds; returns their names."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(3):
        for name, data in ((f"empty_{k}.png", b""), (f"random_{k}.png", rng.bytes(2048)),
                           (f"random_{k}.dcm", rng.bytes(4096)), (f"truncated_{k}.png", good_png[: 40 + 200 * k]),
                           (f"text_{k}.jpg", b"not an image\n" * (k + 1)), (f"huge_{k}.png", _png_header_only(60000, 60000))):
            (folder / name).write_bytes(data)
            names.append(name)
    for k in range(2):
        _dicom_without_pixels(folder / f"nopixels_{k}.dcm")
        names.append(f"nopixels_{k}.dcm")
    assert len(names) == 20
    return names


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
    (folder / "good").mkdir(parents=True)
    pngs = sorted((synth / "images").glob("*.png"))
    assert len(pngs) == 100
    for p in pngs:
        (folder / "good" / p.name).write_bytes(p.read_bytes())
    bad = make_bad_files(folder / "bad", pngs[0].read_bytes())
    return run, folder, bad


def _cmd(run: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "radgen", "generate", "--model", str(run), "--images", str(folder),
            "--out", str(out), "--batch-size", "1", "--workers", "0", "--max-new-tokens", "24", "--quiet", *extra]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_half_way_then_resume_gives_exactly_120_records(run_and_folder, tmp_path):
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
    assert len(ok) == 100 and all(r["id"].startswith("good/") and isinstance(r["findings"], str) for r in ok)
    assert len(errors) == 20 and {r["id"] for r in errors} == {f"bad/{b}" for b in bad}
    assert all(r["findings"] is None and r["error"] and r["reason"] for r in errors)
    print(f"\nreliability: generate SIGKILLed after {partial} of 120 records, resumed to 120 "
          f"(100 reports, 20 error records: {sorted({r['error'] for r in errors})}), 0 duplicates")
