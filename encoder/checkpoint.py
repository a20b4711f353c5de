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
import shutil
import warnings
from pathlib import Path

import torch

from encoder.io import CheckpointError, atomic_write_bytes, atomic_write_text

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest_checkpoint", "weights_sha256", "FORMAT"]

FORMAT = "radgen-encoder/1"


def _kept(path: Path, i: int) -> Path:
    """The ``i``-th older copy of ``path`` (``i = 0`` is ``path`` itself): ``checkpoint.pt.1`` ..."""
    return path if i == 0 else path.with_name(f"{path.name}.{i}")


def _sums(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, payload: dict, fmt: str = FORMAT, keep: int = 1) -> Path:
    """Write ``payload`` (plus the format tag ``fmt``) atomically, then its checksum.

    The bytes go to a temporary file in the same folder, are fsynced and renamed over ``path``,
    so a crash or a failed write (disk full) at any point leaves the previous checkpoint whole.
    With ``keep > 1`` the previous ``keep - 1`` checkpoints stay beside it as ``<path>.1`` (the
    newest) ... ``<path>.<keep-1>``, each with its checksum; :func:`load_latest_checkpoint`
    falls back to them when the newest does not verify.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": fmt, **payload}, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest() + "\n"
    # the new bytes are on disk before anything old moves; then the rotation, then the rename
    atomic_write_bytes(path, data, before_replace=(lambda: _rotate(path, keep)) if keep > 1 and path.is_file() else None)
    # A crash between the rename and this write leaves a stale checksum: the newest then fails
    # verification and load_latest_checkpoint uses <path>.1 (the previous, whole checkpoint).
    atomic_write_text(_sums(path), digest)
    for i in range(max(keep, 1), keep + 64):  # ``keep`` lowered since the last run: drop extras
        if not _kept(path, i).exists():
            break
        _kept(path, i).unlink()
        _sums(_kept(path, i)).unlink(missing_ok=True)
    return path


def _rotate(path: Path, keep: int) -> None:
    """``path.(i-1)`` -> ``path.i`` for the older copies, then ``path`` -> ``path.1`` by hard link
    (so ``path`` itself never disappears before the new file is renamed over it)."""
    for i in range(keep - 1, 1, -1):
        for src, dst in ((_kept(path, i - 1), _kept(path, i)), (_sums(_kept(path, i - 1)), _sums(_kept(path, i)))):
            if src.exists():
                os.replace(src, dst)
    for src, dst in ((path, _kept(path, 1)), (_sums(path), _sums(_kept(path, 1)))):
        if src.exists():
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a file system without hard links
                shutil.copyfile(src, dst)


def load_checkpoint(path: str | os.PathLike, verify: bool = True, fmt: str = FORMAT) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, checksum verified).

    ``fmt`` is the format tag the caller expects (each job has its own).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    sums = _sums(path)
    if verify and sums.is_file():
        want = (sums.read_text().split() or [""])[0]
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


def load_latest_checkpoint(path: str | os.PathLike, fmt: str = FORMAT) -> dict | None:
    """The newest checkpoint among ``path``, ``path.1``, ... that verifies, or None if none exist.

    A newest file that fails (checksum, truncation) is reported with a warning and the previous
    one is used, so a crash while saving costs at most one checkpoint interval. If files exist
    but none verifies, :class:`CheckpointError` lists them all (nothing is deleted).
    """
    path = Path(path)
    candidates = [p for p in (_kept(path, i) for i in range(64)) if p.is_file()]
    errors = []
    for p in candidates:
        try:
            ckpt = load_checkpoint(p, fmt=fmt)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:  # shown on stderr by Python's default warning filter
            warnings.warn(f"resuming from {p} (step {ckpt.get('step')}): " + "; ".join(errors), stacklevel=2)
        return ckpt
    if errors:
        raise CheckpointError("no checkpoint verifies: " + "; ".join(errors))
    return None


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, values) of ``module``."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
