"""The scaffolding both training loops share (encoder pretraining and the report generator).

* :class:`StopSignal`: SIGTERM (pre-emption, ``timeout``, ``kill``) sets a flag; the loop finishes
  its step, agrees with the other ranks (:func:`encoder.distributed.all_ranks_agree` /
  ``all_sum``), checkpoints and exits 143.
* :class:`CsvLog`: one appended row per logged step; on resume the rows after the checkpoint are
  dropped first, so a resumed run's log reads like an uninterrupted one. Numbers are written with
  :func:`fmt_number`.
* :func:`tensorboard_writer`: scalars to ``out/tensorboard`` when asked for and installed.
"""

from __future__ import annotations

import csv
import io
import signal
from pathlib import Path
from typing import Callable, Sequence

from encoder.io import atomic_write_text

__all__ = ["StopSignal", "CsvLog", "fmt_number", "read_csv_log", "tensorboard_writer", "TENSORBOARD_DIR"]

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


class CsvLog:
    """A training loop's CSV log (rank 0 writes it): opened with the rows ``keep`` accepts from an
    earlier run (those up to the checkpoint being resumed; by default none), then one appended and
    flushed row per :meth:`write`. A resumed run's log reads like an uninterrupted one; a kill
    loses at most the row being written. ``rows`` holds what the file holds, as written."""

    def __init__(self, path: str | Path, fields: Sequence[str], keep: Callable[[dict], bool] = lambda row: False):
        self.path, self.fields = Path(path), list(fields)
        self.rows = [r for r in read_csv_log(self.path) if keep(r)]
        buf = io.StringIO()  # the header and the kept rows, replaced atomically
        w = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self._fh = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, extrasaction="ignore")

    def write(self, row: dict) -> dict:
        """Append ``row`` (numbers through :func:`fmt_number`; keys outside the fields ignored)."""
        row = {k: fmt_number(v) for k, v in row.items()}
        self._writer.writerow(row)
        self._fh.flush()
        self.rows.append(row)
        return row

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
