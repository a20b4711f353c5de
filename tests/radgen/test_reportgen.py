"""Report generator end to end with a tiny random LLM and encoder: masks, overfitting, batched
generation, save/load, exact resume, the generate job's records and failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from radgen.config import ConfigError, load_config
from radgen.data.synth.generate import generate_dataset
from radgen.generation import read_records, run_generate
from radgen.train import run_train, validate_config
from radgen.model.run import build_model, generate_reports, load_run
from radgen.model.splice import IGNORE_INDEX

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
ENCODER = "random:vit_tiny:56:0"  # 4 x 4 patches of 192 dims
INDICATIONS = ["cough", "fever and shortness of breath for three days", None, "chest pain", "",
               "follow-up", "trauma", "pre-operative assessment"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    cfg = load_config("synth", [], [f"out={out}", "n=24", "size=64", "workers=1", "seed=3"])
    generate_dataset(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, synth) -> Path:
    from tiny_llm import RADIOLOGY_SENTENCES, make_tiny_llm_folder

    texts = [json.loads(line)["findings"] or "" for line in (synth / "manifest.jsonl").open()]
    return make_tiny_llm_folder(tmp_path_factory.mktemp("llm"), texts + RADIOLOGY_SENTENCES, vocab_size=500)


@pytest.fixture(scope="module")
def eight(synth, tmp_path_factory) -> Path:
    """A manifest of 8 training rows with indications of different lengths (mixed prompt lengths)."""
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    rows = [r for r in rows if r["findings"]][:8]
    path = tmp_path_factory.mktemp("eight") / "manifest.jsonl"
    with path.open("w") as fh:
        for r, ind in zip(rows, INDICATIONS):
            fh.write(json.dumps({"id": r["id"], "image": str(synth / r["image"]), "findings": r["findings"],
                                 "split": "train", "indication": ind}) + "\n")
    return path


def _cfg(out, data, llm, *extra):
    return load_config("reportgen", [], [f"out={out}", f"data.path={data}", f"encoder.spec={ENCODER}",
                                         f"llm.path={llm}", "train.precision=fp32", "data.workers=0",
                                         "train.log_every=1", *extra])


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, eight, llm_dir, one_thread):
    """8 examples, trained until they are memorised; returns (run_dir, summary with the model)."""
    out = tmp_path_factory.mktemp("overfit") / "run"
    cfg = _cfg(out, eight, llm_dir, "stage1.max_steps=10", "stage2.max_steps=200", "stage1.batch_size=8",
               "stage2.batch_size=8", "stage1.lr=3e-3", "stage2.lr=1e-2", "stage2.warmup_ratio=0.0",
               "data.val_split=null", "data.indication_field=indication", "lora.dropout=0.0",
               "train.eval_every=0", "train.log_every=10", "generate.max_new_tokens=128")
    summary = run_train(cfg, progress=False, return_model=True)
    return out, summary


# ---------------------------------------------------------------------------------------------
def test_prompt_tokens_image_positions_and_label_mask(synth, llm_dir):
    built = build_model(_cfg("/tmp/unused", synth, llm_dir))
    tok = built.tokens
    assert tok.n_image_tokens == 16 == built.model.vision.num_tokens(56)
    texts = ["Heart size is normal.", "There is a small left pleural effusion. No pneumothorax."]
    batch = tok.train_batch(texts, ["cough", None])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for b, (text, ind) in enumerate(zip(texts, ["cough", None])):
        prompt = tok.prompt_ids(ind)
        img = (ids[b] == tok.image_token_id).nonzero().flatten().tolist()
        # exactly n_image_tokens image ids, contiguous, where the single <image> of the prompt was
        raw = tok.tokenizer(tok.prompt_text(ind), add_special_tokens=False)["input_ids"]
        start = raw.index(tok.image_token_id)
        assert img == list(range(start, start + 16))
        # prompt and image positions and padding are ignored; the rest is the target + EOS
        assert (labels[b, :len(prompt)] == IGNORE_INDEX).all()
        n = int(mask[b].sum())
        assert (labels[b, n:] == IGNORE_INDEX).all()
        assert labels[b, len(prompt):n].tolist() == tok.target_ids(text)
        assert labels[b, n - 1] == tok.tokenizer.eos_token_id
    # image features reach the LLM only at those positions
    feats = built.model.image_features(pixel_values=torch.zeros(2, 3, 56, 56))
    emb = built.model.embed(ids, pixel_values=torch.zeros(2, 3, 56, 56))
    plain = built.model.llm.get_input_embeddings()(ids)
    where = ids == tok.image_token_id
    assert torch.equal(emb[~where], plain[~where])
    assert torch.allclose(emb[where].reshape(2, 16, -1), feats)


def test_config_validation_reports_every_problem(tmp_path):
    cfg = load_config("reportgen", [], ["projector.name=nope", "stage1.batch_size=0", "encoder.select=all",
                                        f"data.path={tmp_path / 'missing'}", "llm.path=/nonexistent/llm"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    for part in ("out is not set", "missing: no such file", "encoder.spec is not set", "/nonexistent/llm",
                 "projector.name 'nope'", "encoder.select 'all'", "stage1.batch_size"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="unknown|Key"):
        load_config("reportgen", [], ["stage1.bogus=1"])


@pytest.mark.slow
def test_overfits_eight_examples_and_regenerates_them(overfit, eight):
    out, summary = overfit
    assert summary["status"] == "complete" and summary["n_train"] == 8
    log = [r for r in __import__("csv").DictReader((out / "log.csv").open())]
    assert float(log[-1]["loss"]) < 0.05 < float(log[0]["loss"])
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "projector.safetensors").is_file()
    assert not (out / "checkpoint.pt").exists()  # the run folder keeps only what was trained
    # the adapter holds LoRA weights only (no copy of the resized embedding matrix)
    assert all("lora_" in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    res = run_generate(out, eight, out.parent / "reports.jsonl", progress=False, batch_size=8, workers=0)
    recs = read_records(out.parent / "reports.jsonl")
    assert res["n_ok"] == 8 and len(recs) == 8
    assert [r["findings"] for r in recs] == [r["reference"] for r in recs]


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time_token_for_token(overfit, eight):
    out, summary = overfit
    built = summary["model"]
    from encoder.processor import RadDinoProcessor
    from radgen.data.reports import image_batches, image_loader, read_report_rows
    from radgen.model.run import generation_kwargs

    rows = read_report_rows(eight, indication_field="indication")
    proc = RadDinoProcessor(shortest_edge=56, crop_size=56)
    pix = next(image_batches(rows, image_loader(proc.one), 8, 0)).inputs
    kw = generation_kwargs({"max_new_tokens": 40}, built.tokens)
    batch = built.tokens.generation_batch([r.indication for r in rows])
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 3  # really mixed lengths
    together = built.model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pix, **kw)
    for i, r in enumerate(rows):
        one = built.tokens.generation_batch([r.indication])
        alone = built.model.generate(one["input_ids"], one["attention_mask"], pixel_values=pix[i:i + 1], **kw)[0]
        got = together[i][: len(alone)]
        assert got.tolist() == alone.tolist(), r.id
        assert (together[i][len(alone):] == built.tokens.pad_id).all()  # only padding after EOS


@pytest.mark.slow
def test_save_then_load_regenerates_identical_text(overfit, eight):
    out, summary = overfit
    from encoder.processor import RadDinoProcessor
    from radgen.data.reports import image_batches, image_loader, read_report_rows

    rows = read_report_rows(eight, indication_field="indication")
    pix = next(image_batches(rows, image_loader(RadDinoProcessor(56, 56).one), 8, 0)).inputs
    settings = {"max_new_tokens": 60}
    before = generate_reports(summary["model"], [r.indication for r in rows], settings, pixel_values=pix)
    loaded = load_run(out)
    after = generate_reports(loaded, [r.indication for r in rows], settings, pixel_values=pix)
    assert before == after
    assert loaded.info["data"]["indication_field"] == "indication"


def _trained_state(out: Path) -> dict:
    sd = {f"projector.{k}": v for k, v in load_file(str(out / "projector.safetensors")).items()}
    sd.update({f"adapter.{k}": v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()})
    return sd


@pytest.mark.parametrize("kill_at", [("stage1", 2), ("stage2", 3)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, synth, llm_dir, kill_at, one_thread):
    extra = ["stage1.max_steps=3", "stage2.max_steps=5", "stage1.batch_size=4", "stage2.batch_size=2",
             "stage2.accum_steps=2", "train.checkpoint_every=2", "train.eval_every=2", "data.max_val_samples=2",
             "train.sample_generations=1", "generate.max_new_tokens=4", "data.max_train_samples=10"]
    full = run_train(_cfg(tmp_path / "full", synth, llm_dir, *extra), progress=False)
    assert full["status"] == "complete"
    with pytest.raises(RuntimeError, match="stopped after"):
        run_train(_cfg(tmp_path / "cut", synth, llm_dir, *extra), progress=False, _stop_at=kill_at)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "model.json").exists()
    again = run_train(_cfg(tmp_path / "cut", synth, llm_dir, *extra), progress=False)
    assert again["status"] == "complete"
    a, b = _trained_state(tmp_path / "full"), _trained_state(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the curves continue exactly: same log rows (losses, val losses) as the uninterrupted run
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "target_tokens_per_s", "seconds")}
                         for r in rows]
    import csv

    rows_a = strip(csv.DictReader((tmp_path / "full" / "log.csv").open()))
    rows_b = strip(csv.DictReader((tmp_path / "cut" / "log.csv").open()))
    assert rows_a == rows_b
    samples = lambda p: [json.loads(x) for x in (p / "samples.jsonl").read_text().splitlines()]
    assert samples(tmp_path / "full") == samples(tmp_path / "cut")
    # a finished run is not retrained
    assert run_train(_cfg(tmp_path / "cut", synth, llm_dir, *extra), progress=False)["status"] == "already-complete"
    # a different config in the same folder is refused while a checkpoint exists
    with pytest.raises(RuntimeError, match="stopped after"):
        run_train(_cfg(tmp_path / "x", synth, llm_dir, *extra), progress=False, _stop_at=("stage1", 2))
    with pytest.raises(ConfigError, match="different config"):
        run_train(_cfg(tmp_path / "x", synth, llm_dir, *extra, "lora.r=4"), progress=False)


def test_stage1_trains_only_the_projector(tmp_path, synth, llm_dir, one_thread):
    cfg = _cfg(tmp_path / "r", synth, llm_dir, "stage1.max_steps=2", "stage2.max_steps=0",
               "stage1.batch_size=4", "data.val_split=null", "data.max_train_samples=8")
    s = run_train(cfg, progress=False, return_model=True)
    built = s["model"]
    fresh = build_model(cfg)
    # LoRA B still zero (a no-op adapter), the projector moved, encoder and LLM untouched
    lora_b = [p for n, p in built.model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all((p == 0).all() for p in lora_b)
    assert not torch.equal(built.model.projector[0].weight, fresh.model.projector[0].weight)
    for (n1, p1), (n2, p2) in zip(built.model.vision.named_parameters(), fresh.model.vision.named_parameters()):
        assert torch.equal(p1, p2), n1
    base = {n: p for n, p in built.model.llm.named_parameters() if "lora_" not in n}
    base0 = {n: p for n, p in fresh.model.llm.named_parameters() if "lora_" not in n}
    assert base.keys() == base0.keys() and all(torch.equal(base[n], base0[n]) for n in base)


def test_logged_token_counts(tmp_path, synth, llm_dir, one_thread, monkeypatch):
    """log.csv counts every input position (prompt + image + target, padding excluded) and the
    target tokens apart: ``input_tokens`` is the running attention-mask sum of the training batches,
    ``tokens_per_s`` / ``target_tokens_per_s`` their rates over the same interval."""
    from radgen.model.prompt import ReportTokenizer

    sums = []  # (attention-mask sum, predicted target tokens) of each training micro-batch
    orig = ReportTokenizer.train_batch

    def spy(self, *a, **k):
        b = orig(self, *a, **k)
        sums.append((int(b["attention_mask"].sum()), int((b["labels"][:, 1:] != IGNORE_INDEX).sum())))
        return b

    monkeypatch.setattr(ReportTokenizer, "train_batch", spy)
    out = tmp_path / "run"
    run_train(_cfg(out, synth, llm_dir, "stage1.max_steps=3", "stage2.max_steps=0", "stage1.batch_size=2",
                   "stage1.accum_steps=2", "data.val_split=null", "data.max_train_samples=8"), progress=False)
    import csv

    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 3 and len(sums) == 6
    steps = [(sums[2 * i][0] + sums[2 * i + 1][0], sums[2 * i][1] + sums[2 * i + 1][1]) for i in range(3)]
    assert [int(r["input_tokens"]) for r in rows] == list(np.cumsum([s[0] for s in steps]))
    assert [int(r["tokens"]) for r in rows] == list(np.cumsum([s[1] for s in steps]))
    for r, (n_in, n_tgt) in zip(rows, steps):
        assert n_in - n_tgt > 4 * 16  # the prompt and the 16 image tokens of each of the 4 rows count
        assert float(r["tokens_per_s"]) / float(r["target_tokens_per_s"]) == pytest.approx(n_in / n_tgt, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# radgen generate: one record per input, failures recorded, resume, no identifiers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, synth, llm_dir, one_thread) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    s = run_train(_cfg(out, synth, llm_dir, "stage1.max_steps=1", "stage2.max_steps=1", "stage1.batch_size=2",
                       "stage2.batch_size=2", "data.val_split=null", "generate.max_new_tokens=6"), progress=False)
    assert s["status"] == "complete"
    return out


def _broken_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    png = (SHARED / "lung_seg").glob("*.png").__next__().read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    (folder / "notes.jpg").write_text("not an image")
    return ["empty.png", "random.dcm", "truncated.png", "notes.jpg"]


def test_generate_records_every_input_and_resumes(tmp_path, synth, small_run):
    from radgen.cli import main

    folder = tmp_path / "in"
    shutil.copytree(synth / "images", folder / "ok")
    broken = _broken_files(folder / "bad")
    n_files = len(list((folder / "ok").glob("*.png"))) + len(broken)
    out = tmp_path / "reports.jsonl"
    code = main(["generate", "--model", str(small_run), "--images", str(folder), "--out", str(out), "--quiet",
                 "--workers", "2", "--batch-size", "5"])
    assert code == 3  # some inputs failed
    recs = read_records(out)
    assert len(recs) == n_files and len({r["id"] for r in recs}) == n_files
    bad = {r["id"]: r for r in recs if r["status"] == "error"}
    assert set(bad) == {f"bad/{b}" for b in broken}
    assert {r["error"] for r in bad.values()} >= {"empty_file", "not_an_image"}
    assert all(r["findings"] is None and r["reason"] for r in bad.values())
    ok = [r for r in recs if r["status"] == "ok"]
    assert all(isinstance(r["findings"], str) and r["model_sha256"] == recs[0]["model_sha256"] for r in ok)
    assert ok[0]["settings"]["num_beams"] == 1 and ok[0]["settings"]["do_sample"] is False
    # an existing output is not overwritten silently
    assert main(["generate", "--model", str(small_run), "--images", str(folder), "--out", str(out), "--quiet"]) == 2
    # kill simulation: drop the last 6 records and leave a torn line; --resume redoes only those
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-6]) + lines[-6][: len(lines[-6]) // 2])
    code = main(["generate", "--model", str(small_run), "--images", str(folder), "--out", str(out), "--quiet",
                 "--resume"])
    assert code == 3
    again = read_records(out)
    assert [r["id"] for r in again] == [r["id"] for r in recs]  # no duplicates, no torn line, same order
    assert {r["id"]: r["findings"] for r in again} == {r["id"]: r["findings"] for r in recs}


def test_generate_csv_output(tmp_path, synth, small_run):
    out = tmp_path / "reports.csv"
    s = run_generate(small_run, synth, out, split="test", progress=False, workers=0)
    recs = read_records(out)
    assert s["n_ok"] == len(recs) > 0 and all(r["status"] == "ok" and "reference" in r for r in recs)


@pytest.mark.slow
def test_generate_on_shared_radiographs_and_dicoms(tmp_path, small_run):
    """Real PNG/JPEG/DICOM files + broken ones: one record each, failures in the exit status, and
    no DICOM identifier in any record."""
    import pydicom

    from radgen.cli import main

    folder = tmp_path / "in"
    shutil.copytree(SHARED / "cxr" / "images", folder / "cxr")
    shutil.copytree(SHARED / "dicom", folder / "dicom")
    broken = _broken_files(folder / "broken")
    n_files = sum(1 for f in folder.rglob("*") if f.is_file())
    out = tmp_path / "reports.jsonl"
    code = main(["generate", "--model", str(small_run), "--images", str(folder), "--out", str(out), "--quiet",
                 "--max-new-tokens", "4"])
    assert code == 3
    recs = read_records(out)
    assert len(recs) == n_files == len({r["id"] for r in recs})
    assert sorted(r["id"] for r in recs if r["status"] == "error") == sorted(f"broken/{b}" for b in broken)
    assert sum(r["status"] == "ok" and r["id"].startswith("dicom/") for r in recs) == 3
    text = out.read_text()
    for f in (SHARED / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(tag) or "")
            if value:
                assert value not in text, tag


# ---------------------------------------------------------------------------------------------
# torchrun: DDP training equals one process with the same global batch; sharded generation merges
# ---------------------------------------------------------------------------------------------
def _torchrun(args: list[str], tmp_path: Path, timeout: int = 600) -> None:
    """2 ranks; the callers pass a CPU device (with auto, rank 1 needs a second GPU)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "radgen.cli", *args]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert res.returncode in (0, 3), res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.slow
def test_torchrun_ddp_training_and_sharded_generation(tmp_path, synth, llm_dir, one_thread):
    common = ["stage1.max_steps=2", "stage2.max_steps=2", "data.val_split=null", "data.max_train_samples=8",
              "generate.max_new_tokens=5", "train.precision=fp32", "data.workers=0", "lora.dropout=0.0",
              "train.device=cpu"]
    single = _cfg(tmp_path / "one", synth, llm_dir, *common, "stage1.batch_size=4", "stage2.batch_size=4")
    assert run_train(single, progress=False)["status"] == "complete"
    _torchrun(["train", "--quiet", "--data", str(synth), "--encoder", ENCODER, "--out", str(tmp_path / "ddp"),
               f"llm.path={llm_dir}", *common, "stage1.batch_size=2", "stage2.batch_size=2"], tmp_path)
    a, b = _trained_state(tmp_path / "one"), _trained_state(tmp_path / "ddp")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # same global batch, same update
    # two ranks generate disjoint shards; rank 0 merges them into one file in input order
    ref = run_generate(tmp_path / "one", synth / "images", tmp_path / "one.jsonl", progress=False, workers=0,
                       device="cpu")
    _torchrun(["generate", "--quiet", "--model", str(tmp_path / "one"), "--images", str(synth / "images"),
               "--out", str(tmp_path / "two.jsonl"), "--workers", "0", "--device", "cpu"], tmp_path)
    one, two = read_records(tmp_path / "one.jsonl"), read_records(tmp_path / "two.jsonl")
    assert ref["n_ok"] == len(one) == len(two) == 24
    assert [(r["id"], r["findings"]) for r in one] == [(r["id"], r["findings"]) for r in two]
    assert not list(tmp_path.glob("two.jsonl.part*"))


@pytest.mark.slow
def test_torchrun_rank_without_loadable_images(tmp_path, synth, llm_dir, one_thread):
    """One good image among four unreadable ones (uncached): at every step that has the good row, the
    other rank loads nothing and does no backward. It still joins the gradient all-reduce (with
    zeros), so the 2-rank run finishes and equals one process with the same global batch."""
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    rows = [r for r in rows if r["findings"]][:4]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as fh:
        for i, r in enumerate(rows):
            fh.write(json.dumps({"id": r["id"], "image": str(synth / r["image"]) if i == 0 else str(bad),
                                 "findings": r["findings"], "split": "train"}) + "\n")
    common = ["stage1.max_steps=2", "stage2.max_steps=2", "data.val_split=null", "data.cache_vision=false",
              "train.precision=fp32", "data.workers=0", "lora.dropout=0.0", "train.device=cpu"]
    single = _cfg(tmp_path / "one", manifest, llm_dir, *common, "stage1.batch_size=2", "stage2.batch_size=2")
    assert run_train(single, progress=False)["status"] == "complete"
    _torchrun(["train", "--quiet", "--data", str(manifest), "--encoder", ENCODER, "--out", str(tmp_path / "ddp"),
               f"llm.path={llm_dir}", *common, "stage1.batch_size=1", "stage2.batch_size=1"], tmp_path, timeout=300)
    a, b = _trained_state(tmp_path / "one"), _trained_state(tmp_path / "ddp")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# Each rank encodes rows i % world == rank for the vision cache; the cache is all-gathered, so every
# rank holds the one-process cache. The script counts the images its vision forward saw.
_CACHE_SCRIPT = r"""
import json, sys
import torch
from encoder.distributed import close_distributed, setup_distributed
from radgen.config import load_config
from radgen.data.reports import read_report_rows
from radgen.train.inputs import VisionInputs
from radgen.model.run import build_model

overrides, manifest, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
rank, world = setup_distributed(torch.device("cpu"))
torch.set_num_threads(1)
built = build_model(load_config("reportgen", [], overrides))
forward, seen = built.model.vision.forward, []
built.model.vision.forward = lambda x: (seen.append(len(x)), forward(x))[1]
skipped = []
cache = VisionInputs(built, read_report_rows(manifest, split="train"), True, torch.device("cpu"), 0, skipped,
                      False, "encode")
torch.save({"tokens": cache.tokens, "ok": cache.ok, "skipped": skipped, "encoded": sum(seen)},
           f"{out}/rank{rank}.pt")
close_distributed()
"""


@pytest.mark.slow
def test_torchrun_vision_cache_is_sharded_and_gathered(tmp_path, synth, llm_dir, one_thread):
    """70 rows (two unreadable): each of 2 ranks encodes about half, both end with the one-process
    cache and the same skipped rows."""
    import subprocess
    import sys

    from radgen.data.reports import read_report_rows
    from radgen.train.inputs import VisionInputs

    good = [json.loads(line) for line in (synth / "manifest.jsonl").open()]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as fh:
        for i in range(70):
            image = str(bad) if i in (5, 40) else str(synth / good[i % len(good)]["image"])
            fh.write(json.dumps({"id": f"r{i}", "image": image, "findings": "x", "split": "train"}) + "\n")
    overrides = [f"out={tmp_path / 'unused'}", f"data.path={manifest}", f"encoder.spec={ENCODER}",
                 f"llm.path={llm_dir}", "train.device=cpu"]
    script = tmp_path / "cache.py"
    script.write_text(_CACHE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), json.dumps(overrides), str(manifest), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    built = build_model(load_config("reportgen", [], overrides))
    skipped = []
    one = VisionInputs(built, read_report_rows(manifest, split="train"), True, torch.device("cpu"), 0, skipped,
                        False, "encode")
    assert len(one.ok) == 68 and [s["id"] for s in skipped] == ["r5", "r40"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["ok"] == one.ok
        assert [s["id"] for s in got["skipped"]] == ["r5", "r40"]
        torch.testing.assert_close(got["tokens"], one.tokens, rtol=1e-5, atol=1e-5)
    assert [got["encoded"] for got in ranks] == [34, 34]  # rows 0..69 by parity, one bad row each


def test_uncached_inputs_load_in_worker_threads(tmp_path, synth, llm_dir):
    """Uncached mode decodes a micro-batch's images in data.workers threads: the same pixels, rows
    and skipped files as with 0 workers."""
    import threading

    from radgen.data.reports import read_report_rows
    from radgen.train.inputs import VisionInputs

    rows = read_report_rows(synth, split="train")[:6]
    rows[2].image = str(tmp_path / "missing.png")
    built = build_model(_cfg(tmp_path / "unused", synth, llm_dir))
    got, threads = {}, set()
    for workers in (0, 2):
        inputs = VisionInputs(built, rows, False, torch.device("cpu"), workers, [], False, "train")
        load = inputs.load_row
        inputs.load_row = lambda row: (threads.add(threading.current_thread().name), load(row))[1]
        got[workers] = inputs([5, 0, 2, 3])
    assert [r.id for r in got[2]["rows"]] == [r.id for r in got[0]["rows"]] == [rows[i].id for i in (5, 0, 3)]
    assert torch.equal(got[2]["pixel_values"], got[0]["pixel_values"])
    assert threads - {threading.current_thread().name}  # the workers=2 loads ran off the main thread


def test_loss_on_target_positions_equals_full_logits_loss(synth, llm_dir):
    from radgen.model.model import token_loss_sum

    built = build_model(_cfg("/tmp/unused", synth, llm_dir, "lora.dropout=0.0"))
    torch.nn.init.normal_(built.model.projector[0].weight)  # make the image matter
    batch = built.tokens.train_batch(["Heart size is normal.", "There is a small left pleural effusion."],
                                     ["cough", None])
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    fast = built.model(**batch, pixel_values=pix)
    full = built.model(**{k: v for k, v in batch.items() if k != "labels"}, pixel_values=pix)["logits"]
    ref, n = token_loss_sum(full, batch["labels"])
    assert fast["n_tokens"] == n > 0
    assert torch.allclose(fast["loss_sum"], ref, rtol=1e-5, atol=1e-5)


def test_generate_halves_the_batch_when_out_of_memory(tmp_path, synth, small_run, monkeypatch):
    """A GPU that holds at most 2 reports at once (faked: generate_reports raises torch's
    out-of-memory error above 2): the same rows are retried at 4, then 2, every record is written,
    the texts equal an unconstrained run's, and the summary says what happened."""
    import radgen.generation as g

    ref = run_generate(small_run, synth, tmp_path / "ref.jsonl", split="train", progress=False, workers=0,
                       batch_size=8)
    real, sizes = g.generate_reports, []

    def small_gpu(built, indications, settings, **kw):
        sizes.append(len(indications))
        if len(indications) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return real(built, indications, settings, **kw)

    monkeypatch.setattr(g, "generate_reports", small_gpu)
    s = run_generate(small_run, synth, tmp_path / "oom.jsonl", split="train", progress=False, workers=0,
                     batch_size=8)
    assert s["n_ok"] == ref["n_ok"] > 4 and s["n_records"] == ref["n_records"]
    assert (s["batch_size"], s["batch_size_final"], s["oom_backoffs"]) == (8, 2, 2)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # halved once each, then kept at 2
    assert read_records(tmp_path / "oom.jsonl") == read_records(tmp_path / "ref.jsonl")

    def no_gpu(built, indications, settings, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(g, "generate_reports", no_gpu)
    with pytest.raises(g.GenerateError, match="out of GPU memory at batch size 1"):
        run_generate(small_run, synth, tmp_path / "none.jsonl", split="train", progress=False, workers=0,
                     batch_size=4)


def test_lr_schedule_warmup_stable_decay():
    """stage.decay_ratio: warm-up, constant, then linear to min_lr over the last share of the
    steps; 0 keeps the cosine schedule."""
    import numpy as np

    from encoder.train import cosine_schedule
    from radgen.train.plan import lr_schedule

    s = lr_schedule(1.0, 0.0, 10, warmup=2, decay_ratio=0.2)
    assert np.allclose(s, [0.0, 0.5, 1, 1, 1, 1, 1, 1, 0.5, 0.0])
    assert np.allclose(lr_schedule(1.0, 0.1, 10, 2, 0.0), cosine_schedule(1.0, 0.1, 10, 2))
    assert len(lr_schedule(1.0, 0.0, 0, 0, 0.5)) == 0


def test_resume_check_fills_keys_added_since_the_checkpoint():
    """A run saved before a config key existed (here stage2.decay_ratio) still resumes: the saved
    config is read with today's defaults for keys it does not have."""
    from omegaconf import OmegaConf

    from radgen.config import load_config
    from radgen.train.loop import _core, _with_defaults

    cfg = OmegaConf.to_container(load_config("reportgen", ["cpu_smollm2"], ["out=x", "data.path=y"]), resolve=True)
    old = OmegaConf.to_container(OmegaConf.create(cfg))
    del old["stage2"]["decay_ratio"], old["tasks"]["finding_sentence_weight"]
    assert _core(_with_defaults(old)) == _core(cfg)
    old["stage2"]["lr"] = 1.0  # a real difference still refuses
    assert _core(_with_defaults(old)) != _core(cfg)
