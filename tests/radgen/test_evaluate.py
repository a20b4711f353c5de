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


# ------------------------------------------------------------------------------ per finding
# Three normal films (n1-n3) and two with findings; CheXpert labels from the rules labeler.
PF_REF = {
    "n1": "The lungs are clear. No acute cardiopulmonary process.",   # No Finding
    "n2": "Heart size is normal. No pleural effusion or pneumothorax.",  # No Finding
    "n3": "No acute cardiopulmonary abnormality.",                     # No Finding
    "f1": "Mild cardiomegaly. Small right pleural effusion.",          # Cardiomegaly, Pleural Effusion
    "f2": "Bibasilar atelectasis.",                                    # Atelectasis
}
PF_PRED = {
    "n1": "The lungs are clear. Possible atelectasis.",  # uncertain (-1): not named, not a false alarm
    "n2": "The heart is enlarged.",                      # false alarm: Cardiomegaly
    "n3": "Small left pleural effusion. Cardiomegaly.",  # false alarm: Pleural Effusion and Cardiomegaly
    "f1": "Mild cardiomegaly.",                          # Cardiomegaly TP, Pleural Effusion FN
    "f2": "Bibasilar atelectasis. Pleural effusion.",    # Atelectasis TP, Pleural Effusion FP
}


def test_per_finding_and_false_alarm_outputs(tmp_path: Path, capsys):
    refs = _jsonl(tmp_path / "refs.jsonl", _rows(PF_REF))
    preds = _jsonl(tmp_path / "preds.jsonl", _rows(PF_PRED))
    out = tmp_path / "out"
    assert _evaluate(refs, preds, out, "--metrics", "chexpert", "--resamples", "0") == 0
    printed = capsys.readouterr().out

    pf = json.loads((out / "metrics.json").read_text())["per_finding"]
    assert pf["variant"] == "chexpert_f1" and pf["labeler"] == "rules-v1" and pf["n_films"] == 5
    rows = {r["finding"]: r for r in pf["findings"]}
    assert list(rows) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
                          "Support Devices"]
    # Cardiomegaly: reference f1 -> support 1; named on n2, n3, f1 -> 3; TP 1, FP 2: precision 1/3,
    # recall 1/1, F1 = 2·1/(2·1+2+0) = 0.5 (printed below)
    assert (rows["Cardiomegaly"]["support"], rows["Cardiomegaly"]["predicted"]) == (1, 3)
    assert rows["Cardiomegaly"]["precision"] == pytest.approx(1 / 3) and rows["Cardiomegaly"]["recall"] == 1.0
    # Pleural Effusion: reference f1; named on n3, f2; TP 0: precision 0/2, recall 0/1
    assert (rows["Pleural Effusion"]["support"], rows["Pleural Effusion"]["predicted"]) == (1, 2)
    assert rows["Pleural Effusion"]["precision"] == 0.0 and rows["Pleural Effusion"]["recall"] == 0.0
    # Atelectasis: reference f2, named on f2 only (n1's "possible" is -1): 1/1, 1/1
    assert (rows["Atelectasis"]["precision"], rows["Atelectasis"]["recall"]) == (1.0, 1.0)
    # Edema, Consolidation: nowhere -> both undefined
    assert rows["Edema"]["precision"] is None and rows["Edema"]["recall"] is None
    # false alarms: 3 No-Finding films; a finding named on n2 and n3 -> 2/3; Cardiomegaly on both -> 2/3
    fa = pf["false_alarm"]
    assert (fa["n_no_finding"], fa["n_any"]) == (3, 2) and fa["any"] == pytest.approx(2 / 3)
    assert fa["max_finding"] == "Cardiomegaly" and fa["max"] == pytest.approx(2 / 3)
    assert fa["rate"]["Pleural Effusion"] == pytest.approx(1 / 3) and fa["rate"]["Atelectasis"] == 0.0

    with (out / "per_finding.csv").open() as f:
        csv_rows = {r["finding"]: r for r in csv.DictReader(f)}
    assert list(csv_rows) == list(rows) + ["any finding"]
    assert float(csv_rows["Cardiomegaly"]["precision"]) == pytest.approx(1 / 3)
    assert csv_rows["Edema"]["precision"] == ""  # undefined: blank
    assert float(csv_rows["Cardiomegaly"]["false_alarm_rate"]) == pytest.approx(2 / 3)
    assert csv_rows["Support Devices"]["false_alarm_rate"] == ""  # a device is not a false alarm
    assert (csv_rows["any finding"]["no_finding_films"], csv_rows["any finding"]["named_on_no_finding"]) == ("3", "2")
    assert {r["system"] for r in csv_rows.values()} == {"A"}

    # printed after the main table, and in metrics.md
    assert printed.index("| chexpert_f1_5_micro |") < printed.index("### Per finding")
    assert "| Cardiomegaly | 1 | 3 | 0.333 | 1.000 | 0.500 |" in printed
    assert "| Edema | 0 | 0 | — | — | — |" in printed
    assert "names a finding on 2 of 3 No-Finding films (66.7%); most named: Cardiomegaly on 2 (66.7%)" in printed
    assert "| Cardiomegaly | 1 | 3 | 0.333 | 1.000 | 0.500 |" in (out / "metrics.md").read_text()
    assert "per_finding.csv" in printed

    # --compare: both systems side by side; B repeats the references (no false alarm)
    out_c = tmp_path / "cmp"
    assert _evaluate(refs, preds, out_c, "--compare", str(refs), "--metrics", "chexpert", "--resamples", "10") == 0
    printed = capsys.readouterr().out
    cmp = json.loads((out_c / "comparison.json").read_text())["per_finding"]
    assert cmp["a"] == pf
    assert cmp["b"]["false_alarm"]["any"] == 0.0 and cmp["b"]["false_alarm"]["max_finding"] is None
    assert ("| finding | support | A predicted | A precision | A recall | B predicted | B precision | B recall |"
            in printed)
    assert "| Cardiomegaly | 1 | 3 | 0.333 | 1.000 | 1 | 1.000 | 1.000 |" in printed
    assert "- false alarms, B: names a finding on 0 of 3 No-Finding films (0.0%); none named" in printed
    assert "B predicted" in (out_c / "comparison.md").read_text()
    with (out_c / "per_finding.csv").open() as f:
        systems = [r["system"] for r in csv.DictReader(f)]
    assert systems == ["A"] * 7 + ["B"] * 7


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
