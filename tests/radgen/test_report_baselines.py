"""Reference baselines of report generation: most common report, nearest-neighbour retrieval,
normal template; the ``radgen baselines`` job end to end on a tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radgen.report_baselines import (BASELINES, TIE_TOLERANCE, BaselinesError, most_common_report,
                                          nearest_neighbour_reports, nearest_neighbours, normalise_text,
                                          run_baselines)

ENCODER = "random:vit_tiny:56:0"


# ----------------------------------------------------------------------------------------------
# most_common_report
# ----------------------------------------------------------------------------------------------
def test_most_common_counts_after_whitespace_normalisation():
    texts = ["No effusion.", "Heart  size is\nnormal. ", "Heart size is normal.", "  Heart size is normal.\t"]
    assert most_common_report(texts) == "Heart size is normal."  # 3 spellings, one report
    assert normalise_text("  a \n\t b  ") == "a b" and normalise_text(None) == ""


def test_most_common_ties_go_to_the_first_seen():
    assert most_common_report(["B.", "A.", "A.", "B."]) == "B."
    assert most_common_report(["A.", "B.", "B.", "A."]) == "A."
    assert most_common_report(["C.", "B.", "A."]) == "C."
    # a later report must strictly exceed the count to win
    assert most_common_report(["A.", "B.", "B.", "A.", "B."]) == "B."


def test_most_common_skips_blank_texts_and_rejects_none_left():
    assert most_common_report(["", "  ", None, "Clear.", ""]) == "Clear."
    with pytest.raises(ValueError, match="no non-empty"):
        most_common_report(["", " \n", None])
    with pytest.raises(ValueError):
        most_common_report([])


# ----------------------------------------------------------------------------------------------
# nearest neighbours
# ----------------------------------------------------------------------------------------------
def test_nearest_neighbour_on_hand_made_features():
    train = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    texts = ["x", "y", "z", "xy"]
    query = np.array([[10.0, 0.1, 0.0],    # x, whatever the scale (cosine, not dot product)
                      [0.0, 0.2, 5.0],     # z
                      [3.0, 3.2, 0.0],     # closer to (1, 1, 0) than to either axis
                      [-1.0, 0.0, 0.0]])   # all cosines <= 0: the largest (0, for y and z) wins
    assert nearest_neighbour_reports(train, texts, query) == ["x", "z", "xy", "y"]
    idx, cos = nearest_neighbours(train, query)
    assert idx.tolist() == [0, 2, 3, 1]
    assert cos[0] == pytest.approx(10 / np.hypot(10, 0.1)) and cos[3] == pytest.approx(0.0)


def test_nearest_neighbour_ties_take_the_lowest_index():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 16)).astype(np.float32)
    train = np.concatenate([base, base[::-1], 3 * base])  # every vector three times, scaled too
    idx, _ = nearest_neighbours(train, base + 1e-3 * rng.normal(size=base.shape))
    assert idx.tolist() == [0, 1, 2, 3, 4]
    # a zero vector has cosine 0 with everything: it ties with orthogonal rows, lowest index wins
    idx, cos = nearest_neighbours(np.array([[0.0, 1.0], [0.0, 0.0], [0.0, -1.0]]), np.array([[1.0, 0.0]]))
    assert idx.tolist() == [0] and cos.tolist() == [0.0]
    # rounding noise below the tolerance counts as a tie
    idx, _ = nearest_neighbours(np.array([[1.0, 0.0], [1.0, TIE_TOLERANCE / 10]]), np.array([[1.0, 1e-3]]))
    assert idx.tolist() == [0]


def test_nearest_neighbour_equals_brute_force(monkeypatch):
    from sklearn.neighbors import NearestNeighbors

    import radgen.report_baselines as rb

    rng = np.random.default_rng(1)
    train = rng.normal(size=(200, 24)).astype(np.float32)
    query = rng.normal(size=(40, 24)).astype(np.float32)
    brute = []
    for q in query.astype(np.float64):
        sims = [float(q @ t) / (np.linalg.norm(q) * np.linalg.norm(t)) for t in train.astype(np.float64)]
        brute.append(int(np.argmax(sims)))
    knn = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(train)
    sk = knn.kneighbors(query, return_distance=False)[:, 0]
    monkeypatch.setattr(rb, "_CHUNK_ELEMENTS", 200 * 7)  # 7 queries per chunk: chunk seams covered
    idx, cos = nearest_neighbours(train, query)
    assert idx.tolist() == brute == sk.tolist()
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, (q @ t.T).max(axis=1), atol=1e-6)


def test_nearest_neighbour_rejects_bad_input():
    with pytest.raises(ValueError, match="feature sizes"):
        nearest_neighbours(np.ones((3, 4)), np.ones((2, 5)))
    with pytest.raises(ValueError, match="no training"):
        nearest_neighbours(np.ones((0, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbours(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="2 training texts for 3"):
        nearest_neighbour_reports(np.ones((3, 2)), ["a", "b"], np.ones((1, 2)))


# ----------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "s"
    # 40 images: 32 train, 4 validate, 4 test
    generate_dataset(load_config("synth", [], [f"out={out}", "n=40", "size=64", "workers=1", "seed=5"]),
                     progress=False)
    return out


def _manifest(synth: Path) -> list[dict]:
    return [json.loads(line) for line in (synth / "manifest.jsonl").open()]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(data, out, **kw):
    return run_baselines(data, ENCODER, out, workers=0, progress=False, precision="fp32", **kw)


def test_job_writes_three_scorable_baselines(synth, tmp_path, one_thread):
    from eval.score import ScoreOptions
    from radgen.report_baselines import NORMAL_TEMPLATE
    from radgen.evaluation import run_evaluate
    from radgen.features import load_features

    out = tmp_path / "b"
    meta = _run(synth, out)
    rows = _manifest(synth)
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    assert test and all(r["findings"] for r in test)
    refs = _read(out / "references.jsonl")
    assert [r["id"] for r in refs] == [r["id"] for r in test]
    assert [r["report"] for r in refs] == [r["findings"] for r in test]
    for name in BASELINES:
        recs = _read(out / f"{name}.jsonl")
        assert [r["id"] for r in recs] == [r["id"] for r in test]
        assert all(r["status"] == "ok" and r["baseline"] == name and isinstance(r["findings"], str) for r in recs)
        assert [r["reference"] for r in recs] == [r["findings"] for r in test]
        assert [r["image"] for r in recs] == [r["image"] for r in test]  # relative, as generate writes
    assert {r["findings"] for r in _read(out / "normal_template.jsonl")} == {NORMAL_TEMPLATE}
    assert {r["findings"] for r in _read(out / "most_common.jsonl")} == {meta["most_common"]["text"]}
    assert meta["most_common"]["text"] == most_common_report([r["findings"] for r in train])

    # nearest neighbour: the training report of the argmax-cosine training image (cached features)
    tr, te = load_features(out / "features_train"), load_features(out / "features_test")
    assert tr.meta["pool"] == "cls+mean" and tr.meta["image_size"] == 56  # the encoder's own size
    t = tr.features / np.linalg.norm(tr.features, axis=1, keepdims=True)
    q = te.features / np.linalg.norm(te.features, axis=1, keepdims=True)
    best = (q @ t.T).argmax(axis=1)
    by_id = {r["id"]: r["findings"] for r in train}
    nn = _read(out / "nearest_neighbour.jsonl")
    assert [r["neighbour_id"] for r in nn] == [tr.ids[i] for i in best]
    assert [r["findings"] for r in nn] == [by_id[tr.ids[i]] for i in best]
    assert meta["counts"]["test_rows_scored"] == len(test) and meta["counts"]["train_reports"] == len(train)
    assert json.loads((out / "meta.json").read_text()) == meta and "ties" in meta

    # every prediction file scores against references.jsonl as it stands
    opts = ScoreOptions(n_resamples=20)
    for name in BASELINES:
        res = run_evaluate(str(out / f"{name}.jsonl"), str(out / "references.jsonl"), str(tmp_path / f"e_{name}"),
                           metrics=["rouge_l", "chexpert"], options=opts)
        assert res["n_pairs"] == len(test) and "rouge_l" in res["scores"], res["omitted"]

    # a second run reads the feature cache and writes the same files
    before = {n: (out / f"{n}.jsonl").read_text() for n in BASELINES}
    again = _run(synth, out)
    assert again["features"]["train"]["cached"] and again["features"]["test"]["cached"]
    assert {n: (out / f"{n}.jsonl").read_text() for n in BASELINES} == before


def test_unreadable_test_image_gives_an_error_record(synth, tmp_path, one_thread):
    rows = _manifest(synth)
    bad = next(r for r in rows if r["split"] == "test")
    (tmp_path / "empty.png").write_bytes(b"")
    manifest = tmp_path / "manifest.jsonl"
    with manifest.open("w") as fh:
        for r in rows:
            img = str(tmp_path / "empty.png") if r["id"] == bad["id"] else str(synth / r["image"])
            fh.write(json.dumps({"id": r["id"], "image": img, "split": r["split"], "findings": r["findings"]}) + "\n")
    meta = _run(manifest, tmp_path / "b")
    nn = {r["id"]: r for r in _read(tmp_path / "b" / "nearest_neighbour.jsonl")}
    assert nn[bad["id"]]["status"] == "error" and nn[bad["id"]]["findings"] is None
    assert nn[bad["id"]]["error"] == "empty_file"
    assert sum(r["status"] == "ok" for r in nn.values()) == len(nn) - 1
    # the text baselines need no image
    assert all(r["status"] == "ok" for r in _read(tmp_path / "b" / "most_common.jsonl"))
    assert meta["counts"]["test_images_unreadable"] == 1


def test_errors_name_the_file_and_the_problem(synth, tmp_path):
    with pytest.raises(BaselinesError, match=r"no rows of split 'nope'.*splits present: test, train, validate"):
        _run(synth, tmp_path / "b", split="nope")
    with pytest.raises(BaselinesError, match="share rows"):
        _run(synth, tmp_path / "b", split="train")
    manifest = tmp_path / "manifest.jsonl"
    rows = _manifest(synth)
    with manifest.open("w") as fh:
        for r in rows:
            text = "" if r["split"] == "train" else r["findings"]
            fh.write(json.dumps({"id": r["id"], "image": str(synth / r["image"]), "split": r["split"],
                                 "findings": text}) + "\n")
    with pytest.raises(BaselinesError, match=rf"{manifest}.*every 'train' row has an empty 'findings'"):
        _run(manifest, tmp_path / "b")
    with pytest.raises(BaselinesError, match="no such manifest"):
        _run(tmp_path / "missing.jsonl", tmp_path / "b")


def test_cli(synth, tmp_path, capsys, one_thread):
    from radgen.cli import main

    out = tmp_path / "b"
    code = main(["baselines", "--data", str(synth), "--encoder", ENCODER, "--out", str(out), "--quiet",
                 "--workers", "0", "--pool", "cls", "--image-size", "42", "--precision", "fp32"])
    assert code == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pool"] == "cls" and meta["image_size"] == 42 and meta["features"]["test"]["dim"] == 192
    assert "radgen evaluate --predictions" in capsys.readouterr().out
    assert main(["baselines", "--data", str(synth), "--encoder", ENCODER, "--out", str(out), "--quiet",
                 "--split", "validate", "--train-split", "nope"]) == 2
    assert "no rows of split 'nope'" in capsys.readouterr().err


def test_cli_takes_the_encoder_from_a_run_folder(synth, tmp_path, capsys, one_thread):
    from radgen.cli import main
    from encoder.specs import load_encoder_spec
    from radgen.model.run import weights_sha256

    run = tmp_path / "run"
    run.mkdir()
    info = {"encoder": {"spec": ENCODER, "which": "teacher", "sha256": weights_sha256(load_encoder_spec(ENCODER))},
            "image_size": 42}
    (run / "model.json").write_text(json.dumps(info))
    out = tmp_path / "b"
    args = ["baselines", "--data", str(synth), "--model", str(run), "--out", str(out), "--quiet", "--workers", "0",
            "--precision", "fp32"]
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["encoder"] == ENCODER and meta["image_size"] == 42  # the run's size, not the encoder's 56
    (run / "model.json").write_text(json.dumps({**info, "encoder": {**info["encoder"], "sha256": "0" * 64}}))
    assert main(args) == 2
    assert "not the one the run was trained with" in capsys.readouterr().err
    (run / "model.json").write_text("{}")
    assert main(args) == 2
    assert "not a report-generator run folder" in capsys.readouterr().err
    # a run on a checkpoint's student: refused when only `which` says so, taken when the spec names it
    from radgen.report_baselines import BaselinesError, run_encoder

    (run / "model.json").write_text(json.dumps({**info, "encoder": {**info["encoder"], "which": "student"}}))
    with pytest.raises(BaselinesError, match="'student' weights"):
        run_encoder(run)
    (run / "model.json").write_text(json.dumps({**info, "encoder": {"spec": "student:x.pt", "which": "student"}}))
    assert run_encoder(run)["spec"] == "student:x.pt"
