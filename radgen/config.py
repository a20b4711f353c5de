"""Configs: one full default YAML per job + thin override files + ``key=value`` overrides.

``load_config("synth", files=[...], overrides=["n=200"])`` merges, in order, the job's
``configs/<job>/default.yaml``, each override file and the command-line overrides. The default
is *structured*: a key that is not in it is an error, caught before any work starts. The resolved
config is written next to every output with :func:`save_config`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from encoder.errors import InputError
from encoder.io import atomic_write_text

__all__ = ["ConfigError", "configs_dir", "load_config", "save_config", "add_config_args", "SHARED_DATA_HINT"]

SHARED_DATA_HINT = "../shared/data"  # where a checkout's real test data sits, beside the repository


class ConfigError(InputError):
    """A config file or override is invalid; the message says which and why."""


def configs_dir() -> Path:
    """The ``configs/`` folder: ``$RADGEN_CONFIGS`` or the one beside the installed packages."""
    env = os.environ.get("RADGEN_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def load_config(job: str, files: Iterable[str | os.PathLike] = (), overrides: Iterable[str] = ()) -> DictConfig:
    """Resolve the config of ``job`` (a folder name under ``configs/``).

    Every unknown key of every file and override is reported in one :class:`ConfigError`
    (with the closest known key), before anything is merged or run."""
    default = configs_dir() / job / "default.yaml"
    if not default.is_file():
        raise ConfigError(f"no default config for job {job!r} at {default}")
    cfg = OmegaConf.load(default)
    OmegaConf.set_struct(cfg, True)  # unknown keys are errors
    layers: list[tuple[str, DictConfig]] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            # Allow a bare name like "small" for configs/<job>/small.yaml.
            cand = configs_dir() / job / (p.name if p.suffix else f"{p.name}.yaml")
            if not cand.is_file():
                raise ConfigError(f"config file not found: {f}")
            p = cand
        try:
            layers.append((str(p), OmegaConf.load(p)))
        except (OmegaConfBaseException, ValueError, OSError) as exc:  # YAML syntax, unreadable
            raise ConfigError(f"{p}: {_short(exc)}") from None
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        layers.append(("command-line override", OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command-line override: {_short(exc)}") from None
    base = OmegaConf.to_container(cfg)
    errors = [e for where, layer in layers for e in _unknown_keys(base, OmegaConf.to_container(layer), where)]
    if errors:
        raise ConfigError(f"{len(errors)} unknown config key(s) for {job!r} (see {default}):\n  - "
                          + "\n  - ".join(errors))
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}: {_short(exc)}") from None
    errors = _coerce_types(base, cfg)
    if errors:
        raise ConfigError(f"{len(errors)} config value(s) of the wrong type for {job!r} (see {default}):\n  - "
                          + "\n  - ".join(errors))
    return cfg


def _coerce_types(base, cfg: DictConfig, prefix: str = "") -> list[str]:
    """Give every value the type of its default: where the default is a bool, an int or a float,
    the resolved value becomes one (``"1e-3"`` from the command line becomes 0.001, an int where a
    float is expected a float) or is reported; a null default, a string or a list takes any value.
    So code reads ``cfg.stage2.lr`` as a float without casting it, and a wrong type is an error
    before any work starts."""
    errors: list[str] = []
    for k, default in base.items():
        key = f"{prefix}{k}"
        if isinstance(default, dict):
            sub = cfg.get(k)
            if isinstance(sub, DictConfig):
                errors += _coerce_types(default, sub, f"{key}.")
            continue
        if default is None or not isinstance(default, (bool, int, float)):
            continue
        value = cfg.get(k)
        if value is None:
            continue
        kind = type(default)
        try:
            cfg[k] = _as(kind, value)
        except ValueError:
            errors.append(f"{key} = {value!r}: expected {'true/false' if kind is bool else kind.__name__}")
    return errors


def _as(kind: type, value):
    """``value`` as ``kind`` (bool, int or float), or ``ValueError``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if isinstance(value, bool):  # true is not 1 here
        raise ValueError(value)
    if kind is int:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError(value)
    return float(value)  # a float default: ints, numeric strings ("1e-3")


def _unknown_keys(base, layer, where: str, prefix: str = "") -> list[str]:
    """Keys of ``layer`` (nested dicts) that ``base`` does not have, with the closest known one."""
    if not isinstance(base, dict) or not isinstance(layer, dict):
        return []
    out = []
    for k, v in layer.items():
        if k not in base:
            close = difflib.get_close_matches(str(k), [str(b) for b in base], n=1)
            out.append(f"{where}: unknown key {prefix}{k}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        else:
            out += _unknown_keys(base[k], v, where, f"{prefix}{k}.")
    return out


def save_config(cfg: DictConfig, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a job's outputs (atomically)."""
    path = Path(out_dir) / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0]


def add_config_args(parser, job: str, example: str = "NAME") -> None:
    """The ``--config FILE`` and ``key=value`` arguments of a command whose config is ``configs/<job>/``
    (one definition for every command that takes a config; read back by :func:`load_config`)."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help=f"override file(s) merged onto configs/{job}/default.yaml, in order; a bare "
                             f"name like '{example}' means configs/{job}/{example}.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"{job} config overrides")
