"""Soak: peak memory (RSS) of `radgen features`, `radgen generate` and `radgen evaluate` against input size.

Each job runs as the real CLI (``python -m radgen JOB ...``) in a fresh child process, once per
input size, and its peak RSS is the child's ``ru_maxrss`` from ``os.wait4(pid, 0)`` (this child
only, not the cumulative ``RUSAGE_CHILDREN``). A job that streams its inputs shows the same peak
at every size; one that holds them grows with the size. The table gives, per job and size, the
peak RSS, its ratio to the smallest size's peak (1.0 = flat; the issue asks for <= 1.2), the
growth in MiB and KiB per extra input, the wall time, items/s and the exit code.

* **features**: ``radgen features --encoder random:vit_tiny:56:0 --image-size 56 --batch-size 64``
  on a plain folder of N small synthetic grayscale PNGs (48 x 48, seeded sine gratings + noise).
* **generate**: ``radgen generate --batch-size 64 --max-new-tokens 8`` on the same folders, with a
  run folder trained here for one step per stage (``radgen train``): a random ``vit_tiny`` 56 px
  encoder and the tiny random Llama of ``tests/radgen/tiny_llm.py`` (hidden 64, 2 layers). Tiny
  random models, so the numbers measure the streaming, not the model.
* **evaluate**: ``radgen evaluate --metrics bleu,meteor,rouge_l,cider,chexpert,radgraph_proxy
  --resamples 1000`` on N synthetic report pairs (JSONL, ``id`` + ``report``; the pairs of
  ``bench/evaluate_speed.py``: 60 % re-described cases, 35 % other cases, 5 % empty). These are
  every metric family that runs offline without model weights (radgraph and radcliq need
  weights); 1,000 resamples is the CLI default and the bootstrap is ~10 % of the time.

The sizes are 1,000 / 5,000 / 20,000 images and 10,000 / 30,000 / 100,000 pairs (``--quick``:
1,000 / 4,000 images, 10,000 / 20,000 pairs). Inputs are built in a temporary folder (one set of
images, hard-linked into one folder per size; one set of pairs, written as a prefix per size) and
removed at the end unless ``--keep``.

How the number is taken, and what it includes:

* Linux's ``ru_maxrss`` of a waited child is the largest RSS of that process *and of the
  descendants it waited for* (a max, not a sum): for evaluate that includes the JVMs of the PTB
  tokenizer and METEOR. So each job also runs with an exit hook (``python -c`` + ``runpy`` of the
  same ``radgen`` module, instead of ``python -m radgen``) that writes the job process's own peak
  (``RUSAGE_SELF``) and its largest child's (``RUSAGE_CHILDREN``); the table shows both. The
  hook runs before the interpreter tears down, and teardown itself adds 100-130 MiB of
  *file-backed* RSS (shared-library pages that C++ destructors fault in; anonymous memory does
  not change): that is why the wait4 peak of features and generate is above the job process's.
* Linux also counts the RSS of the process that forks the child (at exec). This script keeps
  itself small for that reason: inputs are built by a helper child, and the script's own peak
  RSS is printed at the end, far below every job's.
* The start-up floor is ``python -m radgen JOB --help`` in a fresh process (the imports alone).

This is a benchmark script, not a test: it prints what it measured and never fails on a number.

    .venv/bin/python bench/soak.py --threads 1                 # default sizes (~20 min on 2 cores)
    .venv/bin/python bench/soak.py --quick --threads 1         # 1,000/4,000 images, 10,000/20,000 pairs (~5 min)
    .venv/bin/python bench/soak.py --jobs evaluate --pairs 10000 100000 --keep --tmp /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import add_json_arg, row, write_json  # noqa: E402  (stdlib only: keeps this process small)

RATIO_FLAT = "peak RSS largest / smallest input (1.0 = flat)"
FLAT_LIMIT = 1.2  # the issue: peak RSS flat within 20 %
JOBS = ("features", "generate", "evaluate")
IMAGE_SIZES, IMAGE_SIZES_QUICK = (1000, 5000, 20000), (1000, 4000)
PAIR_SIZES, PAIR_SIZES_QUICK = (10000, 30000, 100000), (10000, 20000)
EVAL_METRICS = "bleu,meteor,rouge_l,cider,chexpert,radgraph_proxy"
ENCODER = "random:vit_tiny:56:0"
PX, IMG_PX = 56, 48  # encoder/preprocessing size; side of the PNGs on disk


# ----------------------------------------------------------------------------------------------
# Inputs (built in a helper child: see the module docstring)
# ----------------------------------------------------------------------------------------------
def build_images(folder: Path, n: int, sizes: list[int], side: int = IMG_PX, seed: int = 0) -> None:
    """``n`` seeded grayscale PNGs in ``folder/all``, hard-linked into ``folder/N`` for each size."""
    import numpy as np
    from PIL import Image

    src = folder / "all"
    src.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        a, b, c = rng.random(3)
        img = 128 + 60 * np.sin(xx * a * 0.5 + yy * b * 0.5 + c * 6) + rng.integers(0, 40, (side, side))
        Image.fromarray(img.clip(0, 255).astype(np.uint8), "L").save(src / f"{i:05d}.png", compress_level=1)
    for size in sizes:
        dest = folder / str(size)
        dest.mkdir(exist_ok=True)
        for i in range(size):
            f = f"{i:05d}.png"
            try:
                os.link(src / f, dest / f)
            except OSError:
                shutil.copyfile(src / f, dest / f)


def build_pairs(folder: Path, sizes: list[int]) -> None:
    """``refs_N.jsonl`` / ``preds_N.jsonl`` per size: the first N of ``max(sizes)`` synthetic pairs."""
    from evaluate_speed import synthetic_pairs

    refs, hyps = synthetic_pairs(max(sizes))
    folder.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for name, texts in (("refs", refs), ("preds", hyps)):
            with open(folder / f"{name}_{size}.jsonl", "w") as fh:
                for i in range(size):
                    fh.write(json.dumps({"id": f"s{i}", "report": texts[i]}) + "\n")


def build_run(folder: Path) -> None:
    """A tiny trained run folder (1 step per stage): random vit_tiny 56 px + the tests' tiny Llama."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_llm", REPO / "tests" / "radgen" / "tiny_llm.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.make_tiny_llm_folder(folder / "llm", tiny.RADIOLOGY_SENTENCES)
    from radgen.config import load_config
    from radgen.data.synth.generate import generate_dataset
    from radgen.train import run_train

    synth = folder / "synth"
    generate_dataset(load_config("synth", [], [f"out={synth}", "n=16", "size=64", "workers=1", "seed=5"]),
                     progress=False)
    cfg = load_config("reportgen", [], [f"out={folder / 'run'}", f"data.path={synth}", f"encoder.spec={ENCODER}",
                                        f"llm.path={folder / 'llm'}", "train.precision=fp32", "data.workers=0",
                                        "stage1.max_steps=1", "stage2.max_steps=1", "stage1.batch_size=2",
                                        "stage2.batch_size=2", "data.val_split=null", "data.max_train_samples=4"])
    status = run_train(cfg, progress=False)["status"]
    if status != "complete":
        raise RuntimeError(f"radgen train ended with status {status!r}")


def _build_main(what: str, folder: str, sizes: list[int]) -> None:
    sys.path.insert(0, str(REPO))
    if what == "images":
        build_images(Path(folder), max(sizes), sizes)
    elif what == "pairs":
        build_pairs(Path(folder), sizes)
    elif what == "run":
        build_run(Path(folder))
    else:
        raise SystemExit(f"unknown input {what!r}")


# ----------------------------------------------------------------------------------------------
# One measured child
# ----------------------------------------------------------------------------------------------
# ``python -m radgen`` with an atexit hook: at exit the job process writes its own peak RSS
# (RUSAGE_SELF) and its largest waited-for descendant's (RUSAGE_CHILDREN) to $RADGEN_SOAK_USAGE.
# The hook is registered before radgen is imported, so it runs last (atexit is LIFO): after
# radgen's own exit handlers, e.g. the one that stops the METEOR JVM.
WRAPPER = (
    "import atexit, json, os, resource, runpy, sys\n"
    "def _soak_usage(path=os.environ['RADGEN_SOAK_USAGE']):\n"
    "    s, c = (resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
    "    with open(path, 'w') as fh:\n"
    "        json.dump({'self_kib': s, 'children_kib': c}, fh)\n"
    "atexit.register(_soak_usage)\n"
    "runpy.run_module('radgen', run_name='__main__', alter_sys=True)\n"
)


def measure(cmd: list[str], env: dict, log: Path, timeout_s: float) -> dict:
    """Run ``cmd``: its wait4 peak RSS, the job process's own and its children's (MiB), wall s, exit.

    ``cmd`` starting ``python -m radgen`` runs through :data:`WRAPPER` (the same module, run the
    same way) so the job process also reports ``own_mib`` and ``child_mib``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    usage = log.with_suffix(".usage.json")
    usage.unlink(missing_ok=True)
    if cmd[1:3] == ["-m", "radgen"]:
        cmd = [cmd[0], "-c", WRAPPER, *cmd[3:]]
        env = {**env, "RADGEN_SOAK_USAGE": str(usage)}
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True)

        def kill() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its pid stays ours
            wall = time.perf_counter() - t0
        finally:
            timer.cancel()
        kill()  # whatever the job left running in its process group (it should leave nothing)
        _, status, ru = os.wait4(p.pid, 0)  # reap it: this child's own rusage
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    try:
        u = json.loads(usage.read_text())
        own, kids = u["self_kib"] / 1024, (u["children_kib"] / 1024 or None)
    except (OSError, ValueError, KeyError):  # killed, or not a radgen command
        own = kids = None
    tail = log.with_suffix(".err").read_text(errors="replace").strip().splitlines()[-6:]
    return {"peak_mib": ru.ru_maxrss / 1024, "own_mib": own, "child_mib": kids, "wall_s": wall,
            "exit": p.returncode, "timed_out": wall >= timeout_s and p.returncode < 0,
            "cpu_s": ru.ru_utime + ru.ru_stime, "stderr_tail": tail}


def _own_hwm_mib() -> float:
    """This process's own peak RSS (VmHWM of its address space), MiB.

    Not ``RUSAGE_SELF``: that also holds what *our* parent carried in at exec (e.g. ``radgen
    bench``, which has imported torch), which does not reach our children; VmHWM is what does.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_command(job: str, size: int, d: Path) -> list[str]:
    py = [sys.executable, "-m", "radgen", job]
    if job == "features":
        return py + ["--encoder", ENCODER, "--data", str(d / "images" / str(size)), "--out",
                     str(d / "out" / f"features_{size}"), "--image-size", str(PX), "--batch-size", "64",
                     "--overwrite", "--quiet"]
    if job == "generate":
        return py + ["--model", str(d / "model" / "run"), "--images", str(d / "images" / str(size)), "--out",
                     str(d / "out" / f"generate_{size}.jsonl"), "--batch-size", "64", "--max-new-tokens", "8",
                     "--overwrite", "--quiet"]
    return py + ["--predictions", str(d / "pairs" / f"preds_{size}.jsonl"), "--references",
                 str(d / "pairs" / f"refs_{size}.jsonl"), "--out", str(d / "out" / f"evaluate_{size}"),
                 "--metrics", EVAL_METRICS, "--resamples", "1000"]


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _f(x, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def summarise(job: str, res: list[dict]) -> dict:
    """Ratio and growth of one job's sizes (first = smallest), or None where a size failed."""
    out = {"ratio": None, "growth_mib": None, "kib_per_item": None, "own_ratio": None, "own_growth_mib": None}
    if len(res) < 2 or res[0]["exit"] != 0 or res[-1]["exit"] != 0:
        return out
    first, last = res[0], res[-1]
    growth = last["peak_mib"] - first["peak_mib"]
    out.update(ratio=last["peak_mib"] / first["peak_mib"], growth_mib=growth,
               kib_per_item=growth * 1024 / (last["size"] - first["size"]))
    if first["own_mib"] and last["own_mib"]:
        out.update(own_ratio=last["own_mib"] / first["own_mib"], own_growth_mib=last["own_mib"] - first["own_mib"])
    return out


def print_table(results: dict[str, list[dict]], floors: dict[str, dict]) -> None:
    print("\n| job | input | peak RSS MiB (wait4) | × smallest | Δ MiB | job process MiB (before teardown) "
          "| largest child MiB | wall s | items/s | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for job, res in results.items():
        unit = "pairs" if job == "evaluate" else "images"
        base = res[0]["peak_mib"] if res and res[0]["exit"] == 0 else None
        fl = floors.get(job)
        if fl:
            print(f"| {job} | `--help` (start-up floor) | {fl['peak_mib']:.0f} | — | — | {_f(fl['own_mib'])} "
                  f"| — | {fl['wall_s']:.1f} | — | {fl['exit']} |")
        for r in res:
            ratio = f"{r['peak_mib'] / base:.3f}" if base and r["exit"] == 0 else "—"
            delta = f"{r['peak_mib'] - base:+.0f}" if base and r["exit"] == 0 else "—"
            rate = f"{r['size'] / r['wall_s']:.0f}" if r["wall_s"] > 0 else "—"
            print(f"| {job} | {r['size']:,} {unit} | {r['peak_mib']:.0f} | {ratio} | {delta} "
                  f"| {_f(r['own_mib'])} | {_f(r['child_mib'])} | {r['wall_s']:.1f} | {rate} | {r['exit']} |")
    print()
    for job, res in results.items():
        s = summarise(job, res)
        if s["ratio"] is None:
            print(f"{job}: no ratio (a size failed or only one size ran)")
            continue
        verdict = "flat within 20 %" if s["ratio"] <= FLAT_LIMIT else "NOT flat within 20 %"
        own = ("" if s["own_ratio"] is None else
               f"; the job process alone x{s['own_ratio']:.3f} ({s['own_growth_mib']:+.0f} MiB): "
               + ("flat within 20 %" if s["own_ratio"] <= FLAT_LIMIT else "NOT flat within 20 %"))
        print(f"{job}: peak RSS x{s['ratio']:.3f} from {res[0]['size']:,} to {res[-1]['size']:,} "
              f"({s['growth_mib']:+.0f} MiB, {s['kib_per_item']:+.2f} KiB per extra input): {verdict}{own}")


def json_rows(results: dict[str, list[dict]], floors: dict[str, dict], meta: dict) -> list[dict]:
    rows = []
    for job, res in results.items():
        if not res:
            continue
        unit = "pairs" if job == "evaluate" else "images"
        s = summarise(job, res)
        last = res[-1]
        per = "; ".join(f"{r['size']:,}: {r['peak_mib']:.0f} MiB" + ("" if r["exit"] == 0 else f" (exit {r['exit']})")
                        for r in res)
        notes = per
        if s["ratio"] is not None:
            notes += (f"; {s['growth_mib']:+.0f} MiB ({s['kib_per_item']:+.2f} KiB/{unit[:-1]}); "
                      f"flat within 20 %: {'yes' if s['ratio'] <= FLAT_LIMIT else 'NO'}")
            if s["own_ratio"] is not None:
                notes += (f"; job process alone x{s['own_ratio']:.2f} ({s['own_growth_mib']:+.0f} MiB)"
                          + ("" if s["own_ratio"] <= FLAT_LIMIT else ", NOT flat"))
        if floors.get(job):
            notes += f"; start-up floor {floors[job]['peak_mib']:.0f} MiB"
        rows.append(row("soak", f"radgen {job}, {res[0]['size']:,} → {last['size']:,} {unit}", RATIO_FLAT,
                        s["ratio"], last["peak_mib"], "MiB peak RSS (largest input)", notes,
                        sizes=[{k: v for k, v in r.items() if k != "stderr_tail"} for r in res],
                        floor=floors.get(job), command=meta["commands"].get(job),
                        **{k: v for k, v in s.items() if k != "ratio"},
                        **{k: v for k, v in meta.items() if k != "commands"}))
    return rows


# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1,000/4,000 images and 10,000/20,000 pairs (unless --images/--pairs are given)")
    ap.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="default: all three")
    ap.add_argument("--images", type=int, nargs="+", metavar="N", help="image counts (default 1000 5000 20000)")
    ap.add_argument("--pairs", type=int, nargs="+", metavar="N", help="report pairs (default 10000 30000 100000)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads of every job process (default: inherited)")
    ap.add_argument("--no-floor", action="store_true", help="skip the `--help` start-up floor of each job")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per job process (default 1800)")
    ap.add_argument("--tmp", metavar="DIR", help="make the work folder inside DIR (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the inputs, outputs and logs")
    ap.add_argument("--_build", nargs=3, metavar=("WHAT", "DIR", "SIZES"), help=argparse.SUPPRESS)
    add_json_arg(ap)
    args = ap.parse_args()
    if args._build:
        _build_main(args._build[0], args._build[1], [int(x) for x in args._build[2].split(",")])
        return
    img_sizes = sorted(set(args.images or (IMAGE_SIZES_QUICK if args.quick else IMAGE_SIZES)))
    pair_sizes = sorted(set(args.pairs or (PAIR_SIZES_QUICK if args.quick else PAIR_SIZES)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="radgen-soak-", dir=args.tmp))  # a new folder: removing it is safe
    print(f"soak: jobs {', '.join(args.jobs)}; images {img_sizes}, pairs {pair_sizes}; threads "
          f"{args.threads or env.get('OMP_NUM_THREADS', 'default')}; {os.cpu_count()} cores; "
          f"loadavg {' / '.join(f'{x:.2f}' for x in load0)}; work folder {d}", flush=True)

    results: dict[str, list[dict]] = {}
    floors: dict[str, dict] = {}
    built: dict[str, bool] = {}
    build_s: dict[str, float] = {}

    def build(what: str, sizes: list[int]) -> bool:
        if what not in built:
            t = time.perf_counter()
            r = measure([sys.executable, str(Path(__file__).resolve()), "--_build", what, str(d / what_dir[what]),
                         ",".join(map(str, sizes))], env, d / "logs" / f"build_{what}", args.timeout)
            build_s[what] = time.perf_counter() - t
            built[what] = r["exit"] == 0
            print(f"  built {what} in {build_s[what]:.1f} s" if built[what] else
                  f"  building {what} FAILED (exit {r['exit']}): " + " | ".join(r["stderr_tail"]), flush=True)
        return built[what]

    what_dir = {"images": "images", "pairs": "pairs", "run": "model"}
    commands = {}
    try:
        for job in args.jobs:
            sizes = pair_sizes if job == "evaluate" else img_sizes
            needs = {"features": ["images"], "generate": ["images", "run"], "evaluate": ["pairs"]}[job]
            if not all(build(w, pair_sizes if w == "pairs" else img_sizes) for w in needs):
                print(f"{job}: skipped (its inputs could not be built)", flush=True)
                continue
            commands[job] = "python " + " ".join(job_command(job, sizes[-1], Path("$TMP"))[1:])
            if not args.no_floor:
                floors[job] = measure([sys.executable, "-m", "radgen", job, "--help"], env,
                                      d / "logs" / f"{job}_help", args.timeout)
                floors[job].pop("stderr_tail")
                print(f"{job} --help: peak RSS {floors[job]['peak_mib']:.0f} MiB (start-up floor)", flush=True)
            results[job] = []
            for size in sizes:
                try:
                    r = measure(job_command(job, size, d), env, d / "logs" / f"{job}_{size}", args.timeout)
                except Exception as exc:  # noqa: BLE001 - recorded, and the other sizes and jobs still run
                    r = {"peak_mib": 0.0, "own_mib": None, "child_mib": None, "wall_s": 0.0, "exit": -1,
                         "timed_out": False, "cpu_s": 0.0, "stderr_tail": [f"{type(exc).__name__}: {exc}"]}
                r["size"] = size
                r["loadavg_after"] = round(os.getloadavg()[0], 2)
                results[job].append(r)
                extra = "" if r["exit"] == 0 else (" TIMED OUT" if r["timed_out"] else "") + \
                    " | " + " | ".join(r["stderr_tail"])
                print(f"{job} {size:,}: peak RSS {r['peak_mib']:.0f} MiB (job process {_f(r['own_mib'])}, "
                      f"largest child {_f(r['child_mib'])}), {r['wall_s']:.1f} s wall, exit {r['exit']}, "
                      f"loadavg {r['loadavg_after']:.2f}{extra}", flush=True)
    finally:
        if args.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)

    print_table(results, floors)
    total = time.perf_counter() - t_start
    own = _own_hwm_mib()
    load1 = os.getloadavg()
    print(f"\ntotal {total:.0f} s (building inputs {sum(build_s.values()):.0f} s); loadavg before "
          f"{' / '.join(f'{x:.2f}' for x in load0)}, after {' / '.join(f'{x:.2f}' for x in load1)}; "
          f"this script's own peak RSS {own:.0f} MiB (what Linux carries into a child's peak at exec: "
          f"far below every job's)")
    meta = {"threads": args.threads, "quick": args.quick, "evaluate_metrics": EVAL_METRICS, "encoder": ENCODER,
            "image_px_on_disk": IMG_PX, "total_s": total, "build_s": build_s, "script_peak_mib": own,
            "loadavg_before": list(load0), "loadavg_after": list(load1), "commands": commands}
    write_json(args.json, json_rows(results, floors, meta))


if __name__ == "__main__":
    main()
