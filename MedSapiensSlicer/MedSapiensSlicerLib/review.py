"""Reviewing a detection: the points to check, worst first, and the points a person moved marked as corrected.

Detect writes each point's calibrated P(within 2 mm) in its description, with "; check" on the points its review
rule flags (medsapiens.Landmarks.description). While a result node is reviewed, a point moved from where it was
when the review began gets "; corrected" instead of "; check" (Landmarks.corrected_description), so the mark
stays with the node (and in its .mrk.json) and the report no longer lists it as to be checked. MRML only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .observers import PointsObserver

MOVED_MM = 1e-3  # a point farther than this from where the review found it was moved


@dataclass(frozen=True)
class ReviewRow:
    """One point of the review list."""

    index: int                 # the control point's index in the node
    name: str
    probability: float | None  # P(within 2 mm) as detected; None where the description holds none
    corrected: bool

    def cells(self) -> tuple[str, str, str]:
        """Landmark, P, state: the text of the review list's three columns."""
        p = "" if self.probability is None else f"{self.probability:.2f}"
        return self.name, p, "corrected" if self.corrected else "check"


def reviewRows(node) -> list[ReviewRow]:
    """The node's points flagged "check" or marked corrected, the least probable first."""
    from medsapiens import Landmarks

    rows = []
    for i in range(node.GetNumberOfControlPoints() if node is not None else 0):
        text = node.GetNthControlPointDescription(i)
        probability, check = Landmarks.read_description(text)
        corrected = Landmarks.is_corrected(text)
        if check or corrected:
            rows.append(ReviewRow(i, node.GetNthControlPointLabel(i), probability, corrected))
    return sorted(rows, key=lambda r: (1.0 if r.probability is None else r.probability, r.index))


def _positions(node) -> np.ndarray:
    """The points in the node's own coordinates: a transform placed over the node moves none of them."""
    ras = np.zeros((node.GetNumberOfControlPoints(), 3))
    for i in range(len(ras)):
        node.GetNthControlPointPosition(i, ras[i])
    return ras


class Review(PointsObserver):
    """The review of a result node: marks each detected point (its description holds a detection's confidence)
    moved since the review began as corrected, then calls `callback()` (the panel redraws its list)."""

    def __init__(self, node, callback):
        self.found = _positions(node)  # where the points were when the review began
        self.onChanged = callback
        super().__init__(node, self._follow)

    def _follow(self) -> None:
        from medsapiens import Landmarks

        node = self.node
        now = _positions(node)
        if len(now) == len(self.found):
            for i in np.flatnonzero(np.linalg.norm(now - self.found, axis=1) > MOVED_MM):
                text = node.GetNthControlPointDescription(int(i))
                detected = Landmarks.read_description(text)[0] is not None  # a person's own point is left alone
                if detected and node.GetNthControlPointPositionStatus(int(i)) == node.PositionDefined \
                        and not Landmarks.is_corrected(text):
                    node.SetNthControlPointDescription(int(i), Landmarks.corrected_description(text))
        if self.onChanged:
            self.onChanged()
