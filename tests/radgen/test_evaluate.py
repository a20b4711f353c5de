"""``radgen evaluate`` and ``radgen labeler-check`` through the command line (``radgen.cli.main``).

METEOR (a 6-10 s JVM start) is left out: the metric families are chosen with ``--metrics``.
Most input-handling tests use only ``radgraph_proxy`` (pure Python, no Java).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from eval.chexpert.observations import CHEXPERT_14
from eval.score import score
from radgen.cli import main

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_METEOR = "bleu,rouge_l,cider,chexpert,radgraph,radgraph_proxy,radcliq"
FAST = ["--metrics", "radgraph_proxy", "--resamples", "0"]
IU_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "reports" / "iu_xray_dev.csv"

# Hand-written synthetic reports (not from any dataset).
REF = {
    "s1": "The heart size is normal. No pleural effusion or pneumothorax.",
    "s2": "Mild cardiomegaly. There is a small right pleural effusion.",
    "s3": "Left lower lobe consolidation concerning for pneumonia.",
    "s4": "Mild pulmonary edema. Bibasilar atelectasis.",
    "s5": "There is a right apical pneumothorax. The lungs are otherwise clear.",
    "s6": "A 1 cm nodule in the right upper lobe. No effusion.",
}
PRED = {
    "s1": "Normal heart size. No effusion or pneumothorax.",
    "s2": "The heart is enlarged. Small right pleural effusion.",
    "s3": "The lungs are clear.",
    "s4": "Mild pulmonary edema. Bibasilar atelectasis.",
    "s5": "Right pneumothorax.",
    "s6": "No acute cardiopulmonary process.",
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(d: dict[str, str], key: str = "report", id_key: str = "id") -> list[dict]:
    return [{id_key: i, key: t} for i, t in d.items()]


def _evaluate(refs: Path, preds: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--references", str(refs), "--predictions", str(preds), "--out", str(out), *extra])


# ------------------------------------------------------------------------------ happy path
@needs_java
def test_happy_path_writes_every_output(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    # predictions in another order and as CSV: rows are joined on id, scored in reference order
    preds = _csv(tmp_path / "preds.csv", list(reversed(_rows(PRED))))
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, "--metrics", NO_METEOR, "--resamples", "200", "--seed", "3") == 0
    printed = capsys.readouterr().out

    for name in ["metrics.json", "metrics.csv", "metrics.md", "per_report.csv", "per_observation.csv"]:
        assert (out / name).stat().st_size > 0, name
    png = (out / "chexpert_f1_per_observation.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000

    result = json.loads((out / "metrics.json").read_text())
    expected = score(list(REF.values()), [PRED[i] for i in REF], NO_METEOR.split(","), n_resamples=200, seed=3)
    assert result["scores"] == expected["scores"]
    assert result["ci"] == expected["ci"]
    assert result["n_pairs"] == 6
    assert result["inputs"]["missing_predictions_scored_empty"] == 0
    assert result["inputs"]["extra_predictions_ignored"] == 0
    assert set(result["omitted"]) == {"radgraph", "radcliq"}
    assert "meteor" not in result["scores"]

    # per-report rows are in reference order and carry the per-pair values
    with (out / "per_report.csv").open() as f:
        per_report = list(csv.DictReader(f))
    assert [r["id"] for r in per_report] == list(REF)
    assert [float(r["rouge_l"]) for r in per_report] == pytest.approx(expected["per_pair"]["rouge_l"])
    assert float(per_report[3]["radgraph_proxy_simple_f1"]) == 1.0  # s4 is identical
    with (out / "per_observation.csv").open() as f:
        per_obs = list(csv.DictReader(f))
    assert [r["observation"] for r in per_obs] == list(CHEXPERT_14)
    assert {"f1", "f1_ci_low", "f1_ci_high", "support"} <= set(per_obs[0])
    with (out / "metrics.csv").open() as f:
        main_rows = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(main_rows["bleu_4"]["value"]) == pytest.approx(expected["scores"]["bleu_4"], rel=1e-12)
    assert float(main_rows["rouge_l"]["ci_low"]) == pytest.approx(expected["ci"]["rouge_l"][0], rel=1e-12)

    # the printed report: the metric table with CIs, what was omitted, timings, files written
    assert "| metric | value | 95% CI |" in printed
    assert f"| rouge_l | {expected['scores']['rouge_l']:.4f} |" in printed
    assert "time per metric" in printed
    assert "omitted radgraph" in printed and "omitted radcliq" in printed
    assert "wrote" in printed and "metrics.json" in printed
    assert "time per metric" in (out / "metrics.md").read_text()


def test_text_and_id_fields(tmp_path: Path, capsys):
    # predictions: a custom id and text column, plus a decoy 'report' column that must be ignored
    refs = _jsonl(tmp_path / "refs.jsonl", [{"sid": i, "txt": t} for i, t in REF.items()])
    preds = _jsonl(tmp_path / "preds.jsonl", [{"sid": i, "txt": t, "report": "junk"} for i, t in PRED.items()])
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, "--id-field", "sid", "--text-field", "txt", *FAST) == 0
    got = json.loads((out / "metrics.json").read_text())["scores"]
    assert got == score(list(REF.values()), list(PRED.values()), ["radgraph_proxy"], n_resamples=0)["scores"]
    # without the flags there is no 'id' column: the error says which flag to set
    assert _evaluate(refs, preds, tmp_path / "o2", *FAST) == 2
    err = capsys.readouterr().err
    assert "refs.jsonl" in err and "'id'" in err and "--id-field" in err


def test_ref_text_field_and_mixed_formats(tmp_path: Path):
    # references as TSV with a 'findings' column, predictions as a JSON list with integer ids
    ref_rows = [{"study": str(k), "findings": t} for k, t in enumerate(REF.values())]
    refs = _csv(tmp_path / "refs.tsv", ref_rows, delimiter="\t")
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"study": k, "generated": t} for k, t in enumerate(PRED.values())]))
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, "--id-field", "study", "--text-field", "generated",
                     "--ref-text-field", "findings", *FAST) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["n_pairs"] == 6
    assert got["scores"] == score(list(REF.values()), list(PRED.values()), ["radgraph_proxy"], n_resamples=0)["scores"]


# ------------------------------------------------------------------------------ joining
def test_missing_and_extra_ids_fail_by_default(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    missing = {k: v for k, v in PRED.items() if k != "s3"}
    preds = _jsonl(tmp_path / "preds.jsonl", _rows(missing))
    assert _evaluate(refs, preds, tmp_path / "o1", *FAST) == 2
    err = capsys.readouterr().err
    assert "s3" in err and "--allow-missing" in err and "no prediction" in err
    assert not (tmp_path / "o1" / "metrics.json").exists()

    extra = _jsonl(tmp_path / "extra.jsonl", _rows({**PRED, "zz9": "Extra report."}))
    assert _evaluate(refs, extra, tmp_path / "o2", *FAST) == 2
    err = capsys.readouterr().err
    assert "zz9" in err and "--allow-missing" in err and "not in" in err


def test_allow_missing_scores_empty_and_ignores_extra(tmp_path: Path):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    preds_d = {k: v for k, v in PRED.items() if k != "s4"}  # s4 would score 1.0
    preds_d["zz9"] = "An extra prediction with no reference."
    preds = _jsonl(tmp_path / "preds.jsonl", _rows(preds_d))
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, "--allow-missing", *FAST) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["n_pairs"] == 6
    assert result["inputs"]["missing_predictions_scored_empty"] == 1
    assert result["inputs"]["extra_predictions_ignored"] == 1
    assert result["inputs"]["empty_predictions"] == 1
    hyps = [preds_d.get(i, "") for i in REF]
    assert result["scores"] == score(list(REF.values()), hyps, ["radgraph_proxy"], n_resamples=0)["scores"]
    with (out / "per_report.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(REF) and float(rows["s4"]["radgraph_proxy_simple_f1"]) == 0.0


def test_empty_prediction_is_scored(tmp_path: Path):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    preds = _jsonl(tmp_path / "preds.jsonl", _rows({**PRED, "s4": ""}))
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, *FAST) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["n_pairs"] == 6 and result["inputs"]["empty_predictions"] == 1
    assert result["per_pair"]["radgraph_proxy_simple_f1"][3] == 0.0
    assert result["scores"]["radgraph_proxy_simple_f1"] == pytest.approx(
        sum(result["per_pair"]["radgraph_proxy_simple_f1"]) / 6)


def test_empty_reference_is_an_error(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows({**REF, "s2": "   "}))
    preds = _jsonl(tmp_path / "preds.jsonl", _rows(PRED))
    assert _evaluate(refs, preds, tmp_path / "out", *FAST) == 2
    err = capsys.readouterr().err
    assert "s2" in err and "empty" in err


def test_duplicate_id_is_an_error(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    preds = _jsonl(tmp_path / "preds.jsonl", _rows(PRED) + [{"id": "s1", "report": "Again."}])
    assert _evaluate(refs, preds, tmp_path / "out", *FAST) == 2
    err = capsys.readouterr().err
    assert "preds.jsonl" in err and "'s1'" in err and "more than once" in err


# ------------------------------------------------------------------------------ bad files
def test_bad_files_name_the_file(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    txt = tmp_path / "preds.txt"
    txt.write_text("s1 Normal.\n")
    assert _evaluate(refs, txt, tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err
    assert "preds.txt" in err and "unsupported extension" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "s1", "report": "x"}) + "\n\n" + '{"id": "s2", "report": \n')
    assert _evaluate(refs, bad, tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3" in err and "invalid JSON" in err  # the line number counts the blank line

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"id": "s1", "report": "x"},]')
    assert _evaluate(refs, bad_json, tmp_path / "o", *FAST) == 2
    assert "bad.json" in capsys.readouterr().err

    assert _evaluate(refs, tmp_path / "nope.jsonl", tmp_path / "o", *FAST) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err

    no_text = _jsonl(tmp_path / "notext.jsonl", [{"id": i, "body": t} for i, t in PRED.items()])
    assert _evaluate(refs, no_text, tmp_path / "o", *FAST) == 2
    assert "--text-field" in capsys.readouterr().err


def test_unknown_metric_is_an_error(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    assert _evaluate(refs, refs, tmp_path / "o", "--metrics", "rouge_l,not_a_metric") == 2
    assert "not_a_metric" in capsys.readouterr().err


# ------------------------------------------------------------------------------ comparison
@needs_java
def test_compare_writes_comparison_outputs(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    a = _jsonl(tmp_path / "a.jsonl", _rows(REF))  # system A repeats the references
    b = _jsonl(tmp_path / "b.jsonl", _rows(PRED))
    out = tmp_path / "out"
    assert _evaluate(refs, a, out, "--compare", str(b), "--metrics", "rouge_l,chexpert,radgraph_proxy",
                     "--resamples", "200") == 0
    printed = capsys.readouterr().out
    for name in ["comparison.json", "comparison.csv", "comparison.md"]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    cmp = json.loads((out / "comparison.json").read_text())
    row = cmp["comparison"]["rouge_l"]
    assert row["a"] == pytest.approx(1.0, abs=1e-12) and row["diff"] == row["a"] - row["b"] > 0
    assert row["ci"][0] > 0 and row["p_two_sided"] < 0.05
    assert cmp["inputs"]["b"].endswith("b.jsonl") and cmp["inputs"]["join_b"]["n_pairs"] == 6
    md = (out / "comparison.md").read_text()
    assert "| metric | A | B | A - B | 95% CI | p (two-sided) |" in md and "| rouge_l |" in md
    assert "| rouge_l |" in printed and "comparison.png" in printed


def test_compare_with_only_omitted_metrics_does_not_crash(tmp_path: Path):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(REF))
    assert _evaluate(refs, refs, tmp_path / "out", "--compare", str(refs), "--metrics", "radgraph",
                     "--resamples", "10") in (0, 2)


# ------------------------------------------------------------------------------ labeler-check
def test_labeler_check_prints_micro_f1_last(capsys):
    if not IU_CSV.is_file():
        pytest.skip(f"shared IU X-ray reports not found at {IU_CSV}")
    assert main(["labeler-check", "--data", str(IU_CSV)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert "micro F1" in lines[-1]
    assert any(ln.startswith("| Cardiomegaly |") for ln in lines)
    value = float(lines[-1].rsplit(":", 1)[1])
    assert 0.0 < value <= 1.0
