"""``radgen bench``: run every benchmark script of ``bench/`` and write one table of ratios.

Each script runs in its own process, ``python bench/NAME.py [--quick] [--threads N] --json TMP``,
from the repository root, and writes its results as rows in the common shape of
``bench/_common.py`` (bench, case, ratio_kind, ratio, value, unit, notes, detail). A script that
fails or runs past the timeout is recorded with its status and the last lines of its stderr; the
other scripts still run. The outputs in ``--out`` (default ``runs/bench``):

* ``bench.json``: the environment (device, versions, date, load), the status of every script and
  all rows;
* ``bench.md``: the same as one markdown table, headed by the device, versions, date, machine
  load and the matmul peaks the scripts measured;
* ``logs/NAME.out`` and ``logs/NAME.err``: each script's own printed output.

The scripts live in the source tree (``bench/`` next to the ``radgen`` package), not in an
installed wheel: without them the command stops with an error that says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from encoder.errors import InputError

__all__ = ["BenchError", "ORDER", "find_bench_dir", "list_scripts", "run_bench", "format_markdown"]

# The scripts in the order they run (any other bench/*.py runs after them, alphabetically).
ORDER = ("encoder_forward", "pretrain_step", "train_speed", "evaluate_speed", "features_model",
         "features_job", "generate_speed")
ROW_KEYS = ("bench", "case", "ratio_kind", "ratio", "value", "unit", "notes", "detail")
DEFAULT_TIMEOUT_S = {True: 900.0, False: 3600.0}  # per script, by --quick
STDERR_TAIL_LINES = 12
GPU_CHECK = "gpu_check"  # bench/gpu_check.py: `radgen bench --gpu` (its steps have their own timeouts)


class BenchError(InputError):
    """``radgen bench`` cannot run (no bench/ folder, unknown script name)."""


# ----------------------------------------------------------------------------------------------
# Finding the scripts
# ----------------------------------------------------------------------------------------------
def find_bench_dir() -> Path:
    """``bench/`` of the source checkout this ``radgen`` package was imported from."""
    import radgen

    root = Path(radgen.__file__).resolve().parents[1]
    bench = root / "bench"
    if not (bench.is_dir() and any(bench.glob("*.py"))):
        raise BenchError(
            f"no benchmark scripts at {bench}: `radgen bench` runs the scripts of a source checkout "
            "(bench/ next to the radgen package, e.g. a git clone installed with `pip install -e .`); "
            "an installed wheel does not ship them")
    return bench


def list_scripts(bench_dir: Path) -> list[str]:
    """Names (no ``.py``) of the runnable scripts in ``bench_dir``: ORDER first, then the rest."""
    names = {p.stem for p in Path(bench_dir).glob("*.py") if not p.name.startswith("_")}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def _select(available: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return available
    wanted = [n.strip().removesuffix(".py") for n in only if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise BenchError(f"no such benchmark: {', '.join(unknown)} (available: {', '.join(available)})")
    return [n for n in available if n in wanted]


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(pkg: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch or a broken CUDA set-up: report no GPU
        pass
    return []


def _git_commit(repo: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(repo: Path, threads: int | None) -> dict:
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_usable = os.cpu_count()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": cores_usable,
        "gpus": _gpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "radgen": _version("radgen"),
        "commit": _git_commit(repo),
        "threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python_executable": sys.executable,
    }


# ----------------------------------------------------------------------------------------------
# Running one script
# ----------------------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the script and whatever it started (its own process group, see start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, n: int = STDERR_TAIL_LINES) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _normalise(rows, name: str) -> list[dict]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("--json output is not a list of rows (objects)")
    out = []
    for r in rows:
        r = {k: r.get(k) for k in ROW_KEYS} | {k: v for k, v in r.items() if k not in ROW_KEYS}
        r["bench"] = r["bench"] or name
        r["detail"] = r["detail"] if isinstance(r["detail"], dict) else {}
        out.append(r)
    return out


def run_script(bench_dir: Path, name: str, quick: bool, threads: int | None, timeout_s: float,
               work: Path) -> tuple[dict, list[dict], str, str]:
    """Run ``bench_dir/name.py`` once; (status, rows, stdout, stderr). Never raises for the script's faults."""
    json_path = work / f"{name}.json"
    cmd = [sys.executable, str(Path(bench_dir) / f"{name}.py")]
    cmd += ["--quick"] if quick else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--json", str(json_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed script's log keeps what it printed
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out_f, err_f = work / f"{name}.out", work / f"{name}.err"
    status = {"name": name, "command": cmd, "loadavg_before": _loadavg()}
    t0 = time.perf_counter()
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=str(Path(bench_dir).parent), env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
        except BaseException:  # Ctrl-C: the script is in its own session and would run on
            _kill_group(proc)
            raise
    status["seconds"] = round(time.perf_counter() - t0, 1)
    status["loadavg_after"] = _loadavg()
    stdout = out_f.read_text(errors="replace")
    stderr = err_f.read_text(errors="replace")
    rows: list[dict] = []
    if code is None:
        status.update(status="timed out", returncode=None,
                      reason=f"stopped after the {timeout_s:.0f} s timeout", stderr_tail=_tail(stderr))
    elif code != 0:
        last = _tail(stderr, 1) or _tail(stdout, 1) or "(no output)"
        status.update(status="failed", returncode=code, reason=f"exit code {code}: {last}",
                      stderr_tail=_tail(stderr))
    elif not json_path.is_file():
        status.update(status="failed", returncode=0, reason="exited 0 but wrote no --json file",
                      stderr_tail=_tail(stderr))
    else:
        try:
            rows = _normalise(json.loads(json_path.read_text()), name)
            status.update(status="ok", returncode=0)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            status.update(status="failed", returncode=0, reason=f"unreadable --json output: {e}",
                          stderr_tail=_tail(stderr))
    status["rows"] = len(rows)
    return status, rows, stdout, stderr


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run_bench(quick: bool = False, out_dir: str | os.PathLike = "runs/bench", only: list[str] | None = None,
              threads: int | None = None, timeout_s: float | None = None, bench_dir: str | os.PathLike | None = None,
              progress: Callable[..., None] | None = print) -> dict:
    """Run the benchmark scripts one after another and write ``bench.json``, ``bench.md`` and logs.

    ``only``: script names (without ``.py``) to run, default all; ``threads``: passed to every
    script as ``--threads`` and as OMP/MKL_NUM_THREADS; ``timeout_s``: per script (default 900 s
    with ``quick``, 3600 s without); ``bench_dir``: the folder of scripts (default the checkout's
    ``bench/``), whose parent is the working directory of the scripts. A script that fails or
    times out is recorded and the next one runs. Returns what ``bench.json`` holds.
    """
    from encoder.io import atomic_write_text

    bench_dir = Path(bench_dir).resolve() if bench_dir is not None else find_bench_dir()
    if not bench_dir.is_dir():
        raise BenchError(f"no benchmark folder at {bench_dir}")
    names = _select(list_scripts(bench_dir), only)
    if not names:
        raise BenchError(f"no benchmark scripts in {bench_dir}")
    timeout_s = float(timeout_s) if timeout_s else DEFAULT_TIMEOUT_S[bool(quick)]
    out_dir = Path(out_dir)
    say = progress or (lambda *a, **k: None)

    env = environment(bench_dir.parent, threads)
    env["loadavg_before"] = _loadavg()
    scripts, rows = [], []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="radgen-bench-") as tmp:
        for i, name in enumerate(names, 1):
            say(f"[{i}/{len(names)}] {name} ...", end="", flush=True)
            status, got, stdout, stderr = run_script(bench_dir, name, quick, threads, timeout_s, Path(tmp))
            scripts.append(status)
            rows.extend(got)
            atomic_write_text(out_dir / "logs" / f"{name}.out", stdout)
            atomic_write_text(out_dir / "logs" / f"{name}.err", stderr)
            say(f" {status['seconds']:.0f} s {status['status']}"
                + (f" ({status['reason']})" if status["status"] != "ok" else ""), flush=True)
    env["loadavg_after"] = _loadavg()
    env["total_seconds"] = round(time.perf_counter() - t_all, 1)
    result = {"quick": bool(quick), "timeout_s": timeout_s, "bench_dir": str(bench_dir), "environment": env,
              "matmul_peaks": matmul_peaks(rows), "scripts": scripts, "rows": rows,
              "ok": all(s["status"] == "ok" for s in scripts)}
    result["files"] = {"json": str(out_dir / "bench.json"), "md": str(out_dir / "bench.md"),
                       "logs": str(out_dir / "logs")}
    atomic_write_text(out_dir / "bench.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "bench.md", format_markdown(result))
    return result


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def matmul_peaks(rows: list[dict]) -> list[dict]:
    """The matmul-peak rows the scripts reported: [{bench, precision, when, gflops}]."""
    out = []
    for r in rows:
        d = r.get("detail") or {}
        if d.get("matmul_peak") and r.get("value") is not None:
            out.append({"bench": r["bench"], "precision": d["matmul_peak"], "when": d.get("when"),
                        "gflops": r["value"]})
    return out


def _cell(x) -> str:
    return "" if x is None else str(x).replace("|", "\\|").replace("\n", " ")


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.3g}"
    return f"{x:.1e}"


def _peaks_line(peaks: list[dict]) -> str:
    by: dict[tuple[str, str], dict[str, float]] = {}
    for p in peaks:
        by.setdefault((p["bench"], p["precision"]), {})[p.get("when") or "?"] = p["gflops"]
    parts = []
    for (bench, prec), whens in by.items():
        if "start" in whens and "end" in whens:
            parts.append(f"{bench} {prec} {whens['start']:.0f} → {whens['end']:.0f}")
        else:
            parts.append(f"{bench} {prec} " + ", ".join(f"{v:.0f} ({w})" for w, v in whens.items()))
    return "; ".join(parts)


def _load(x) -> str:
    return " / ".join(f"{v:.2f}" for v in x) if x else "n/a"


def format_table(rows: list[dict]) -> str:
    """``bench | case | ratio kind | ratio | value | notes`` of every row that is not a matmul peak."""
    lines = ["| bench | case | ratio kind | ratio | value | notes |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        if (r.get("detail") or {}).get("matmul_peak"):
            continue  # in the header
        ratio = "—" if r.get("ratio") is None else f"{r['ratio']:.3f}"
        value = _num(r.get("value")) + (f" {r['unit']}" if r.get("unit") and r.get("value") is not None else "")
        lines.append(f"| {_cell(r.get('bench'))} | {_cell(r.get('case'))} | {_cell(r.get('ratio_kind') or '—')} "
                     f"| {ratio} | {_cell(value)} | {_cell(r.get('notes'))} |")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    env = result.get("environment", {})
    gpus = env.get("gpus") or []
    threads = (f"--threads {env['threads']} (and OMP/MKL_NUM_THREADS)" if env.get("threads") else
               "each script's default" + (f" (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})"
                                          if env.get("OMP_NUM_THREADS") else ""))
    peaks = result.get("matmul_peaks") or matmul_peaks(result.get("rows", []))
    cores = env.get("cores")
    if env.get("cores_usable") not in (None, cores):
        cores = f"{cores} ({env['cores_usable']} usable)"
    head = [
        f"# `radgen bench{' --quick' if result.get('quick') else ''}`",
        "",
        f"* date: {env.get('date', 'n/a')}",
        f"* device: {env.get('cpu', 'n/a')}, {cores} cores; GPU: {', '.join(gpus) if gpus else 'none'}",
        f"* versions: python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}"
        + (f"; commit {env['commit']}" if env.get("commit") else ""),
        f"* threads: {threads}",
        f"* machine load (1 / 5 / 15-min loadavg): before {_load(env.get('loadavg_before'))}, "
        f"after {_load(env.get('loadavg_after'))}",
        "* matmul peak (2048³ torch.mm, GFLOP/s, start → end of each script): "
        + (_peaks_line(peaks) or "not reported by the scripts that ran"),
        f"* wall time: {env.get('total_seconds', 0):.0f} s for {len(result.get('scripts', []))} script(s)",
        "",
        format_table(result.get("rows", [])),
        "",
        "## Scripts",
        "",
        "| script | status | seconds | rows | loadavg before → after | note |",
        "|---|---|---:|---:|---|---|",
    ]
    for s in result.get("scripts", []):
        lb, la = s.get("loadavg_before"), s.get("loadavg_after")
        load = f"{lb[0]:.2f} → {la[0]:.2f}" if lb and la else "n/a"
        head.append(f"| {_cell(s['name'])} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('rows', 0)} "
                    f"| {load} | {_cell(s.get('reason', ''))} |")
    bad = [s for s in result.get("scripts", []) if s["status"] != "ok" and s.get("stderr_tail")]
    for s in bad:
        head += ["", f"### {s['name']}: {s['status']} (last lines of stderr)", "", "```", s["stderr_tail"], "```"]
    return "\n".join(head) + "\n"
