"""Checkpoints: one atomic, checksummed, self-describing format used by every job.

A checkpoint is a ``torch.save`` dict holding only tensors and plain Python values, so it loads
with ``torch.load(weights_only=True)`` (no pickled code). It stores what is needed to rebuild
its model (``vit_config``, ``ssl_config``) and, for training checkpoints, everything needed to
resume exactly. A SHA-256 of the file is written beside it (``<file>.sha256``) and checked on load.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from encoder.io import atomic_write_bytes, atomic_write_text
from encoder.vit import ViTConfig, ViTEncoder

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_encoder", "weights_sha256", "FORMAT"]

FORMAT = "radgen-encoder/1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | os.PathLike, payload: dict, fmt: str = FORMAT) -> Path:
    """Write ``payload`` (plus the format tag ``fmt``) atomically, then its checksum."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": fmt, **payload}, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    return path


def load_checkpoint(path: str | os.PathLike, verify: bool = True, fmt: str = FORMAT) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, checksum verified).

    ``fmt`` is the format tag the caller expects (each job has its own).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    sums = path.with_name(path.name + ".sha256")
    if verify and sums.is_file():
        want = sums.read_text().split()[0]
        if hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{path}: checksum mismatch (file corrupt or partially written)")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise CheckpointError(f"{path}: not a {fmt} checkpoint (format {found!r})")
    return ckpt


def load_encoder(path: str | os.PathLike, which: str = "teacher") -> ViTEncoder:
    """A backbone from a checkpoint file, a HF Dinov2 folder, or ``random:<arch>:<img_size>:<seed>``.

    ``which`` picks the teacher (default; DINOv2 evaluates the teacher) or the student.
    """
    spec = str(path)
    if spec.startswith("random:"):
        parts = spec.split(":")[1:]
        arch, size, seed = (parts + ["vit_small", "224", "0"][len(parts):])[:3]
        torch.manual_seed(int(seed))
        return ViTEncoder(ViTConfig(arch=arch, img_size=int(size)))
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


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, values) of ``module``."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
