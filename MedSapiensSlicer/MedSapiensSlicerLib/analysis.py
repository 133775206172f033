"""The cephalometric analysis of a markups node: rows for the panel's table, and their CSV export.

MRML only. The node's points are read back into the pixels of the image they were detected on, through the
plane that `MedSapiensLogic.writeLandmarks` records on the node (PLANE_ATTRIBUTE), so the engine's measures
(`api.analyze`) see the image as the detector did: the current positions count, so points the user moved are
measured where they are now.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import PlaneGeometry

PLANE_ATTRIBUTE = "MedSapiens.PixelToRAS"  # 16 numbers, row by row: the pixel -> RAS matrix of the analysed plane


@dataclass(frozen=True)
class AnalysisRow:
    """One measure of the panel's table."""

    measure: str
    description: str
    value: float            # NaN when not computed
    value_text: str         # rounded, with its unit ("0.71°"); empty when not computed
    unit: str               # "deg", "mm" or "" (a ratio)
    normal_range: str
    class_number: int | None
    class_name: str         # or why the measure was not computed
    landmarks: str          # the landmarks it reads, comma separated
    measurement: object     # the engine's Measurement it shows

    def cells(self) -> tuple[str, str, str, str]:
        """Measure, value, normal range, class: the text of the table's four columns."""
        verdict = self.class_name if self.class_number is None else f"{self.class_number}: {self.class_name}"
        return self.measure, self.value_text, self.normal_range, verdict


def planeAttribute(geometry: PlaneGeometry) -> str:
    return " ".join(f"{v:.17g}" for v in np.asarray(geometry.pixel_to_ras, dtype=float).ravel())


def nodePlane(markupsNode) -> PlaneGeometry | None:
    """The plane `writeLandmarks` recorded on the node, or None for a node it did not write."""
    text = markupsNode.GetAttribute(PLANE_ATTRIBUTE) if markupsNode else None
    try:
        matrix = np.array([float(v) for v in text.split()]).reshape(4, 4)
    except (AttributeError, ValueError):
        return None
    return PlaneGeometry(matrix, 0.0)


def analysisRows(markupsNode, geometry: PlaneGeometry | None = None, analysis: str | None = None
                 ) -> list[AnalysisRow] | None:
    """One analysis (a name of `api.analyses()`) of the node's points (labels = ISBI landmark names) on
    `geometry`'s plane (default: the one recorded on the node). None when the labels lack landmarks the ISBI 2015
    analysis reads, or no plane is known. A named analysis has no class: its reading stands in the last column.
    analysis None: api.DEFAULT_ANALYSIS.
    """
    from medsapiens import api

    found = nodeLandmarks(markupsNode, geometry)
    if found is None:
        return None
    rows = []
    for m in api.analyze(*found, analysis or api.DEFAULT_ANALYSIS):
        number = getattr(m, "class_number", None)
        rows.append(AnalysisRow(
            m.name, m.title, m.value, m.text(), m.measure.unit, m.normal_range, number,
            m.band.name if number is not None else m.reading, ", ".join(m.landmarks), m))
    return rows


def nodeLandmarks(markupsNode, geometry: PlaneGeometry | None = None):
    """(Landmarks in pixels of `geometry`'s plane, spacing) of the node's points as they are now, with the
    confidence and check their descriptions carry, or None (see analysisRows)."""
    from medsapiens import Landmarks, api

    geometry = geometry or nodePlane(markupsNode)
    if markupsNode is None or geometry is None:
        return None
    n = markupsNode.GetNumberOfControlPoints()
    names = [markupsNode.GetNthControlPointLabel(i).strip() for i in range(n)]
    if not api.can_analyze(names) or len(set(names)) != n:
        return None
    ras, defined, confidence, check = np.zeros((n, 3)), np.zeros(n, bool), np.zeros(n), np.zeros(n, bool)
    for i in range(n):
        markupsNode.GetNthControlPointPositionWorld(i, ras[i])
        defined[i] = markupsNode.GetNthControlPointPositionStatus(i) == markupsNode.PositionDefined
        value, check[i] = Landmarks.read_description(markupsNode.GetNthControlPointDescription(i))
        confidence[i] = float(defined[i]) if value is None else value
    pixels, _ = geometry.to_pixel(ras)
    pixels[~defined] = np.nan
    return Landmarks(names, pixels, confidence, defined, check), geometry.spacing


def writeAnalysisCSV(rows: list[AnalysisRow], markupsName: str, path):
    """Write the table to `path` atomically (a reader sees the old file or the whole new one); returns the path."""
    from medsapiens import api

    return api.write_measurements(path, markupsName, [r.measurement for r in rows])
