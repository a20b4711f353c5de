"""Shared fixtures: the real material in ../shared/data (see its README)."""

from __future__ import annotations

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
