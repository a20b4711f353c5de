"""``radgen bench`` (radgen/bench.py, radgen/jobs/bench.py) on fake scripts, and the common --json shape of bench/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from radgen.cli import main
from radgen import bench as B

REPO = Path(__file__).resolve().parents[1]

# A fake script: writes two rows (one a matmul peak) to --json, echoes its argv.
OK = """
import json, sys
args = sys.argv[1:]
path = args[args.index("--json") + 1]
print("argv", args)
rows = [{"bench": "a_ok", "case": "x b1", "ratio_kind": "ours vs ref (time ratio, >1 = ours faster)",
         "ratio": 1.25, "value": 12.5, "unit": "ms", "notes": "quick" if "--quick" in args else "full",
         "detail": {"argv": args}},
        {"bench": "a_ok", "case": "matmul peak fp32 (2048³, start)", "ratio_kind": None, "ratio": None,
         "value": 150.0, "unit": "GFLOP/s", "notes": "", "detail": {"matmul_peak": "fp32", "when": "start"}}]
open(path, "w").write(json.dumps(rows))
"""
FAIL = """
import sys
print("some progress")
print("Traceback (most recent call last):", file=sys.stderr)
print("RuntimeError: the fake benchmark broke", file=sys.stderr)
sys.exit(3)
"""
SLOW = """
import time
print("starting", flush=True)
time.sleep(60)
"""
NO_JSON = "print('printed a table but wrote no json')\n"
BAD_JSON = """
import sys
args = sys.argv[1:]
open(args[args.index("--json") + 1], "w").write("{not json")
"""


@pytest.fixture()
def fake_bench(tmp_path) -> Path:
    d = tmp_path / "repo" / "bench"
    d.mkdir(parents=True)
    for name, src in (("a_ok", OK), ("b_fail", FAIL), ("c_slow", SLOW), ("d_nojson", NO_JSON),
                      ("e_badjson", BAD_JSON), ("_helper", "raise SystemExit('never run')\n")):
        (d / f"{name}.py").write_text(textwrap.dedent(src))
    return d


def test_list_and_select(fake_bench):
    assert B.list_scripts(fake_bench) == ["a_ok", "b_fail", "c_slow", "d_nojson", "e_badjson"]
    assert B.list_scripts(REPO / "bench")[:len(B.ORDER)] == list(B.ORDER)  # every known script is there
    with pytest.raises(B.BenchError, match="no such benchmark: nope"):
        B.run_bench(out_dir=fake_bench.parent / "out", only=["nope"], bench_dir=fake_bench, progress=None)


def test_failures_and_timeouts_are_recorded_and_the_others_run(fake_bench, tmp_path):
    lines = []
    out = tmp_path / "out"
    res = B.run_bench(quick=True, out_dir=out, threads=1, timeout_s=3, bench_dir=fake_bench,
                      progress=lambda *a, **k: lines.append(a[0]))
    st = {s["name"]: s for s in res["scripts"]}
    assert [s["name"] for s in res["scripts"]] == ["a_ok", "b_fail", "c_slow", "d_nojson", "e_badjson"]
    assert st["a_ok"]["status"] == "ok" and st["a_ok"]["rows"] == 2
    assert st["b_fail"]["status"] == "failed" and st["b_fail"]["returncode"] == 3
    assert "RuntimeError: the fake benchmark broke" in st["b_fail"]["reason"]
    assert "Traceback" in st["b_fail"]["stderr_tail"]
    assert st["c_slow"]["status"] == "timed out" and st["c_slow"]["seconds"] < 20
    assert st["d_nojson"]["status"] == "failed" and "no --json" in st["d_nojson"]["reason"]
    assert st["e_badjson"]["status"] == "failed" and "unreadable" in st["e_badjson"]["reason"]
    assert res["ok"] is False
    # the script got --quick, --threads and --json, and ran from the repository root
    argv = res["rows"][0]["detail"]["argv"]
    assert argv[:3] == ["--quick", "--threads", "1"] and argv[3] == "--json"
    assert res["rows"][0]["notes"] == "quick"
    # progress: one line per script
    assert lines[0] == "[1/5] a_ok ..." and any(" ok" in ln for ln in lines)
    assert any("timed out" in ln for ln in lines)
    # files
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == res["rows"] and saved["scripts"][1]["status"] == "failed"
    for k in ("cpu", "cores", "python", "torch", "transformers", "date", "loadavg_before", "loadavg_after"):
        assert k in saved["environment"]
    md = (out / "bench.md").read_text()
    assert "| a_ok | x b1 | ours vs ref (time ratio, >1 = ours faster) | 1.250 | 12.5 ms | quick |" in md
    assert "a_ok fp32 150 (start)" in md  # the peak goes to the header, not the table
    assert "| a_ok | matmul peak" not in md
    assert "| c_slow | timed out |" in md and "RuntimeError: the fake benchmark broke" in md
    assert (out / "logs" / "a_ok.out").read_text().startswith("argv")
    assert "starting" in (out / "logs" / "c_slow.out").read_text()  # partial output of a killed script
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_only_and_cli(fake_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(B, "find_bench_dir", lambda: fake_bench)
    out = tmp_path / "cli"
    assert main(["bench", "--only", "a_ok", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/1] a_ok ..." in printed and "| a_ok | x b1 |" in printed
    res = json.loads((out / "bench.json").read_text())
    assert [s["name"] for s in res["scripts"]] == ["a_ok"] and res["rows"][0]["notes"] == "full"
    assert main(["bench", "--only", "a_ok,b_fail.py", "--out", str(out)]) == 1  # a failure: exit 1
    assert main(["bench", "--only", "zzz", "--out", str(out)]) == 2
    assert "no such benchmark" in capsys.readouterr().err


def test_missing_bench_dir_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import radgen

    monkeypatch.setattr(radgen, "__file__", str(tmp_path / "site-packages" / "radgen" / "__init__.py"))
    with pytest.raises(B.BenchError, match="installed wheel"):
        B.find_bench_dir()
    assert main(["bench", "--out", str(tmp_path / "x")]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_table_on_fake_rows():
    rows = [
        {"bench": "encoder_forward", "case": "224px b8 fp32", "ratio_kind": "ours vs transformers | x",
         "ratio": 1.0512, "value": 2340.4, "unit": "ms/batch", "notes": "line1\nline2", "detail": {}},
        {"bench": "evaluate_speed", "case": "200 pairs", "ratio_kind": None, "ratio": None, "value": 9.87,
         "unit": "s", "notes": "no ratio", "detail": {}},
        {"bench": "train_speed", "case": "matmul peak fp32 (2048³, start)", "ratio": None, "value": 160.2,
         "unit": "GFLOP/s", "detail": {"matmul_peak": "fp32", "when": "start"}},
        {"bench": "train_speed", "case": "matmul peak fp32 (2048³, end)", "ratio": None, "value": 120.0,
         "unit": "GFLOP/s", "detail": {"matmul_peak": "fp32", "when": "end"}},
    ]
    table = B.format_table(rows).splitlines()
    assert table[0] == "| bench | case | ratio kind | ratio | value | notes |"
    assert table[2] == ("| encoder_forward | 224px b8 fp32 | ours vs transformers \\| x | 1.051 | 2340 ms/batch "
                        "| line1 line2 |")
    assert table[3] == "| evaluate_speed | 200 pairs | — | — | 9.87 s | no ratio |"
    assert len(table) == 4  # peaks are not table rows
    assert B.matmul_peaks(rows) == [
        {"bench": "train_speed", "precision": "fp32", "when": "start", "gflops": 160.2},
        {"bench": "train_speed", "precision": "fp32", "when": "end", "gflops": 120.0}]
    md = B.format_markdown({"quick": True, "rows": rows, "scripts": [], "environment": {
        "cpu": "Fake CPU", "cores": 2, "gpus": ["H200"], "python": "3.11", "torch": "2.x",
        "transformers": "5.x", "date": "2026-01-01T00:00:00+00:00", "loadavg_before": [0.5, 0.4, 0.3],
        "loadavg_after": [2.0, 1.0, 0.5], "total_seconds": 12}})
    assert md.startswith("# `radgen bench --quick`")
    for part in ("Fake CPU, 2 cores; GPU: H200", "torch 2.x, transformers 5.x", "2026-01-01",
                 "before 0.50 / 0.40 / 0.30, after 2.00 / 1.00 / 0.50", "train_speed fp32 160 → 120"):
        assert part in md


def test_common_row_shape():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "bench"))
    r = _common.row("x", "case", _common.RATIO_BATCHED, 2, 3, "s", "n", detail={"a": float("nan")}, b=[1.0])
    assert list(r) == list(B.ROW_KEYS)
    assert r["ratio"] == 2.0 and r["detail"] == {"a": None, "b": [1.0]}
    p = _common.peak_row("x", "bf16", 300.0, "end")
    assert B.matmul_peaks([p]) == [{"bench": "x", "precision": "bf16", "when": "end", "gflops": 300.0}]


def test_every_script_has_quick_threads_and_json():
    """Read from the sources (running --help would import torch once per script)."""
    names = B.list_scripts(REPO / "bench")
    assert "soak" in names
    for name in names:
        src = (REPO / "bench" / f"{name}.py").read_text()
        assert '"--quick"' in src and '"--threads"' in src, name
        assert "add_json_arg(ap)" in src and "write_json(args.json" in src, name


def _soak():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import soak
    finally:
        sys.path.remove(str(REPO / "bench"))
    return soak


SOAK_MEASURE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import soak
d, env = Path(sys.argv[2]), dict(os.environ)
out = {"big": soak.measure([sys.executable, "-c", "x = b'1' * (200 << 20); raise SystemExit(3)"], env, d / "big", 60),
       "small": soak.measure([sys.executable, "-c", "pass"], env, d / "small", 60),
       "hooked": soak.measure([sys.executable, "-m", "radgen", "evaluate", "--help"], env, d / "help", 120)}
print(json.dumps(out))
"""


def test_soak_measures_one_child_not_the_cumulative_children(tmp_path):
    """bench/soak.py's wait4 peak is per child; the radgen exit hook reports the job process's own.

    Measured from a small process: Linux adds the forking process's RSS to a child's peak at exec,
    and this pytest process may have imported torch already.
    """
    res = subprocess.run([sys.executable, "-c", SOAK_MEASURE, str(REPO / "bench"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.splitlines()[-1])
    big, small, hooked = m["big"], m["small"], m["hooked"]
    assert big["exit"] == 3 and big["peak_mib"] >= 200 and big["own_mib"] is None
    assert small["exit"] == 0 and small["peak_mib"] < 100  # not the earlier child's 200 MiB
    assert hooked["exit"] == 0 and 0 < hooked["own_mib"] <= hooked["peak_mib"] + 1


def test_soak_rows_on_fake_measurements():
    soak = _soak()

    def m(size, peak, own, exit=0):
        return {"size": size, "peak_mib": peak, "own_mib": own, "child_mib": None, "wall_s": 2.0, "exit": exit,
                "timed_out": False, "cpu_s": 1.0, "stderr_tail": []}

    results = {"features": [m(1000, 1000.0, 900.0), m(20000, 1100.0, 950.0)],
               "evaluate": [m(10000, 1000.0, 200.0), m(100000, 0.0, None, exit=1)]}
    rows = soak.json_rows(results, {}, {"commands": {}, "threads": 1})
    assert [set(r) for r in rows] == [set(B.ROW_KEYS)] * 2
    assert rows[0]["ratio_kind"] == soak.RATIO_FLAT and abs(rows[0]["ratio"] - 1.1) < 1e-9
    assert rows[0]["detail"]["growth_mib"] == 100.0 and "flat within 20 %: yes" in rows[0]["notes"]
    assert rows[0]["value"] == 1100.0 and len(rows[0]["detail"]["sizes"]) == 2
    assert rows[1]["ratio"] is None and "(exit 1)" in rows[1]["notes"]  # a failed size: no ratio, no crash


@pytest.mark.slow
def test_evaluate_speed_json_for_real(tmp_path):
    """The cheapest real script, tiny: its --json rows are what radgen bench reads (~12 s, a JVM starts)."""
    path = tmp_path / "ev.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "evaluate_speed.py"), "--quick", "--n", "20",
                          "--resamples", "10", "--threads", "1", "--json", str(path)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    rows = json.loads(path.read_text())
    assert len(rows) == 1 and set(rows[0]) == set(B.ROW_KEYS)
    assert rows[0]["bench"] == "evaluate_speed" and rows[0]["ratio"] is None  # no 30 s target at 20 pairs
    assert rows[0]["value"] > 0 and rows[0]["unit"] == "s wall (CLI)"
    assert "20 pairs" in rows[0]["case"]


def _gpu_check():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_check


def test_gpu_check_sizes_are_the_recipe():
    """The check's paper-recipe step measures what configs/encoder/rad_dino_vitb14.yaml trains."""
    from radgen.config import load_config

    c = load_config("encoder", ["rad_dino_vitb14"], ["out=x"])
    r = _gpu_check().RAD_DINO
    assert (r["arch"], r["img_size"], r["global_size"], r["local_size"], r["n_local"], r["batch"]) == (
        c.model.arch, c.model.img_size, c.crops.global_size, c.crops.local_size, c.crops.n_local, c.optim.batch_size)
    assert (r["out_dim"], r["hidden_dim"], r["bottleneck_dim"], r["grad_checkpointing"]) == (
        c.ssl.out_dim, c.ssl.hidden_dim, c.ssl.bottleneck_dim, c.model.grad_checkpointing)


def test_bench_gpu_runs_only_the_gpu_check(monkeypatch):
    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        raise B.BenchError("stop here")

    import radgen.jobs.bench as leaf

    monkeypatch.setattr(leaf, "run_bench", fake_run)  # the name the command calls
    assert main(["bench", "--gpu", "--quick"]) == 2
    assert seen["only"] == ["gpu_check"] and seen["quick"] is True


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's CPU dry run (tiny sizes, ~70 s on 2 cores): every step runs
    in its own process and reports, MFU is filled in, and the steps that run radgen's commands on
    phantoms get their flags right: pretraining ends on SIGTERM with exit 143 and a checkpoint, the
    probe and radgen features read that checkpoint."""
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(md),
                          "--json", str(js)], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    rows = json.loads(js.read_text())
    steps = {r["detail"]["step"]: r for r in rows}
    assert set(_gpu_check().STEPS) <= set(steps)
    assert all(r["detail"]["step_status"] == "ok" for r in rows if r["detail"]["step"] in _gpu_check().STEPS)
    for step in ("ssl_vitb14_224", "ssl_rad_dino_vitb14", "generator_train", "generator_lora"):
        assert 0 < steps[step]["ratio"] < 1 and steps[step]["detail"]["flops_per_step"] > 0, step
    det = steps["ssl_deterministic"]["detail"]
    assert det["seconds_default"] > 0 and det["seconds_deterministic"] > 0 and steps["ssl_deterministic"]["ratio"] > 0
    assert {r["detail"]["matmul_peak"] for r in rows if r["detail"].get("matmul_peak")} == {"bf16", "fp32"}
    train, sigterm = [r for r in rows if r["detail"]["step"] == "pretrain_phantoms"]
    assert train["value"] > 0 and train["unit"] == "images/s" and train["detail"]["steps"] >= 3
    assert 0 < train["detail"]["model_step_share"] and "model step alone" in train["notes"]
    assert sigterm["detail"]["sigterm_exit"] == 143 and sigterm["detail"]["sigterm_checkpoint"] is True
    assert ["logistic" in r["case"] for r in rows if r["detail"]["step"] == "probe"] == [True, False]
    feat = steps["features_vs_card"]
    assert feat["ratio"] > 0 and feat["detail"]["card_images_per_s"] > 0
    assert feat["detail"]["features_meta"]["n_features"] == 40
    text = md.read_text()
    assert text.startswith("# GPU check (dry run)") and "| generate |" in text and "| features_vs_card |" in text


def test_gpu_check_records_a_failing_or_slow_step(tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(gc.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(
        subprocess.TimeoutExpired(a[0], k["timeout"])))
    [r] = gc.run_step("matmul", True, 5, tmp_path)
    assert r["detail"]["step_status"] == "timed out" and "5 s timeout" in r["notes"]
    monkeypatch.setattr(gc.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], 1, "", "boom\n"))
    [r] = gc.run_step("matmul", True, 5, tmp_path)
    assert r["detail"]["step_status"] == "failed" and "boom" in r["notes"]


def test_gpu_check_reads_only_complete_log_rows(tmp_path):
    """The pretraining log is read while it is written: a half-written last line is not a step."""
    log = tmp_path / "log.csv"
    log.write_text("step,images_per_s,nonfinite_skipped\n0,10.5,0\n1,11.0,0\n2,1")
    assert [r["step"] for r in _gpu_check()._log_rows(log)] == ["0", "1"]
    assert _gpu_check()._log_rows(tmp_path / "absent.csv") == []
