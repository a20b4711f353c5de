"""Shared fixtures: the real material in ../shared/data (see its README), tiny models, and the
reliability ledger.

The ledger (``pytest -m reliability``): tests record each bad input they fed a job (and how the
job handled it), each process they killed (and whether the resumed result was identical), each
injected numerical fault and each identifier search (and what it found) through the ``ledger``
fixture. The figures are counted from those records, never typed in, and printed in the terminal
summary as the reliability report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to busy-waiting on a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_llm_module():
    """tests/radgen/tiny_llm.py, imported by path as ``tiny_llm`` (so ``from tiny_llm import ...``
    works in test modules whatever pytest's import mode): ``tests/radgen`` is not a package."""
    import importlib.util
    import sys

    name = "tiny_llm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "radgen" / "tiny_llm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_tiny_llm_module()  # register it before test modules are collected (it imports nothing heavy)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer folder (ChatML template), built once per session.
    Treat it as read-only; copy it (or call make_tiny_llm_folder) to modify one."""
    module = _tiny_llm_module()
    return module.make_tiny_llm_folder(tmp_path_factory.mktemp("tiny_llm"), module.RADIOLOGY_SENTENCES)


def _tiny_demo_overrides(out: Path, llm: Path) -> list[str]:
    """``radgen demo --quick`` shrunk to seconds: 40 phantoms, a 1-epoch tiny encoder, a few
    generator steps on the tiny LLM at ``llm`` (and the same for the oracle and pixel controls), 3
    examples on the page."""
    return [
        f"out={out}",
        "synth.overrides=[n=40,size=64,seed=3]",
        "encoder.overrides=[optim.epochs=1,optim.warmup_epochs=0,optim.batch_size=16,crops.n_local=2,"
        "model.img_size=56,crops.global_size=56,crops.local_size=28,data.image_size=64,train.checkpoint_every=1]",
        "probe.probes=[logistic,segment]", "probe.seg_epochs=2", "probe.resamples=50",
        f"generator.overrides=[llm.path={llm},stage1.max_steps=2,stage2.max_steps=2,stage1.batch_size=4,"
        "stage2.batch_size=4,train.eval_every=0,train.checkpoint_every=1,data.max_val_samples=2,"
        "train.sample_generations=1,train.precision=fp32,data.workers=0]",
        "controls=[oracle,pixels:16:64]",
        "generate.max_new_tokens=12", "generate.batch_size=4",
        "evaluate.metrics=[bleu,rouge_l,chexpert]", "evaluate.resamples=50",
        "report.examples=3",
    ]


@pytest.fixture(scope="session")
def tiny_demo_overrides():
    """``f(out, llm_dir) -> [key=value, ...]`` for a tiny real ``radgen demo --quick`` run."""
    return _tiny_demo_overrides


@dataclass
class Ledger:
    inputs: list[dict] = field(default_factory=list)   # job, case, expected, got, handled, traceback
    kills: list[dict] = field(default_factory=list)    # job, signal, at, identical
    searches: list[dict] = field(default_factory=list)  # jobs, files, identifiers, found
    faults: list[dict] = field(default_factory=list)    # job, fault, outcome, handled

    def input(self, job: str, case: str, expected: str, got: str, traceback: bool = False) -> bool:
        handled = got == expected and not traceback
        self.inputs.append(dict(job=job, case=case, expected=expected, got=got, handled=handled,
                                traceback=traceback))
        return handled

    def kill(self, job: str, signal: str, at: str, identical: bool) -> None:
        self.kills.append(dict(job=job, signal=signal, at=at, identical=identical))

    def search(self, jobs: list[str], files: int, identifiers: int, found: list[str]) -> None:
        self.searches.append(dict(jobs=list(jobs), files=files, identifiers=identifiers, found=list(found)))

    def fault(self, job: str, fault: str, outcome: str, handled: bool) -> None:
        self.faults.append(dict(job=job, fault=fault, outcome=outcome, handled=handled))

    def lines(self) -> list[str]:
        out = []
        if self.inputs:
            n = len(self.inputs)
            ok = sum(r["handled"] for r in self.inputs)
            tb = sum(r["traceback"] for r in self.inputs)
            jobs = Counter(r["job"] for r in self.inputs)
            how = Counter(r["got"] for r in self.inputs)
            out.append(f"bad inputs: {n} tried, {ok} handled as documented, {tb} tracebacks "
                       f"(per job: {', '.join(f'{j} {c}' for j, c in sorted(jobs.items()))})")
            out.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(how.items())))
            out += [f"  NOT HANDLED: {r['job']} / {r['case']}: expected {r['expected']}, got {r['got']}"
                    + (" (traceback)" if r["traceback"] else "") for r in self.inputs if not r["handled"]]
        if self.kills:
            same = sum(r["identical"] for r in self.kills)
            sigs = Counter(r["signal"] for r in self.kills)
            out.append(f"kills: {len(self.kills)} ({', '.join(f'{s} {c}' for s, c in sorted(sigs.items()))}), "
                       f"{same} resumed with identical results")
            out += [f"  {r['job']}: {r['signal']} at {r['at']}: {'identical' if r['identical'] else 'DIFFERENT'}"
                    for r in self.kills]
        if self.faults:
            ok = sum(r["handled"] for r in self.faults)
            out.append(f"numerical faults: {len(self.faults)} injected, {ok} handled as configured")
            out += [f"  {r['job']}: {r['fault']}: {r['outcome'] if r['handled'] else 'NOT HANDLED'}" for r in self.faults]
        if self.searches:
            files = sum(r["files"] for r in self.searches)
            found = [f for r in self.searches for f in r["found"]]
            ids = max(r["identifiers"] for r in self.searches)
            jobs = sorted({j for r in self.searches for j in r["jobs"]})
            out.append(f"identifiers: {ids} fragments of 6 fake DICOM identifiers searched for in {files} files and "
                       f"outputs written by {len(jobs)} jobs ({', '.join(jobs)}): {len(found)} leaked"
                       + (f": {found[:5]}" if found else ""))
        return out


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    lines = LEDGER.lines()
    if lines:
        terminalreporter.section("reliability report")
        for line in lines:
            terminalreporter.write_line(line)
