"""User-facing errors: the command line prints these as one line and exits non-zero, never a traceback."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file that cannot be read, a wrong landmark set, a checkpoint of an unknown layout."""


class NotBetter(InputError):
    """A fine-tuned adapter was worse than the atlas on held-out cases; nothing was written. `estimate`: the
    held-out figures (training.refine's estimate dict), or None."""

    def __init__(self, message: str, estimate: dict | None = None):
        super().__init__(message)
        self.estimate = estimate


class Cancelled(Exception):
    """The user cancelled a detection or a training; nothing was written."""


def describe_mismatch(what: str, missing=(), unexpected=(), wrong_shape=()) -> str:
    """One line listing the offending state-dict keys (the first few of each kind)."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        keys = list(keys)
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            parts.append(f"{label}: {shown}")
    return f"{what} ({'; '.join(parts)})"


def short_list(names, n: int = 5) -> str:
    """The first few names, for messages about landmark sets."""
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
