"""Encoder specs: one string names every encoder the project reads features from.

* a training checkpoint file or a Hugging Face Dinov2 folder (:func:`load_encoder`);
* ``random:<arch>:<img_size>:<seed>``: a seeded random init of a named architecture;
* ``random-like:<spec>:<seed>``: a seeded random init with exactly the ``ViTConfig`` of ``<spec>``
  (arch, patch size, img_size, registers, ...): the fair untrained control for a pretrained encoder;
* ``pixels[:<patch>[:<img_size>]]``: frozen, nothing learned, patch tokens = the pixels of each
  patch (:mod:`encoder.pixels`);
* ``student:<checkpoint>``: the student backbone of a training checkpoint (a bare path reads the
  teacher, as DINOv2 evaluates it). The student has moved further from its init than the EMA
  teacher of a short run, so probing both tells training from init (docs/encoder.md).

:func:`load_encoder_spec` builds the encoder, :func:`encoder_config` its ``ViTConfig`` reading as
little as possible; a spec that does not parse or names nothing raises :class:`EncoderSpecError`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from encoder.checkpoint import CheckpointError, load_checkpoint
from encoder.errors import InputError
from encoder.pixels import is_pixels_spec, parse_pixels_spec, pixel_encoder
from encoder.vit import ViTConfig, ViTEncoder

__all__ = ["EncoderSpecError", "SPEC_FORMS", "load_encoder_spec", "load_encoder", "encoder_config", "random_encoder",
           "random_like_spec", "is_generated_spec", "parse_random", "missing_file", "which_of"]

SPEC_FORMS = "random:<arch>:<img_size>:<seed> / random-like:<spec>:<seed> / pixels[:<patch>] / student:<checkpoint>"
STUDENT = "student:"


class EncoderSpecError(InputError):
    """An encoder spec that does not parse or names no checkpoint; the message says which."""


def is_generated_spec(spec: str) -> bool:
    """Whether ``spec`` builds its encoder without a file (``random:``, ``random-like:``, ``pixels``)."""
    spec = str(spec)
    return spec.startswith(("random:", "random-like:")) or is_pixels_spec(spec)


def _student_path(spec: str) -> str | None:
    """The checkpoint path of a ``student:`` spec (None for any other spec)."""
    return spec[len(STUDENT):] if spec.startswith(STUDENT) else None


def missing_file(spec: str) -> str | None:
    """Why the checkpoint file or folder a spec reads is not there (None: present, or nothing to read)."""
    spec = str(spec)
    if is_generated_spec(spec):
        return None
    if (path := _student_path(spec)) is not None:
        return None if path and Path(path).is_file() else \
            f"{STUDENT} needs a training checkpoint file (one with student and teacher), and {path!r} is not a file"
    return None if Path(spec).exists() else "no such checkpoint file or folder"


def which_of(spec: str, which: str = "teacher") -> str:
    """Which backbone of a training checkpoint a spec reads: ``student`` for ``student:`` specs, else ``which``."""
    return "student" if _student_path(str(spec)) is not None else which


def random_encoder(cfg: ViTConfig | dict, seed: int = 0) -> ViTEncoder:
    """A randomly initialised ``ViTEncoder(cfg)``; same seed and config -> same weights.

    Seeds a forked RNG, so the caller's global torch RNG is untouched.
    """
    if isinstance(cfg, dict):
        cfg = ViTConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ViTEncoder(cfg)


def parse_random(spec: str) -> tuple[ViTConfig, int]:
    """``random:<arch>:<img_size>:<seed>`` (trailing parts default to vit_small, 224, 0) ->
    ``(resolved ViTConfig, seed)``."""
    parts = str(spec).split(":")[1:]
    if len(parts) > 3:
        raise EncoderSpecError(f"bad encoder spec {spec!r} (expected random:<arch>:<img_size>:<seed>)")
    defaults = ["vit_small", "224", "0"]
    parts = [part or default for part, default in zip(parts + defaults[len(parts):], defaults)]
    try:
        return ViTConfig(arch=parts[0], img_size=int(parts[1])).resolved(), int(parts[2])
    except ValueError as exc:
        raise EncoderSpecError(f"bad encoder spec {spec!r}: {exc}") from None


def _parse_random_like(spec: str) -> tuple[str, int]:
    body = spec[len("random-like:"):]
    source, sep, seed = body.rpartition(":")
    if not sep or not source or not seed.lstrip("-").isdigit():
        raise EncoderSpecError(f"bad encoder spec {spec!r} (expected random-like:<spec>:<seed>)")
    return source, int(seed)


def _parse_pixels(spec: str) -> tuple[int, int]:
    try:
        return parse_pixels_spec(spec)
    except ValueError as exc:
        raise EncoderSpecError(str(exc)) from None


def random_like_spec(source: str, seed: int) -> str:
    """The spec of a seeded random init with the same ``ViTConfig`` as the encoder ``source``."""
    return f"random-like:{source}:{int(seed)}"


def _missing(spec: str) -> EncoderSpecError:
    return EncoderSpecError(f"encoder {spec!r}: no such checkpoint file or folder (or use {SPEC_FORMS})")


_CONFIG_MEMO: dict[tuple[str, int, int], ViTConfig] = {}


def encoder_config(spec: str) -> ViTConfig:
    """The (resolved) ``ViTConfig`` an encoder spec builds, reading as little as possible."""
    spec = str(spec)
    if spec.startswith("random-like:"):
        return encoder_config(_parse_random_like(spec)[0])
    if (path := _student_path(spec)) is not None:  # the student's architecture is the teacher's
        return encoder_config(path)
    if spec.startswith("random:"):
        return parse_random(spec)[0]
    if is_pixels_spec(spec):
        return pixel_encoder(*_parse_pixels(spec)).cfg
    p = Path(spec)
    if p.is_file():
        st = p.stat()
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _CONFIG_MEMO:  # training checkpoints are big: read each once
            ckpt = load_checkpoint(p)
            if "vit_config" not in ckpt:
                raise CheckpointError(f"{p}: checkpoint has no vit_config")
            _CONFIG_MEMO[memo] = ViTConfig(**ckpt["vit_config"]).resolved()
        return copy.deepcopy(_CONFIG_MEMO[memo])
    if p.is_dir():
        return load_encoder(p).cfg
    raise _missing(spec)


def load_encoder(path: str | Path, which: str = "teacher") -> ViTEncoder:
    """A backbone from a training checkpoint file or a HF Dinov2 folder (``random:`` specs too).

    ``which`` picks the teacher (default; DINOv2 evaluates the teacher) or the student.
    """
    spec = str(path)
    if spec.startswith("random:"):
        return random_encoder(*parse_random(spec))
    p = Path(path)
    if p.is_dir():
        from encoder.weights import load_hf_dinov2

        return load_hf_dinov2(p)
    ckpt = load_checkpoint(p)
    model = ViTEncoder(ViTConfig(**ckpt["vit_config"]))
    prefix = f"{which}.backbone."
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{p}: no {which} backbone weights in checkpoint")
    model.load_state_dict(sd)
    return model


def load_encoder_spec(spec: str, which: str = "teacher") -> ViTEncoder:
    """The encoder a spec names (``which``: teacher or student of a training checkpoint)."""
    spec = str(spec)
    if spec.startswith("random-like:"):
        source, seed = _parse_random_like(spec)
        return random_encoder(encoder_config(source), seed)
    if spec.startswith("random:"):
        cfg, seed = parse_random(spec)
        return random_encoder(cfg, seed)
    if is_pixels_spec(spec):
        return pixel_encoder(*_parse_pixels(spec))
    if (path := _student_path(spec)) is not None:  # the spec names the backbone itself, whatever ``which`` says
        if problem := missing_file(spec):
            raise EncoderSpecError(f"encoder {spec!r}: {problem}")
        return load_encoder(path, which="student")
    if not Path(spec).exists():
        raise _missing(spec)
    return load_encoder(spec, which=which)
