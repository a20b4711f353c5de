"""The radgen command line and config handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radgen.cli import JOB_PARSERS, main
from radgen.config import ConfigError, load_config, save_config


def test_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ["info", "synth", "pixel-baseline", "demo", *JOB_PARSERS]:
        assert cmd in out
    for cmd in ["synth", "pixel-baseline", "demo", "train", "generate"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_train_without_arguments_lists_what_is_missing(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "out is not set" in err and "data.path is not set" in err and "encoder.spec is not set" in err


def test_synth_command(tmp_path: Path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n", "6", "--size", "64", "--seed", "1", "--quiet", "workers=1"]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "Cardiomegaly" in text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["n"] == 6 and saved["size"] == 64 and saved["workers"] == 1


def test_synth_errors_are_clear(tmp_path: Path, capsys):
    assert main(["synth", "--quiet"]) == 2
    assert "'out'" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--config", "no_such_file"]) == 2
    assert "not found" in capsys.readouterr().err


def test_config_layers(tmp_path: Path):
    f = tmp_path / "o.yaml"
    f.write_text("n: 50\nsize: 64\n")
    cfg = load_config("synth", [f, "small"], ["size=96", "splits.test=0.2"])
    assert cfg.n == 200  # 'small' came after o.yaml
    assert cfg.size == 96 and cfg.splits.test == 0.2
    path = save_config(cfg, tmp_path / "out")
    assert yaml.safe_load(path.read_text())["size"] == 96
    with pytest.raises(ConfigError, match="key=value"):
        load_config("synth", [], ["size"])
    with pytest.raises(ConfigError, match="no default config"):
        load_config("nope")


def test_every_unknown_key_is_reported_at_once(tmp_path: Path):
    f = tmp_path / "o.yaml"
    f.write_text("sise: 64\nsplits:\n  tset: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config("synth", [f], ["n=10", "seeed=3"])
    text = str(err.value)
    assert "3 unknown config key(s)" in text
    assert f"{f}: unknown key sise (did you mean size?)" in text
    assert "unknown key splits.tset (did you mean splits.test?)" in text
    assert "command-line override: unknown key seeed (did you mean seed?)" in text


def test_values_take_their_defaults_type():
    # "1e-3" is a string to YAML 1.1 (no dot); an int where a float is expected becomes a float
    cfg = load_config("reportgen", [], ["stage2.lr=1e-3", "stage2.grad_clip=2", "seed=7", "stage2.max_steps=60"])
    assert cfg.stage2.lr == 0.001 and isinstance(cfg.stage2.lr, float)
    assert cfg.stage2.grad_clip == 2.0 and isinstance(cfg.stage2.grad_clip, float)
    assert cfg.seed == 7 and isinstance(cfg.seed, int)
    assert cfg.stage2.max_steps == 60  # a null default takes any value
    with pytest.raises(ConfigError) as err:
        load_config("reportgen", [], ["stage2.lr=fast", "seed=1.5", "train.tensorboard=1"])
    text = str(err.value)
    assert "3 config value(s) of the wrong type" in text
    assert "stage2.lr = 'fast': expected float" in text
    assert "seed = 1.5: expected int" in text
    assert "train.tensorboard = 1: expected true/false" in text


def test_console_script_info():
    exe = Path(sys.executable).parent / "radgen"
    res = subprocess.run([str(exe), "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "device:" in res.stdout and "configs:" in res.stdout
