"""Saving a matplotlib figure as a PNG, atomically: the one figure saver of the project
(probe figures, metric plots, the results page)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from encoder.io import atomic_write_bytes

__all__ = ["save_png"]


def save_png(fig, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Render ``fig`` (a pyplot figure or a bare ``matplotlib.figure.Figure``) to ``path`` as one
    atomic write and release it; ``tight``: crop to the drawn area (``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", **({"bbox_inches": "tight"} if tight else {}))
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: drop it from pyplot's registry
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
