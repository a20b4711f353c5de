"""Wall time of `radgen evaluate` (all offline metrics + 1,000-resample CIs) on synthetic report pairs.

    python bench/evaluate_speed.py [--n 1000] [--resamples 1000]

References are findings written by the synthetic report grammar for N random cases; the "system"
re-describes the same case with other phrasing for 60 % of pairs, describes another case for 35 %
and returns an empty report for 5 %. Runs the CLI in a fresh process (cold JVM, as a user sees
it) and prints the per-metric times it records. Target (issue 4): <= 30 s for 1,000 pairs on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from radgen.data.synth.case import sample_case
from radgen.data.synth.report import write_report


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    cases = [sample_case(np.random.default_rng([seed, i]), seed=i) for i in range(n)]
    refs = [write_report(c, np.random.default_rng([seed, i, 1]))[0] for i, c in enumerate(cases)]
    hyps = []
    for i, c in enumerate(cases):
        u = rng.random()
        if u < 0.60:
            hyps.append(write_report(c, np.random.default_rng([seed, i, 2]))[0])
        elif u < 0.95:
            hyps.append(write_report(cases[(i + 1) % n], np.random.default_rng([seed, i, 3]))[0])
        else:
            hyps.append("")
    return refs, hyps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    refs, hyps = synthetic_pairs(args.n)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, texts in (("refs", refs), ("preds", hyps)):
            with open(d / f"{name}.jsonl", "w") as fh:
                for i, t in enumerate(texts):
                    fh.write(json.dumps({"id": f"s{i}", "report": t}) + "\n")
        radgen = Path(sys.executable).parent / "radgen"
        t = time.perf_counter()
        res = subprocess.run([str(radgen), "evaluate", "--predictions", str(d / "preds.jsonl"),
                              "--references", str(d / "refs.jsonl"), "--out", str(d / "out"),
                              "--resamples", str(args.resamples)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            sys.exit(res.stderr)
        result = json.loads((d / "out" / "metrics.json").read_text())
    print(f"radgen evaluate, {args.n} synthetic pairs, {args.resamples} bootstrap resamples, cold process")
    for k, v in result["seconds"].items():
        print(f"  {k:<18} {v:6.2f} s")
    print(f"  {'wall (CLI)':<18} {wall:6.2f} s   (target <= 30 s: {'met' if wall <= 30 else 'NOT met'})")
    print(f"  omitted: {', '.join(result['omitted']) or 'none'}")


if __name__ == "__main__":
    main()
