"""Any analysis on one image's landmarks, and the tables of several: the ISBI 2015 challenge's (cephalometry.py,
with its classes) or a named one (analyses.py, with norms and readings).

Every measurement, of either kind, has name, title, value (NaN when not computed), missing, landmarks, drawn,
text(), normal_range and reading, so the CSV, the reports, the Slicer table and the tracing treat them alike.
CSV columns: the ISBI 2015 analysis keeps its own (`ANB,ANB_class,...`); a named analysis adds one column per
measure, `<analysis>.<measure>` (e.g. `steiner.SNA`), the value with 3 decimals, empty where not computed.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from ..case import Landmarks
from ..errors import InputError
from . import cephalometry
from .analyses import NAMED, Measure

ISBI = "isbi2015"
ALL = (ISBI, *NAMED)


def choices() -> dict:
    """What --analysis and the panel offer: name -> title."""
    return {ISBI: "ISBI 2015 challenge classes", **{a.name: a.title for a in NAMED.values()}}


def parse(spec) -> tuple:
    """The analyses a comma-separated text (or a sequence of names) asks for; "all" is every one."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if "all" in names:
        return ALL
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
        raise InputError(f"--analysis {','.join(names)}: unknown analysis {', '.join(unknown) or '(none)'}; choose "
                         f"from {', '.join(ALL)} or all")
    return tuple(dict.fromkeys(names))


def measures(analysis: str) -> tuple:
    """The measures of one analysis (each with name and landmarks)."""
    return cephalometry.MEASURES if analysis == ISBI else NAMED[analysis].measures


def tracing(analysis: str) -> tuple:
    """What a tracing of the analysis draws: every measure's lines and angles, each once."""
    return tuple(dict.fromkeys(d for m in measures(analysis) for d in m.drawn))


def label(analysis: str, name: str) -> str:
    """How a table and a warning name a measure: 'FHA' for ISBI 2015, 'steiner.SNA' for the others."""
    return name if analysis == ISBI else f"{analysis}.{name}"


@dataclass(frozen=True)
class Result:
    """One measure of a named analysis on one image."""

    measure: Measure
    value: float   # NaN when not computed
    missing: tuple  # landmark names it needed but the image lacks

    @property
    def name(self) -> str:
        return self.measure.name

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
    def normal_range(self) -> str:
        """The norm, '82 ± 2°'; empty where none is published."""
        return self.measure.norm_text

    def text(self) -> str:
        """'81.23°', '2.95 mm', '64.1%'; empty when not computed."""
        return "" if self.missing else f"{self.value:.{1 if self.measure.unit == '%' else 2}f}{self.measure.symbol}"

    @property
    def reading(self) -> str:
        if self.missing:
            return f"not computed (missing {', '.join(self.missing)})"
        return self.measure.reading(self.value)


def analyze(landmarks: Landmarks, spacing, analysis: str = ISBI) -> list:
    """The measurements of one analysis on one image: `landmarks` in pixels, spacing (sx, sy) or one value in
    mm/pixel. A measure lacking a landmark is left empty, its `missing` naming it."""
    if analysis == ISBI:
        return cephalometry.analyze(landmarks, spacing)
    points = cephalometry.mm_points(landmarks, spacing)
    out = []
    for m in NAMED[analysis].measures:
        missing = tuple(n for n in m.landmarks if n not in points)
        out.append(Result(m, math.nan if missing else float(m.construction.value(points)), missing))
    return out


def columns(analyses) -> tuple:
    """The CSV header for these analyses."""
    named = tuple(label(a, m.name) for a in analyses if a != ISBI for m in measures(a))
    return ("image",) + (cephalometry.CSV_COLUMNS[1:] if ISBI in analyses else ()) + named


def results_csv(rows, analyses) -> str:
    """The CSV text of (image, {analysis: measurements}) rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(analyses))
    for image, by_analysis in rows:
        cells = [image]
        for a in analyses:
            for r in by_analysis[a]:
                if a == ISBI:
                    cells += [r.formatted_value(digits=3), "" if r.band is None else str(r.band.number)]
                else:
                    cells.append("" if r.missing else f"{r.value:.3f}")
        writer.writerow(cells)
    return out.getvalue()


def format_results(image: str, analysis: str, results: list) -> str:
    """A readable block for one named analysis of one image: value, norm and reading per measure."""
    lines = [f"{image}: {NAMED[analysis].title}"]
    for r in results:
        norm = f"norm {r.normal_range}" if r.normal_range else "no norm"
        lines.append(f"  {r.name:<12} {r.text() or '-':>10}   {norm:<18} {r.reading}")
    return "\n".join(lines)


def image_gaps(image: str, by_analysis: dict, names) -> list[str]:
    """One warning line per landmark an image lacks (though its set has it): the measures it leaves empty."""
    empty: dict = {}
    for a, results in by_analysis.items():
        for r in results:
            lacking = tuple(n for n in r.missing if n in names)
            if lacking:
                empty.setdefault(lacking, []).append(label(a, r.name))
    return [f"{image}: {', '.join(ms)} not computed (missing {', '.join(gap)})" for gap, ms in empty.items()]
