"""File helpers shared by every layer: atomic writes (a crash never leaves half a file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt (checksum), unreadable or of another job's format."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a crash or a full disk before this leaves the old file whole
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
