"""The one base of the project's user-facing errors.

Every error a user can cause and fix (a bad file, config key, spec or argument) derives from
:class:`InputError`; its message names the file, key or argument and the reason. ``radgen``'s
command line catches :class:`InputError` once (``radgen.cli.main``), prints
``radgen <command>: error: <message>`` and exits 2, with no traceback; commands need not catch it. It lives here, in the
lowest layer, so that ``encoder``'s own errors (checkpoints, weights, specs) share it.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input the user can fix; the message says which and why (``radgen`` exits 2)."""
