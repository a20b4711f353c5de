"""Every command's user-fixable errors reach the user as one error line and exit 2 (docs/architecture.md,
"an error a user can fix"): each command is run with a bad input of its kind through the CLI's
entry point, and nothing may escape as a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from radgen.cli import JOB_PARSERS, main

MISSING = "no/such/path"


def _cases(tmp: Path) -> dict[str, list[str]]:
    """One bad invocation per command: a missing file or folder, or an unknown config key."""
    out = str(tmp / "out")
    return {
        "synth": ["synth", "--out", out, "no_such_key=1"],
        "synth-check": ["synth-check", MISSING, "--real", MISSING],
        "pixel-baseline": ["pixel-baseline", MISSING],
        "manifest": ["manifest", "folder", MISSING, "--out", str(tmp / "m.csv")],
        "pretrain-encoder": ["pretrain-encoder", "--out", out, "no_such_key=1"],
        "features": ["features", "--encoder", "nope.pt", "--data", MISSING, "--out", out],
        "probe": ["probe", "--data", MISSING, "--encoder", "nope.pt"],
        "probe-scaling": ["probe-scaling", "--data", MISSING, "--out", out, "no_such_key=1"],
        "pretrain-study": ["pretrain-study", "--out", out, "no_such_key=1"],
        "train": ["train", "--out", out, "no_such_key=1"],
        "generate": ["generate", "--model", MISSING, "--images", MISSING, "--out", str(tmp / "g.jsonl")],
        "export": ["export", "--model", MISSING, "--out", out],
        "baselines": ["baselines", "--data", MISSING, "--encoder", "nope.pt", "--out", out],
        "evaluate": ["evaluate", "--predictions", MISSING, "--references", MISSING, "--out", out],
        "labeler-check": ["labeler-check", "--data", MISSING],
        "report": ["report", MISSING],
        "bench": ["bench", "--only", "no_such_bench", "--out", out],
        "demo": ["demo", "--out", out, "no_such_key=1"],
    }


def test_every_command_has_a_bad_input_case(tmp_path):
    assert set(_cases(tmp_path)) == set(JOB_PARSERS) - {"info"}  # info reads no input


@pytest.mark.parametrize("command", sorted(set(JOB_PARSERS) - {"info"}))
def test_bad_input_is_one_line_and_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _cases(tmp_path)[command]
    rc = main(argv)  # an exception that escaped main() would fail the test with its traceback
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err[-2000:])
    # one error line, `radgen <command>[ <sub-command>]: error: <reason>` (a config error may list
    # its keys on indented lines below it); progress bars and warnings may come before it
    said = [line for line in err.splitlines() if line.startswith(f"radgen {command}")]
    assert len(said) == 1 and ": error: " in said[0], err[-2000:]
    assert "Traceback" not in err
