"""File helpers shared by every layer: atomic writes (a crash never leaves half a file), UTF-8
reading that says where a bad byte is, and JSON Lines parsing that says which line is bad."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from encoder.errors import InputError

__all__ = ["CheckpointError", "NotUTF8Error", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "install_folder",
           "parse_jsonl", "read_utf8"]


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt (checksum), unreadable or of another job's format."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes,
                       before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and ``os.replace``,
    then fsync the folder. ``before_replace`` runs once the new bytes are safely on disk and just
    before the rename (checkpoint rotation); if anything fails, ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)  # a crash or a full disk before this leaves the old file whole
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def install_folder(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` at ``target`` (same file system) by renaming it. An empty
    ``target`` is removed first; any other is renamed into a fresh stale folder beside it and
    deleted afterwards, so a crash leaves the old folder or the new one, never a half-written one."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class NotUTF8Error(InputError):
    """A text file that is not UTF-8; ``line`` (1-based), ``offset`` and ``byte`` say where."""

    def __init__(self, line: int, offset: int, byte: int):
        self.line, self.offset, self.byte = line, offset, byte
        super().__init__(f"not UTF-8 text (byte {byte:#04x} at offset {offset}); re-encode the file as UTF-8")


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path`` (UTF-8, a BOM dropped); :class:`NotUTF8Error` names the bad byte's line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NotUTF8Error(data[: exc.start].count(b"\n") + 1, exc.start, data[exc.start]) from None


def parse_jsonl(text: str, source: str | os.PathLike) -> list:
    """The JSON value of each non-blank line of ``text`` (JSON Lines). A bad line raises
    ``ValueError("SOURCE:LINE: invalid JSON (why)")``, lines counted from 1 with blank ones
    included; callers re-raise it as their own error."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{n}: invalid JSON ({exc.msg})") from None
    return rows


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
