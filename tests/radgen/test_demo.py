"""``radgen demo`` (stage-resumable pipeline) and ``radgen report`` (the results page).

One tiny demo run (40 phantoms, a 2-step encoder pretraining, a tiny random LLM, a few training
steps) is shared by the module: it exercises every stage for real, then the tests check the page,
skip-on-rerun and redo-after-delete on it.
"""

from __future__ import annotations

import copy
import csv
import html.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from radgen.pipelines import demo as demo_mod
from radgen.pipelines.demo import STAGES, DemoError, load_demo_config, run_demo
from radgen.report.page import build_page, shortfalls, word_diff_html

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_llm_dir, tiny_demo_overrides, one_thread):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = load_demo_config("quick", [], tiny_demo_overrides(out, tiny_llm_dir))
    logs: list[str] = []
    summary = run_demo(cfg, progress=False, log=logs.append)
    return cfg, out, summary, logs


def _demo_result(run: Path) -> dict:
    """What a demo computed (timings aside): the generated reports, every metric and the probes."""
    gen = [(r["id"], r["findings"]) for r in map(json.loads, (run / "generate" / "generated.jsonl").read_text().splitlines())]
    scores = {p.parent.name: json.loads(p.read_text())["scores"] for p in sorted((run / "evaluate").glob("*/metrics.json"))}
    probe = [{k: v for k, v in r.items() if k != "spec"}  # the spec holds the run folder's path
             for r in json.loads((run / "probe" / "probe.json").read_text())["rows"]]
    return {"generated": gen, "scores": scores, "probe": probe}


@pytest.mark.reliability
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_demo_killed_and_resumed_matches_the_uninterrupted_run(demo_run, tmp_path, tiny_llm_dir, tiny_demo_overrides,
                                                               sig, ledger):
    """A real ``radgen demo`` process, killed in a random stage (SIGKILL) or pre-empted while the
    generator trains (SIGTERM), then re-run with the same command: same results as ``demo_run``."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "radgen", "demo", "--quick", "--quiet", *tiny_demo_overrides(out, tiny_llm_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rng = np.random.default_rng()
    stage = str(rng.choice(["encoder", "probe", "generator", "generate"])) if sig == signal.SIGKILL else "generator"
    marker = out / stage / ("log.csv" if stage == "generator" else demo_mod.STARTED)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"demo ended before {stage}: {proc.stderr.read()[-1500:]}"
    time.sleep(float(rng.uniform(0.0, 1.0)) if sig == signal.SIGKILL else 0.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), err[-2000:]
    assert "Traceback" not in err
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    same = _demo_result(out) == _demo_result(demo_run[1])
    ledger.kill("demo", signal.Signals(sig).name, f"stage {stage}", same)
    assert same


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.refs.append(("img", a["src"]))
        elif tag == "a" and a.get("href"):
            self.refs.append(("a", a["href"]))


def _check_page(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    for kind, ref in parser.refs:
        assert not ref.startswith(("http:", "https:", "//", "/")), f"{kind} {ref}: page must work offline"
        if ref.startswith("#"):
            assert ref[1:] in parser.ids, f"dangling anchor {ref}"
        else:
            assert (page.parent / ref).is_file(), f"{kind} {ref} referenced by {page} does not exist"
    return parser


def test_every_stage_runs_and_the_page_has_every_section(demo_run):
    cfg, out, summary, logs = demo_run
    assert [r["stage"] for r in summary["stages"]] == [s.name for s in STAGES]
    assert all(r["status"] == "ran" for r in summary["stages"])
    page = out / "index.html"
    parser = _check_page(page)
    for section in ("verdict", "metrics", "per_finding", "comparisons", "probe", "curves", "examples", "stages",
                    "limits"):
        assert section in parser.ids, f"section {section} missing"
    text = page.read_text(encoding="utf-8")
    imgs = [r for k, r in parser.refs if k == "img"]
    assert sum("example_" in r for r in imgs) == 3
    assert any("pretrain_" in r for r in imgs) and any("train_" in r for r in imgs)
    # the teacher's share of its starting weights, from the encoder's log, beside its curves
    share = float(list(csv.DictReader(open(out / "encoder" / "log.csv")))[-1]["teacher_start_share"])
    assert 0.0 < share < 1.0 and f"still gives its starting weights {share:.0%}" in text
    # every baseline is compared on both headline metrics, and the probe table has all three kinds
    for b in ("normal_template", "most_common", "nearest_neighbour"):
        assert f"vs {b} (B)" in text
    # the controls are systems of their own, named as controls, compared with every baseline
    for control in ("generator (oracle tokens)", "generator (pixel tokens)"):
        assert f"{control} (A) vs nearest_neighbour (B)" in text and f"<b>{control}</b>" in text
    assert summary_json_controls(out) == {"generator_oracle", "generator_pixels"}
    assert "chexpert_f1_14_micro" in text and "chexpert_f1_5_micro" in text
    for model in ("pretrained", "random-0", "pixels-16"):
        assert f"<td>{model}</td>" in text
    assert "not a clinical model" in text
    # the page's numbers are the evaluation's numbers
    summary_json = json.loads((out / "evaluate" / "summary.json").read_text())
    v = summary_json["systems"]["generator"]["scores"]["chexpert_f1_14_micro"]
    assert f"{v:.3f}" in text
    summary_md = (out / "summary.md").read_text()
    assert f"| generator | {summary_json['systems']['generator']['n_pairs']} | {v:.3f}" in summary_md
    assert summary_md.index("| data |") < summary_md.index("| encoder |") < summary_md.index("| evaluate |")


def summary_json_controls(out: Path) -> set[str]:
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    assert set(summary["control_comparisons"]) <= set(summary["systems"])
    return set(summary["control_comparisons"])


def test_rerun_skips_every_stage(demo_run):
    cfg, out, _, _ = demo_run
    mtime = (out / "encoder" / "checkpoint.pt").stat().st_mtime_ns
    summary = run_demo(cfg, progress=False, log=lambda m: None)
    assert all(r["status"] == "skipped" for r in summary["stages"])
    assert (out / "encoder" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_deleting_a_stage_redoes_it_and_only_what_reads_it(demo_run):
    cfg, out, _, _ = demo_run
    ckpt = (out / "encoder" / "checkpoint.pt").stat().st_mtime_ns
    model = (out / "generator" / "model.json").stat().st_mtime_ns
    shutil.rmtree(out / "generate")
    summary = run_demo(cfg, progress=False, log=lambda m: None)
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert status == {"data": "skipped", "encoder": "skipped", "probe": "skipped", "generator": "skipped",
                      "generate": "ran", "controls": "skipped", "baselines": "skipped", "evaluate": "ran",
                      "page": "ran"}
    assert (out / "encoder" / "checkpoint.pt").stat().st_mtime_ns == ckpt
    assert (out / "generator" / "model.json").stat().st_mtime_ns == model
    records = [json.loads(line) for line in (out / "generate" / "generated.jsonl").read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}) > 0
    _check_page(out / "index.html")


def test_changed_settings_redo_only_the_stages_they_touch(demo_run):
    cfg, out, _, _ = demo_run
    changed = copy.deepcopy(cfg)
    changed.report.examples = 2
    summary = run_demo(changed, progress=False, log=lambda m: None)
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert status["page"] == "ran" and all(status[s] == "skipped" for s in status if s != "page")
    assert (out / "index.html").read_text().count("class=card") == 2


def test_refuses_a_foreign_folder_and_bad_settings_before_work(tmp_path, tiny_llm_dir, tiny_demo_overrides):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    cfg = load_demo_config("quick", [], tiny_demo_overrides(foreign, tiny_llm_dir))
    with pytest.raises(DemoError, match="not a radgen demo run"):
        run_demo(cfg, progress=False, log=lambda m: None)
    assert (foreign / "precious.txt").read_text() == "keep me"
    from radgen.config import ConfigError

    with pytest.raises(ConfigError, match="optim.nope|nope"):
        run_demo(load_demo_config("quick", [], [f"out={tmp_path / 'x'}", "encoder.overrides=[optim.nope=1]"]),
                 progress=False)
    with pytest.raises(ConfigError, match="probe"):
        run_demo(load_demo_config("quick", [], [f"out={tmp_path / 'y'}", "probe.probes=[logistic,bogus]"]),
                 progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_report_command_on_a_plain_evaluate_folder(tmp_path):
    """The page builder works on any run folder, not only a demo's."""
    from radgen.evaluation import run_evaluate

    refs = tmp_path / "refs.jsonl"
    preds = tmp_path / "preds.jsonl"
    other = tmp_path / "other.jsonl"
    texts = ["Heart size is normal. No pleural effusion.", "There is a small left pleural effusion.",
             "Cardiomegaly. No pneumothorax.", "The lungs are clear."]
    refs.write_text("".join(json.dumps({"id": f"r{i}", "report": t}) + "\n" for i, t in enumerate(texts)))
    preds.write_text("".join(json.dumps({"id": f"r{i}", "report": t}) + "\n"
                             for i, t in enumerate(["Heart size is normal."] * 4)))
    other.write_text("".join(json.dumps({"id": f"r{i}", "report": t}) + "\n" for i, t in enumerate(texts)))
    run = tmp_path / "run"
    run_evaluate(str(preds), str(refs), str(run / "model_vs_oracle"), metrics=["bleu", "chexpert"],
                 compare_with=str(other))
    page = build_page(run)
    parser = _check_page(page)
    assert {"metrics", "comparisons", "verdict"} <= parser.ids
    assert "examples" not in parser.ids  # nothing generated with images: the section is left out
    assert "falls short" in page.read_text()
    # per finding, right after the metric table: the model writes "Heart size is normal." for all four
    # films, so it names no finding (Cardiomegaly: reference r2 -> n=1, recall 0/1, precision undefined)
    # and raises no false alarm on the two No-Finding films (r0, r3)
    assert "per_finding" in parser.ids
    text = page.read_text()
    assert text.index("id='metrics'") < text.index("id='per_finding'") < text.index("id='comparisons'")
    assert "Cardiomegaly <span class=ci>n=1</span></td><td>— / 0.000 <span class=ci>(0 named)</span>" in text
    assert "false alarm: any finding <span class=ci>n=2 No-Finding films</span></td><td>0.000" in text
    summary = (run / "summary.md").read_text()
    assert "| Cardiomegaly (n=1) | — / 0.000 (0 named) |" in summary
    assert "| false alarm: any finding (n=2 No-Finding films) | 0.000 (0 of 2) |" in summary


def test_word_diff_marks_missed_and_added_words():
    ref, gen = word_diff_html("Small left pleural effusion. No pneumothorax.",
                              "Small right pleural effusion. No pneumothorax.")
    assert "<del>left</del>" in ref and "<ins>right</ins>" in gen
    assert "<del>" not in gen and "<ins>" not in ref
    ref, gen = word_diff_html("a <b> & c", "a <b> & c")
    assert "&lt;b&gt;" in ref and "<del>" not in ref  # escaped, and equal text is unmarked


def test_shortfalls_name_only_metrics_where_the_model_is_behind():
    cmps = {"nn": {"chexpert_f1_14_micro": {"a": 0.4, "b": 0.5, "diff": -0.1, "ci": [-0.2, -0.01]},
                   "chexpert_f1_5_micro": {"a": 0.3, "b": 0.2, "diff": 0.1, "ci": [0.01, 0.2]}},
            "tpl": {"chexpert_f1_14_micro": {"a": 0.4, "b": 0.41, "diff": -0.01, "ci": [-0.05, 0.03]}}}
    s = shortfalls(cmps)
    assert [(x["baseline"], x["metric"], x["significant"]) for x in s] == [
        ("nn", "chexpert_f1_14_micro", True), ("tpl", "chexpert_f1_14_micro", False)]


def test_stage_dependencies_are_declared_in_order():
    names = [s.name for s in STAGES]
    for i, s in enumerate(STAGES):
        assert all(names.index(d) < i for d in s.deps), s.name
    assert demo_mod.MARKER == "stage.json"
