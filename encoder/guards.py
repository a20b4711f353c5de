"""Run guards shared by the training loops: non-finite losses and collapse, by config.

A guard never writes a checkpoint: when it stops a run, the last checkpoint on disk is the last
good one, and re-running the same command resumes from it (after the cause is fixed).
"""

from __future__ import annotations

import math

__all__ = ["TrainingStopped", "NonFiniteGuard", "CollapseGuard", "NONFINITE_MODES", "train_config_errors"]

NONFINITE_MODES = ("stop", "skip")


def train_config_errors(train) -> list[str]:
    """Problems of the guard and checkpoint keys of a job's ``train:`` config section."""
    errors = []
    if train.on_nonfinite not in NONFINITE_MODES:
        errors.append(f"train.on_nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {train.on_nonfinite!r}")
    if int(train.max_nonfinite_skips) < 0:
        errors.append("train.max_nonfinite_skips must be >= 0")
    if int(train.keep_checkpoints) < 1:
        errors.append("train.keep_checkpoints must be >= 1")
    if int(train.get("stop_on_collapse", 0)) < 0:
        errors.append("train.stop_on_collapse must be >= 0 (0: never stop)")
    return errors


class TrainingStopped(RuntimeError):
    """A guard stopped the run; the message says why, at which step, and what was kept."""


class NonFiniteGuard:
    """What to do with a step whose loss (or gradient norm) is NaN or infinite.

    ``mode="stop"``: raise :class:`TrainingStopped`. ``mode="skip"``: drop the step (no optimiser
    or teacher update) and go on, until more than ``max_skips`` steps were dropped in the run.
    """

    def __init__(self, mode: str = "stop", max_skips: int = 10):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {mode!r}")
        self.mode, self.max_skips, self.skipped = mode, int(max_skips), 0

    @staticmethod
    def finite(*values: float) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    def should_skip(self, ok: bool, where: str, kept: str) -> bool:
        """True if the step must be skipped; raises when the run must stop. ``kept`` names the
        checkpoint that survives (for the message)."""
        if ok:
            return False
        if self.mode == "stop":
            raise TrainingStopped(f"{where}: the loss or gradient is NaN/inf. The run stopped; {kept}. "
                                  "Lower the learning rate or use fp32, then re-run to resume "
                                  "(or set train.on_nonfinite=skip to drop such steps).")
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise TrainingStopped(f"{where}: {self.skipped} steps with a NaN/inf loss were skipped, more than "
                                  f"train.max_nonfinite_skips={self.max_skips}. The run stopped; {kept}.")
        return True


class CollapseGuard:
    """Stops pretraining once the collapse monitor has flagged ``patience`` steps in a row
    (``patience=0``: never)."""

    def __init__(self, patience: int = 0):
        self.patience, self.run, self.flag = int(patience), 0, "ok"

    def update(self, flag: str, where: str, kept: str) -> None:
        self.run = self.run + 1 if flag != "ok" else 0
        self.flag = flag
        if self.patience and self.run >= self.patience:
            raise TrainingStopped(f"{where}: the collapse monitor flagged '{flag}' for {self.run} steps in a row "
                                  f"(train.stop_on_collapse={self.patience}). The run stopped; {kept}. See "
                                  "docs/encoder.md (collapse) for the usual fixes: teacher temperature, "
                                  "centering, learning rate.")
