"""The scaffolding both training loops share (encoder pretraining and the report generator).

* :class:`StopSignal`: SIGTERM (pre-emption, ``timeout``, ``kill``) sets a flag; the loop finishes
  its step, agrees with the other ranks (:func:`encoder.distributed.all_ranks_agree` /
  ``all_sum``), checkpoints and exits 143.
* The CSV log: one row per logged step, rewritten atomically; on resume the rows after the
  checkpoint are dropped (:func:`truncate_csv_log`), so a resumed run's log reads like an
  uninterrupted one. Numbers are written with :func:`fmt_number`.
* :func:`tensorboard_writer`: scalars to ``out/tensorboard`` when asked for and installed.
"""

from __future__ import annotations

import csv
import io
import signal
from pathlib import Path
from typing import Callable, Iterable, Sequence

from encoder.io import atomic_write_text

__all__ = ["StopSignal", "fmt_number", "read_csv_log", "write_csv_log", "truncate_csv_log", "tensorboard_writer",
           "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"


class StopSignal:
    """Context manager: SIGTERM sets :attr:`flag` instead of killing the process; the previous
    handler is restored on exit. Outside the main thread (some test runners) it installs nothing."""

    def __init__(self):
        self.flag = False
        self._old = None
        self._installed = False

    def __enter__(self) -> "StopSignal":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not in the main thread
            self._installed = False
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)


def fmt_number(v):
    """A log value as written: floats to 6 significant digits, anything else as is."""
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csv_log(path: str | Path) -> list[dict]:
    """The rows of a CSV log ([] when there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv_log(path: str | Path, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """Write ``rows`` (keys outside ``fields`` ignored) with a header, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def truncate_csv_log(path: str | Path, fields: Sequence[str], keep: Callable[[dict], bool]) -> list[dict]:
    """Keep only the rows ``keep`` accepts (those before the checkpoint being resumed); returns them.
    A missing log stays missing."""
    rows = read_csv_log(path)
    if Path(path).is_file():
        rows = [r for r in rows if keep(r)]
        write_csv_log(path, rows, fields)
    return rows


def tensorboard_writer(out: str | Path, required: bool = False):
    """A ``SummaryWriter`` on ``out/tensorboard``, or None when tensorboard is not installed
    (``required``: raise instead; callers that asked for it validate the package beforehand)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        if required:
            raise
        return None
    return SummaryWriter(str(Path(out) / TENSORBOARD_DIR))
