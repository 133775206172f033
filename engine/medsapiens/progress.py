"""How a long job says how far it is, and how it is stopped.

Every job of the engine (detect, download, fine-tune, train, evaluate) reports through one callback shape,
`progress(Progress)`, and stops when its `cancel()` returns True (raising Cancelled, having written nothing). A
job made of phases gives each phase its share of the bar with `within`, so callers see one fraction for the
whole job and one line saying what it does now: the command line draws it as a bar, the worker sends it to
the Slicer panel as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    fraction: float                  # of the whole job, 0..1
    message: str                     # what the job does now, one line
    phase: str = ""                  # which part of the job, for programs ("atlas", "train", "views", ...)
    step: int | None = None          # units of the phase done (optimiser steps, images, bytes), of `total`
    total: int | None = None
    loss: float | None = None        # training: smoothed loss
    remaining: float | None = None   # seconds left, where known


Callback = Optional[Callable[[Progress], None]]
Cancel = Optional[Callable[[], bool]]


def report(progress: Callback, fraction: float, message: str, **fields) -> None:
    """Call `progress` (if any) with a Progress."""
    if progress is not None:
        progress(Progress(min(max(float(fraction), 0.0), 1.0), message, **fields))


def within(progress: Callback, start: float, end: float) -> Callback:
    """A callback for one part of a job: the part's fractions land on [start, end] of `progress`'s bar."""
    if progress is None:
        return None
    return lambda p: progress(replace(p, fraction=start + (end - start) * p.fraction))


def spans(weights: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Phase -> (start, end) on the bar, each phase as long as its weight (the phases in order)."""
    total, out, start = sum(weights.values()), {}, 0.0
    for phase, w in weights.items():
        out[phase] = (start / total, (start + w) / total)
        start += w
    return out


def each(items, message: Callable[[int, int], str], progress: Callback, cancel: Cancel):
    """The items one by one, Cancel checked and progress reported before each: message(n, total), n from 1."""
    items = list(items)
    for n, item in enumerate(items):
        check(cancel)
        report(progress, n / len(items), message(n + 1, len(items)), step=n, total=len(items))
        yield item


def check(cancel: Cancel, what: str = "cancelled") -> None:
    """Raise Cancelled when the user asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled(what)
