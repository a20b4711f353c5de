"""Every job that reads inputs, run as a real ``radgen`` process over the bad-input corpus.

One folder holds DICOM phantoms carrying fake patient identifiers plus every bad image case of
``corpus.build_image_corpus``; a manifest lists them all (with an empty and a 1 MB report), and
further manifests hold a path climbing out of their folder, invalid UTF-8, or several problems at
once. Each job must handle each case the documented way -- skip-and-record with the reason, or a
clear error naming the file (exit code 2) before any model is loaded -- and never print a
traceback. Every file the jobs write, and everything they print, is then searched for the fake
identifiers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from corpus import (IDENTIFIERS, SEARCH, TINY_PRETRAIN, build_image_corpus, dicom_with_identifiers, has_traceback,
                    radgen, search_identifiers)

from radgen.config import load_config
from radgen.data.images import load_image
from radgen.data.synth.generate import generate_dataset

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

PRETRAIN = [*TINY_PRETRAIN, "optim.epochs=1", "train.checkpoint_every=0"]
LONG_REPORT = "The heart is normal in size. " * 36_000  # about 1 MB


@dataclass
class World:
    root: Path
    data: Path                     # folder with manifest.jsonl
    images: Path                   # the mixed folder (good DICOMs + every bad case)
    cases: list
    good: list[str]
    outputs: list[Path] = field(default_factory=list)   # every folder a job wrote
    printed: dict[str, str] = field(default_factory=dict)  # everything a job printed


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("corpus")
    synth = root / "synth"
    generate_dataset(load_config("synth", [], [f"out={synth}", "n=24", "size=64", "workers=1", "seed=11"]),
                     progress=False)
    data, images = root / "data", root / "data" / "images"
    images.mkdir(parents=True)
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    for r in rows:  # the good images: DICOMs carrying fake identifiers
        img, _ = load_image(synth / r["image"])
        dicom_with_identifiers(images / f"{r['id']}.dcm", img)
        r["image"] = f"images/{r['id']}.dcm"
    cases = build_image_corpus(images, load_image(synth / "images" / "synth_000000.png")[0])
    for c in cases:  # every bad image is also a training row of the manifest
        rows += [{"id": f"bad/{f}", "image": f"images/{f}", "split": "train", "findings": "Heart size is normal."}
                 for f in c.files if f != "cycle"]
    first = next(r for r in rows if r["split"] == "train")
    rows += [{**first, "id": "report/empty", "findings": ""}, {**first, "id": "report/long", "findings": LONG_REPORT}]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return World(root, data, images, cases, good=[f"{r['id']}.dcm" for r in rows if not r["id"].startswith(("bad/", "report/"))])


def _run(world: World, job: str, *args: str, out: Path | None = None, rc=(0,)):
    proc = radgen(job, *args, check_rc=rc)
    world.printed[f"{job} {out.name if out else ''} (stdout+stderr)"] = proc.stdout + proc.stderr
    if out is not None:
        world.outputs.append(out)
    return proc


def _judge(ledger, job: str, world: World, got_of, stderr: str) -> list[str]:
    """Record every case of the corpus for ``job``; returns the ones not handled as documented."""
    tb = has_traceback(stderr)
    bad = []
    for c in world.cases:
        got = got_of(c)
        if not ledger.input(job, c.name, c.expect, got, tb):
            bad.append(f"{c.name}: expected {c.expect}, got {got}")
    return bad


def _got_from(records: dict[str, str], listed: set[str]):
    """Outcome of a case from {file name: error code} and the set of file names the job kept."""
    def got(case) -> str:
        outs = set()
        for f in case.files:
            if f in records:
                outs.add(f"skipped:{records[f]}")
            elif f in listed:
                outs.add("loaded")
            elif any(k.startswith(f + "/") for k in list(records) + list(listed)):
                outs.add("entered (loop)")
            else:
                outs.add("not listed")
        return outs.pop() if len(outs) == 1 else "mixed: " + ", ".join(sorted(outs))
    return got


# ----------------------------------------------------------------------------------------------
# One real process per job
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(world: World, tiny_llm_dir) -> Path:
    out = world.root / "run"
    proc = _run(world, "train", "--data", world.data, "--encoder", "random:vit_tiny:56:0", "--out", out, "--quiet",
                f"llm.path={tiny_llm_dir}", "train.precision=fp32", "data.workers=0", "stage1.max_steps=1",
                "stage2.max_steps=1", "stage1.batch_size=2", "stage2.batch_size=2", "data.val_split=null",
                "prompt.max_target_tokens=32", out=out)
    world.printed["train summary"] = proc.stdout
    return out


def test_pretrain_encoder(world: World, ledger):
    out = world.root / "pretrain"
    n = sum(1 for _ in world.images.iterdir())
    proc = _run(world, "pretrain-encoder", "--data", world.images, "--out", out, *PRETRAIN,
                f"optim.steps_per_epoch={3 * (n // 4)}", "data.cache=true", out=out)
    records = {Path(r["path"]).name: r["error"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    listed = {f.name for f in world.images.iterdir()} - set(records)  # every other image was read
    bad = _judge(ledger, "pretrain-encoder", world, _got_from(records, listed - {"cycle"}), proc.stderr)
    assert not bad, bad
    assert f"{len(records)} of " in proc.stdout and "skipped and recorded" in proc.stdout


def test_features(world: World, ledger):
    out = world.root / "features"
    proc = _run(world, "features", "--encoder", "random:vit_tiny:56:0", "--data", world.images, "--out", out,
                "--image-size", "56", "--quiet", out=out)
    # folder ids have no suffix, except where two files differ only by it (random.png, random.dcm)
    stems = Counter(Path(f.name).stem for f in world.images.iterdir())
    name = {(f.name if stems[Path(f.name).stem] > 1 else Path(f.name).stem): f.name for f in world.images.iterdir()}
    records = {name[r["id"]]: r["error"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    kept = {name[i] for i in json.loads((out / "ids.json").read_text())}
    assert set(world.good) <= kept
    bad = _judge(ledger, "features", world, _got_from(records, kept), proc.stderr)
    assert not bad, bad
    assert f"skipped {len(records)} unreadable" in proc.stdout + proc.stderr


def test_probe(world: World, ledger):
    out = world.root / "probe"
    proc = _run(world, "probe", "--encoder", "tiny=random:vit_tiny:56:0", "--data", world.data, "--out", out,
                "--probes", "logistic", "--resamples", "20", "--min-pos", "1", "--quiet", out=out)
    skipped = out / "features" / "tiny" / "skipped.jsonl"
    records = {r["id"].removeprefix("bad/"): r["error"] for r in map(json.loads, skipped.read_text().splitlines())}
    kept = {i.removeprefix("bad/") for i in json.loads((skipped.parent / "ids.json").read_text())}
    bad = _judge(ledger, "probe", world, _got_from(records, kept), proc.stderr)
    assert not bad, bad
    assert (out / "probe.json").is_file()


def test_train(world: World, trained: Path, ledger):
    records = {r["id"].removeprefix("bad/"): r["error"]
               for r in map(json.loads, (trained / "skipped.jsonl").read_text().splitlines())}
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["n_skipped"] == len(records)
    kept = {c for case in world.cases for c in case.files} - set(records)
    bad = _judge(ledger, "train", world, _got_from(records, kept - {"cycle"}), world.printed["train summary"])
    # the report cases: an empty report is left out and counted; a 1 MB one is cut to the token limit
    handled = ledger.input("train", "empty report", "left out and counted",
                           "left out and counted" if summary["n_without_text"] == 1 else f"n_without_text={summary['n_without_text']}")
    rows = [json.loads(line) for line in (world.data / "manifest.jsonl").open()]
    with_text = [r for r in rows if r["split"] == "train" and r["findings"]]
    assert any(r["id"] == "report/long" for r in with_text)
    handled &= ledger.input("train", "1 MB report", "trained on (cut to prompt.max_target_tokens)",
                            "trained on (cut to prompt.max_target_tokens)"
                            if summary["n_train"] == len(with_text) - len(records) else "dropped")
    assert not bad and handled, bad
    assert "1 training rows with an empty 'findings' left out" in world.printed["train summary"]


def test_generate(world: World, trained: Path, ledger):
    out = world.root / "generate" / "reports.jsonl"
    proc = _run(world, "generate", "--model", trained, "--images", world.images, "--out", out, "--batch-size", "4",
                "--workers", "0", "--max-new-tokens", "8", "--quiet", out=out.parent, rc=(3,))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    records = {r["id"]: r["error"] for r in recs if r["status"] == "error"}
    kept = {r["id"] for r in recs if r["status"] == "ok"}
    assert set(world.good) <= kept and len(recs) == len({r["id"] for r in recs})
    bad = _judge(ledger, "generate", world, _got_from(records, kept), proc.stderr)
    assert not bad, bad


def test_export(world: World, trained: Path):
    out = world.root / "export"
    _run(world, "export", "--model", trained, "--out", out, out=out)
    assert (out / "config.json").is_file()


def test_manifest_folder(world: World, ledger):
    out = world.root / "manifest" / "manifest.csv"
    proc = _run(world, "manifest", "folder", world.images, "--split-by-patient", "--out", out, out=out.parent)
    text = out.read_text()
    assert all(g in text for g in world.good)
    assert not has_traceback(proc.stderr)


def _write_reports(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate(world: World, ledger):
    rows = [json.loads(line) for line in (world.data / "manifest.jsonl").open()]
    refs = [{"id": r["id"], "findings": r["findings"]} for r in rows if r.get("findings") and r["id"] != "report/long"]
    folder = world.root / "eval_in"
    ref_file = _write_reports(folder / "refs.jsonl", refs)
    preds = [{"id": r["id"], "report": "No acute cardiopulmonary process."} for r in refs]
    preds[0]["report"], preds[1]["report"] = "", LONG_REPORT
    pred_file = _write_reports(folder / "preds.jsonl", preds)
    out = world.root / "evaluate"
    proc = _run(world, "evaluate", "--predictions", pred_file, "--references", ref_file, "--out", out,
                "--metrics", "bleu,rouge_l,chexpert", "--resamples", "20", out=out)
    metrics = json.loads((out / "metrics.json").read_text())
    tb = has_traceback(proc.stderr)
    ok = ledger.input("evaluate", "empty report (prediction)", "scored as empty and counted",
                      "scored as empty and counted" if metrics["inputs"]["empty_predictions"] == 1 else "lost", tb)
    ok &= ledger.input("evaluate", "1 MB report (prediction)", "cut and counted",
                       "cut and counted" if metrics["inputs"]["reports_cut_to_max_chars"] == 1 else "not cut", tb)
    # invalid UTF-8 and an empty reference: one clear error naming the file (and the line)
    raw = pred_file.read_bytes().replace(b"No acute", b"No \xff\xfe acute", 1)
    (folder / "bad_utf8.jsonl").write_bytes(raw)
    e = _run(world, "evaluate", "--predictions", folder / "bad_utf8.jsonl", "--references", ref_file,
             "--out", world.root / "evaluate_x", rc=(2,))
    ok &= ledger.input("evaluate", "invalid UTF-8 (predictions)", "error naming the file and line",
                       "error naming the file and line" if "bad_utf8.jsonl:" in e.stderr and "not UTF-8" in e.stderr
                       else e.stderr[-200:], has_traceback(e.stderr))
    _write_reports(folder / "empty_ref.jsonl", [{**refs[0], "findings": ""}, *refs[1:]])
    e = _run(world, "evaluate", "--predictions", pred_file, "--references", folder / "empty_ref.jsonl",
             "--out", world.root / "evaluate_x", rc=(2,))
    ok &= ledger.input("evaluate", "empty report (reference)", "error naming the file",
                       "error naming the file" if "empty_ref.jsonl" in e.stderr and "empty" in e.stderr
                       else e.stderr[-200:], has_traceback(e.stderr))
    assert ok


# ----------------------------------------------------------------------------------------------
# Manifests that must be refused before any model is loaded
# ----------------------------------------------------------------------------------------------
def _manifests(world: World) -> dict[str, tuple[Path, list[str]]]:
    """name -> (manifest, strings its error must contain)."""
    rows = [json.loads(line) for line in (world.data / "manifest.jsonl").open()][:6]
    folder = world.data
    escape = folder / "escape.jsonl"
    _write_reports(escape, rows + [{**rows[0], "id": "escape", "image": "../../../outside.png"}])
    utf8 = folder / "utf8.jsonl"
    utf8.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                     + b'{"id": "u1", "image": "images/u1.dcm", "findings": "He\xffart normal."}\n')
    several = folder / "several.jsonl"
    _write_reports(several, rows + [{**rows[0]}, {**rows[1], "id": "b1", "split": "holdout"},
                                    {**rows[2], "id": "b2", "age": "old"}])
    return {"manifest path climbing out of its folder": (escape, ["escape.jsonl", "row 7", "climbs out"]),
            "manifest with invalid UTF-8": (utf8, ["utf8.jsonl", "row 7", "not UTF-8"]),
            "manifest with three bad rows": (several, ["several.jsonl", "3 problems", "duplicate id", "unknown split",
                                                       "age must be a number"])}


@pytest.mark.parametrize("job", ["pretrain-encoder", "features", "probe", "train"])
def test_bad_manifests_fail_fast(world: World, job: str, tiny_llm_dir, ledger):
    for name, (manifest, needles) in _manifests(world).items():
        out = world.root / f"refused_{job}"
        args = {"pretrain-encoder": ["--data", manifest, "--out", out, *PRETRAIN],
                "features": ["--encoder", "random:vit_tiny:56:0", "--data", manifest, "--out", out],
                "probe": ["--encoder", "t=random:vit_tiny:56:0", "--data", manifest, "--out", out],
                "train": ["--data", manifest, "--encoder", "random:vit_tiny:56:0", "--out", out,
                          f"llm.path={tiny_llm_dir}"]}[job]
        proc = _run(world, job, *args, rc=(2,))
        named = all(s in proc.stderr for s in needles)
        assert ledger.input(job, name, "error naming the file and row(s)",
                            "error naming the file and row(s)" if named else proc.stderr[-300:],
                            has_traceback(proc.stderr)), proc.stderr
        assert not (out / "checkpoint.pt").exists() and not (out / "features.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Identifiers and output paths
# ----------------------------------------------------------------------------------------------
def test_ids_cannot_escape_the_output_folder(world: World, trained: Path, ledger):
    """Row ids are data, never path parts: ids like '../../x' and '/abs/x' write nothing outside --out."""
    rows = [json.loads(line) for line in (world.data / "manifest.jsonl").open()][:4]
    evil = ["../../../escaped_a", "/tmp/escaped_b", "..\\..\\escaped_c", "a/../../escaped_d"]
    for r, i in zip(rows, evil):
        r["id"] = i
    folder = world.data
    _write_reports(folder / "evil_ids.jsonl", rows)
    before = {p for p in world.root.rglob("*")}
    out = world.root / "evil"
    _run(world, "features", "--encoder", "random:vit_tiny:56:0", "--data", folder / "evil_ids.jsonl", "--out",
         out / "features", "--image-size", "56", "--quiet", out=out)
    _run(world, "generate", "--model", trained, "--images", folder / "evil_ids.jsonl", "--out", out / "gen.jsonl",
         "--max-new-tokens", "4", "--workers", "0", "--quiet")
    new = {p for p in world.root.rglob("*")} - before
    outside = [str(p) for p in new if not p.is_relative_to(out)]
    stray = [p for p in Path("/tmp").glob("escaped_*")]
    assert ledger.input("features+generate", "ids with ../ and absolute paths", "written inside --out only",
                        "written inside --out only" if not outside and not stray else f"outside: {outside + stray}")
    ids = [json.loads(line)["id"] for line in (out / "gen.jsonl").read_text().splitlines()]
    assert ids == evil  # kept as data, exactly


def test_no_identifier_in_any_output(world: World, ledger):
    """Runs last in this module: every folder the jobs wrote and everything they printed."""
    assert len(world.outputs) >= 8, "the job tests above did not run"
    n, found = search_identifiers(world.outputs, world.printed)
    # the searched strings really are in the inputs (else the search proves nothing)
    raw = (world.images / world.good[0]).read_bytes().lower()
    assert all(s.lower().encode() in raw for s in SEARCH) and set(IDENTIFIERS) >= {"PatientName", "PatientID"}
    ledger.search(["pretrain-encoder", "features", "probe", "train", "generate", "export", "manifest", "evaluate"],
                  n, len(SEARCH), found)
    assert not found, found
