"""The reliability suite's folder: ``corpus`` (the bad-input corpus and job runners) importable by
the tests here. The ledger that prints the reliability report lives in ``tests/conftest.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _corpus_module():
    """tests/reliability/corpus.py as ``corpus`` (this folder is not a package)."""
    if "corpus" not in sys.modules:
        spec = importlib.util.spec_from_file_location("corpus", Path(__file__).with_name("corpus.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["corpus"] = module
        spec.loader.exec_module(module)
    return sys.modules["corpus"]


_corpus_module()
