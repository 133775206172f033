"""The geometric constructions cephalometric measures are made of: an angle at a point, the angle between two lines
(unsigned, or signed by the way the second turns), a point's signed distance to a line or to a perpendicular, a
distance, a ratio, a sum.

Points are landmark names, or a tuple of names for their midpoint; `value(points)` takes a dict name -> (2,) point
in mm in the ISBI orientation (face to the right, rows downwards; `cephalometry.mm_points` mirrors an image that
faces left). Lines run from their first point to their second; a line's direction and the cross product give
every sign, so a tilted head keeps the signs. `drawn` is what a tracing draws: 2 points for a line, 3 for an angle
(the middle one its vertex), each a name or a tuple of names (their midpoint) as above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _names(spec) -> tuple:
    return tuple(spec) if isinstance(spec, tuple) else (spec,)


def _point(points, spec) -> np.ndarray:
    return np.mean([points[n] for n in _names(spec)], axis=0)


def _landmarks(*specs) -> tuple:
    """The landmark names the points read, each once, in order."""
    return tuple(dict.fromkeys(n for s in specs for n in _names(s)))


def _unsigned(u, v) -> float:
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def _toward_anterior(u, v) -> bool:
    """Whether v turns from u toward the face (counter-clockwise on screen, rows downwards, face right)."""
    return float(u[0] * v[1] - u[1] * v[0]) < 0


@dataclass(frozen=True)
class Angle:
    """The angle a-vertex-b, 0-180 degrees."""

    a: object
    vertex: object
    b: object

    @property
    def landmarks(self) -> tuple:
        return _landmarks(self.a, self.vertex, self.b)

    @property
    def drawn(self) -> tuple:
        return ((self.a, self.vertex, self.b),)

    def value(self, points) -> float:
        at = _point(points, self.vertex)
        return _unsigned(_point(points, self.a) - at, _point(points, self.b) - at)


@dataclass(frozen=True)
class LineAngle:
    """The angle between the directions of two lines, 0-180 degrees; with `positive` set ("anterior" or
    "posterior") it is signed: positive when the second line turns that way from the first."""

    first: tuple
    second: tuple
    positive: str | None = None

    @property
    def landmarks(self) -> tuple:
        return _landmarks(*self.first, *self.second)

    @property
    def drawn(self) -> tuple:
        return (self.first, self.second)

    def value(self, points) -> float:
        u = _point(points, self.first[1]) - _point(points, self.first[0])
        v = _point(points, self.second[1]) - _point(points, self.second[0])
        angle = _unsigned(u, v)
        if self.positive is None:
            return angle
        return angle if _toward_anterior(u, v) == (self.positive == "anterior") else -angle


@dataclass(frozen=True)
class PointToLine:
    """The distance of `point` from the line through `line`'s two points, in mm: positive when the point lies
    in front of the line (toward the face), negative behind it. The line runs downwards (e.g. N to A)."""

    point: object
    line: tuple

    @property
    def landmarks(self) -> tuple:
        return _landmarks(self.point, *self.line)

    @property
    def drawn(self) -> tuple:
        return (self.line,)

    def value(self, points) -> float:
        start = _point(points, self.line[0])
        d, p = _point(points, self.line[1]) - start, _point(points, self.point) - start
        return -float(d[0] * p[1] - d[1] * p[0]) / float(np.linalg.norm(d))


@dataclass(frozen=True)
class ToPerpendicular:
    """The distance of `point` from the perpendicular to `reference` through `through`, in mm, positive along the
    reference's direction (McNamara's nasion perpendicular: the perpendicular to Po -> Or through N)."""

    point: object
    through: object
    reference: tuple

    @property
    def landmarks(self) -> tuple:
        return _landmarks(self.point, self.through, *self.reference)

    @property
    def drawn(self) -> tuple:
        return (self.reference, (self.through, self.point))

    def value(self, points) -> float:
        d = _point(points, self.reference[1]) - _point(points, self.reference[0])
        return float(np.dot(_point(points, self.point) - _point(points, self.through), d) / np.linalg.norm(d))


@dataclass(frozen=True)
class Distance:
    """The distance between two points, in mm."""

    a: object
    b: object

    @property
    def landmarks(self) -> tuple:
        return _landmarks(self.a, self.b)

    @property
    def drawn(self) -> tuple:
        return ((self.a, self.b),)

    def value(self, points) -> float:
        return float(np.linalg.norm(_point(points, self.a) - _point(points, self.b)))


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator, times `scale` (100 for a percentage)."""

    numerator: object
    denominator: object
    scale: float = 1.0

    @property
    def landmarks(self) -> tuple:
        return _landmarks(*self.numerator.landmarks, *self.denominator.landmarks)

    @property
    def drawn(self) -> tuple:
        return self.numerator.drawn + self.denominator.drawn

    def value(self, points) -> float:
        return self.scale * self.numerator.value(points) / self.denominator.value(points)


@dataclass(frozen=True)
class Sum:
    """The sum of several constructions' values (e.g. the three angles of Björk's polygon)."""

    parts: tuple

    @property
    def landmarks(self) -> tuple:
        return _landmarks(*(n for p in self.parts for n in p.landmarks))

    @property
    def drawn(self) -> tuple:
        return tuple(d for p in self.parts for d in p.drawn)

    def value(self, points) -> float:
        return float(sum(p.value(points) for p in self.parts))
