"""Cephalometric analysis of the ISBI 2015 challenge: eight measurements and their classes from the 19 landmarks.

Definitions, normal ranges and class numbers are those of Table 2 in
    C.-W. Wang et al., "A benchmark for comparison of dental radiography analysis algorithms",
    Medical Image Analysis 31 (2016) 63-76, doi:10.1016/j.media.2016.02.004,
with the paper's landmark numbers L1..L19 = S, N, Or, Po, A, B, Pog, Me, Gn, Go, LIT, UIT, UL, LL, Sn, Pog', PNS,
ANS, Ar. Where the table leaves a construction open, this module follows the challenge's classification program
(as re-published with the data set) and says so:
- ANB is SNA - SNB (signed), not the unsigned angle A-N-B, so a mandible ahead of the maxilla reads negative.
- ODI and APDI add line-to-line angles. The angle between the AB plane (B -> A) and the mandibular plane
  (Me -> Go), and between the Frankfort plane (Or -> Po) and the facial plane (N -> Pog), are unsigned (0-180
  degrees). The palatal-plane angle (Po -> Or against PNS -> ANS) is positive when ANS lies below the Frankfort
  direction (palatal plane tipped down anteriorly), and the AB-facial angle is positive when B lies ahead of the
  facial-plane direction from A (Kim's conventions, negative otherwise).
- FHA is, as the table defines it, the angle between S -> N and Go -> Gn (the SN-mandibular plane angle), not
  the Frankfort-mandibular angle its other name FMA suggests.
- MW is the distance UIT-LIT in mm, positive when UIT lies ahead of LIT along the image's horizontal. The table
  names 0 mm "edge to edge" (class 2) and < 0 mm "anterior cross bite" (class 3) but assigns no class to
  0 < MW < 2 mm; here that gap joins class 2 (a reduced overjet is not a cross bite). The challenge's program
  puts it in class 3.
- "Ahead" and "below" are read in the ISBI orientation: face to the right, rows downwards. An image facing left
  (N left of S) is mirrored first, so the signed angles and MW keep their anatomical meaning; without S or N
  the image is taken to face right.
Points are converted to millimetres with the pixel spacing before any angle or distance is taken.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..case import Landmarks

ISBI_19 = ("S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "UL", "LL", "Sn", "Pog'", "PNS",
           "ANS", "Ar")
REFERENCE = ("Wang et al., A benchmark for comparison of dental radiography analysis algorithms, "
             "Medical Image Analysis 31 (2016), Table 2")


@dataclass(frozen=True)
class Band:
    """One class of a measure: the values above the previous band's limit and below `limit` (or equal, if
    `inclusive`)."""

    number: int
    name: str
    limit: float = math.inf
    inclusive: bool = False


@dataclass(frozen=True)
class Measure:
    name: str
    title: str
    unit: str               # "deg", "mm" or "" (a ratio)
    landmarks: tuple        # the landmarks the measure reads
    compute: Callable       # dict name -> (2,) mm point in the ISBI orientation -> value
    bands: tuple            # Band, in increasing order of value
    drawn: tuple = ()       # what a tracing draws: 2 names for a line, 3 for an angle (constructions.py)

    def classify(self, value: float) -> Band:
        for band in self.bands:
            if value < band.limit or (band.inclusive and value == band.limit):
                return band
        return self.bands[-1]

    @property
    def symbol(self) -> str:
        """The unit as written after a number: '°', ' mm', or nothing for a ratio."""
        return {"deg": "°", "mm": " mm", "": ""}[self.unit]

    def band_range(self, band: Band) -> str:
        """'3.2-5.7°', '< 3.2°', '> 5.7°' for one band (the normal range for band 1)."""
        i = self.bands.index(band)
        unit = self.symbol
        if i == 0:
            return f"{'<=' if band.inclusive else '<'} {band.limit:g}{unit}"
        previous = self.bands[i - 1]
        low = f"{previous.limit:g}"
        if math.isinf(band.limit):
            return f"{'>' if previous.inclusive else '>='} {low}{unit}"
        return f"{low}-{band.limit:g}{unit}"


# ------------------------------------------------------------------------------------------- geometry (mm)
def _angle(u, v) -> float:
    """Unsigned angle in degrees between two direction vectors."""
    cos = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def _cross(u, v) -> float:
    """z of u x v; positive when v turns clockwise from u on screen (rows downwards)."""
    return float(u[0] * v[1] - u[1] * v[0])


def _sna(p) -> float:
    return _angle(p["S"] - p["N"], p["A"] - p["N"])


def _snb(p) -> float:
    return _angle(p["S"] - p["N"], p["B"] - p["N"])


def _palatal_to_frankfort(p) -> float:
    """Po -> Or against PNS -> ANS, positive when the palatal plane tips down anteriorly."""
    fh, pp = p["Or"] - p["Po"], p["ANS"] - p["PNS"]
    angle = _angle(fh, pp)
    return angle if _cross(fh, pp) >= 0 else -angle


def _odi(p) -> float:
    """Overbite depth indicator: AB plane to mandibular plane, plus the palatal plane to the Frankfort plane."""
    return _angle(p["Go"] - p["Me"], p["A"] - p["B"]) + _palatal_to_frankfort(p)


def _apdi(p) -> float:
    """Anteroposterior dysplasia indicator: facial angle, AB plane to facial plane, palatal plane to Frankfort."""
    facial, ab = p["Pog"] - p["N"], p["B"] - p["A"]
    ab_facial = _angle(facial, ab)
    if _cross(facial, ab) > 0:  # B behind the facial-plane direction from A
        ab_facial = -ab_facial
    return _angle(p["Po"] - p["Or"], facial) + ab_facial + _palatal_to_frankfort(p)


def _fhi(p) -> float:
    """Facial height index: posterior face height S-Go over anterior face height N-Me."""
    return float(np.linalg.norm(p["Go"] - p["S"]) / np.linalg.norm(p["Me"] - p["N"]))


def _fha(p) -> float:
    return _angle(p["N"] - p["S"], p["Gn"] - p["Go"])


def _mw(p) -> float:
    """Modified Wits: |UIT - LIT| in mm, negative when the upper incisor tip is not ahead of the lower one."""
    d = p["UIT"] - p["LIT"]
    distance = float(np.linalg.norm(d))
    return distance if d[0] > 0 else -distance


MEASURES = (
    Measure("ANB", "ANB angle (SNA - SNB)", "deg", ("S", "N", "A", "B"), lambda p: _sna(p) - _snb(p),
            (Band(3, "Class III", 3.2), Band(1, "Class I (normal)", 5.7, True), Band(2, "Class II")),
            (("S", "N", "A"), ("S", "N", "B"))),
    Measure("SNB", "SNB angle", "deg", ("S", "N", "B"), _snb,
            (Band(2, "retrognathic mandible", 74.6), Band(1, "normal mandible", 78.7, True),
             Band(3, "prognathic mandible")), (("S", "N", "B"),)),
    Measure("SNA", "SNA angle", "deg", ("S", "N", "A"), _sna,
            (Band(3, "retrognathic maxilla", 79.4), Band(1, "normal maxilla", 83.2, True),
             Band(2, "prognathic maxilla")), (("S", "N", "A"),)),
    Measure("ODI", "overbite depth indicator", "deg", ("A", "B", "Me", "Go", "Or", "Po", "PNS", "ANS"), _odi,
            (Band(3, "open bite tendency", 68.4), Band(1, "normal", 80.5, True), Band(2, "deep bite tendency")),
            (("A", "B"), ("Go", "Me"), ("Po", "Or"), ("PNS", "ANS"))),
    Measure("APDI", "anteroposterior dysplasia indicator", "deg",
            ("Or", "Po", "N", "Pog", "A", "B", "PNS", "ANS"), _apdi,
            (Band(2, "Class II tendency", 77.6), Band(1, "normal", 85.2, True), Band(3, "Class III tendency")),
            (("Po", "Or"), ("N", "Pog"), ("A", "B"), ("PNS", "ANS"))),
    Measure("FHI", "facial height index (S-Go / N-Me)", "", ("S", "Go", "N", "Me"), _fhi,
            (Band(3, "long face tendency", 0.65), Band(1, "normal", 0.75, True), Band(2, "short face tendency")),
            (("S", "Go"), ("N", "Me"))),
    Measure("FHA", "SN to mandibular plane (Go-Gn) angle", "deg", ("S", "N", "Go", "Gn"), _fha,
            (Band(3, "mandible low angle tendency", 26.8), Band(1, "normal", 31.4, True),
             Band(2, "mandible high angle tendency")), (("S", "N"), ("Go", "Gn"))),
    Measure("MW", "modified Wits appraisal (UIT - LIT)", "mm", ("UIT", "LIT"), _mw,
            (Band(3, "anterior cross bite", 0.0), Band(2, "edge to edge", 2.0), Band(1, "normal", 4.5, True),
             Band(4, "large overjet")), (("UIT", "LIT"),)),
)
MEASURE_NAMES = tuple(m.name for m in MEASURES)
USED_LANDMARKS = tuple(n for n in ISBI_19 if any(n in m.landmarks for m in MEASURES))
CSV_COLUMNS = ("image",) + tuple(c for m in MEASURE_NAMES for c in (m, f"{m}_class"))


@dataclass(frozen=True)
class Measurement:
    """One measure on one image; value NaN and band None when some of its landmarks are missing."""

    measure: Measure
    value: float
    band: Band | None
    missing: tuple  # landmark names the measure needed but the image lacks

    @property
    def name(self) -> str:
        return self.measure.name

    @property
    def class_number(self) -> int | None:
        return self.band.number if self.band else None

    @property
    def normal_range(self) -> str:
        return self.measure.band_range(next(b for b in self.measure.bands if b.number == 1))

    def formatted_value(self, digits: int = 2) -> str:
        """The value rounded for reading (a ratio gets one digit more); empty when not computed."""
        if self.band is None:
            return ""
        return f"{self.value:.{digits + (self.measure.unit == '')}f}"

    def text(self) -> str:
        """The value with its unit as a report shows it ('0.71°', '2.95 mm', '0.552'); empty when not computed."""
        return self.formatted_value() + self.measure.symbol if self.band else ""

    @property
    def title(self) -> str:
        return self.measure.title

    @property
    def landmarks(self) -> tuple:
        return self.measure.landmarks

    @property
    def drawn(self) -> tuple:
        return self.measure.drawn

    @property
    def reading(self) -> str:
        """'1: Class I (normal)', or why it was not computed (the same words as the named analyses')."""
        if self.band is None:
            return f"not computed (missing {', '.join(self.missing)})"
        return f"{self.band.number}: {self.band.name}"


def covers(names) -> bool:
    """Whether a landmark set holds every landmark the analysis reads (the ISBI 19 do)."""
    return set(USED_LANDMARKS) <= set(names)


def mm_points(landmarks: Landmarks, spacing) -> dict:
    """name -> (2,) point in mm of the present landmarks, in the ISBI orientation (an image facing left, N left of
    S, is mirrored)."""
    sx, sy = np.broadcast_to(np.asarray(spacing, dtype=np.float64).ravel(), (2,))
    points = {n: landmarks.points[i] * (sx, sy) for i, n in enumerate(landmarks.names) if landmarks.present[i]}
    if "S" in points and "N" in points and points["N"][0] < points["S"][0]:
        points = {n: p * (-1.0, 1.0) for n, p in points.items()}
    return points


def analyze(landmarks: Landmarks, spacing) -> list[Measurement]:
    """The eight measurements of one image: `landmarks` in pixels, `spacing` (sx, sy) or one value in mm/pixel.

    A measure whose landmarks are absent from the set or missing on this image is left empty (NaN, no class);
    its `missing` names them. The others are computed.
    """
    points = mm_points(landmarks, spacing)
    results = []
    for m in MEASURES:
        missing = tuple(n for n in m.landmarks if n not in points)
        if missing:
            results.append(Measurement(m, math.nan, None, missing))
            continue
        value = float(m.compute(points))
        results.append(Measurement(m, value, m.classify(value), ()))
    return results


# --------------------------------------------------------------------------------------------- outputs
MEASUREMENT_COLUMNS = ("markups", "measure", "description", "value", "unit", "normal_range", "class", "class_name",
                       "landmarks")


def measurements_csv(label: str, measurements: list) -> str:
    """One row per measurement of one image (the Slicer panel's export), of this analysis or a named one
    (results.py): value, unit, normal range, class (none for a named analysis) and class name or reading, the
    landmarks it reads; empty value and class, and why, where it was not computed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MEASUREMENT_COLUMNS)
    for m in measurements:
        number = getattr(m, "class_number", None)
        writer.writerow([label, m.name, m.title, "" if m.missing else f"{m.value:.6g}", m.measure.unit,
                         m.normal_range, "" if number is None else number, m.band.name if number else m.reading,
                         ", ".join(m.landmarks)])
    return out.getvalue()


def class_legend() -> str:
    """Every measure's landmarks, class numbers, class names and ranges (what the CSV's *_class columns mean)."""
    lines = [f"Classes as in {REFERENCE}:"]
    for m in MEASURES:
        bands = "; ".join(f"{b.number} {b.name} ({m.band_range(b)})" for b in sorted(m.bands, key=lambda b: b.number))
        lines.append(f"  {m.name:<5} {m.title} [{', '.join(m.landmarks)}]: {bands}")
    return "\n".join(lines)


def format_report(image: str, measurements: list[Measurement]) -> str:
    """A readable block for one image: value, normal range, class number and name per measure."""
    lines = [f"{image}:"]
    for r in measurements:
        if r.band is None:
            lines.append(f"  {r.name:<5} {'-':>9}   normal {r.normal_range:<13} not computed (missing "
                         f"{', '.join(r.missing)})")
        else:
            lines.append(f"  {r.name:<5} {r.text():>9}   normal {r.normal_range:<13} class {r.band.number}: "
                         f"{r.band.name}")
    return "\n".join(lines)
