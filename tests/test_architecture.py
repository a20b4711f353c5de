"""The one-way rule of docs/architecture.md: encoder <- eval <- radgen, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"encoder": {"eval", "radgen"}, "eval": {"radgen"}}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {f: b for f, b in bad.items() if b}, f"{package}/ must not import {FORBIDDEN[package]}"


def _radgen_modules(path: Path) -> set[str]:
    """Full dotted names of the radgen modules ``path`` imports (at any depth: lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("radgen"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("radgen"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from radgen.jobs import train`
    return out


def test_jobs_are_leaves():
    """Commands are thin leaves (docs/architecture.md): no job module imports another job, and
    nothing below radgen/jobs/ imports from it (the CLI loads the leaves by name)."""
    jobs = sorted((ROOT / "radgen" / "jobs").glob("*.py"))
    assert len(jobs) > 10
    job_names = {f"radgen.jobs.{f.stem}" for f in jobs if f.stem != "__init__"}
    between = {str(f.relative_to(ROOT)): sorted(_radgen_modules(f) & job_names) for f in jobs}
    assert not {f: b for f, b in between.items() if b}, "a job module imports another job module"
    below = [f for f in (ROOT / "radgen").rglob("*.py") if "jobs" not in f.relative_to(ROOT / "radgen").parts]
    up = {str(f.relative_to(ROOT)): sorted(m for m in _radgen_modules(f) if m.startswith("radgen.jobs"))
          for f in below}
    assert not {f: u for f, u in up.items() if u}, "a library module imports from radgen/jobs/"
