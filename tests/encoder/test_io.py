"""encoder.io.install_folder: the one way a finished folder replaces another (LLM install, export,
a run's LoRA adapter, a merged run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoder.io import install_folder, parse_jsonl


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(text)
    return path


def test_install_replaces_an_old_folder_and_leaves_nothing_behind(tmp_path: Path):
    target = _folder(tmp_path / "model", "old")
    (target / "only_in_old.txt").write_text("x")
    install_folder(_folder(tmp_path / ".model.tmp", "new"), target)
    assert (target / "weights.bin").read_text() == "new" and not (target / "only_in_old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no tmp, no stale folder


def test_install_into_an_empty_or_absent_target(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    install_folder(_folder(tmp_path / ".a", "a"), tmp_path / "empty")
    install_folder(_folder(tmp_path / ".b", "b"), tmp_path / "absent")
    assert (tmp_path / "empty" / "weights.bin").read_text() == "a"
    assert (tmp_path / "absent" / "weights.bin").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["absent", "empty"]


def test_jsonl_lines_are_counted_with_the_blank_ones():
    assert parse_jsonl('{"a": 1}\n\n  \n{"b": 2}\n', "x.jsonl") == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match=r"^x\.jsonl:3: invalid JSON \("):
        parse_jsonl('{"a": 1}\n\n{"b": \n', "x.jsonl")
