"""Slicer 5 markups files (`.mrk.json`): one fiducial control point per landmark, in LPS millimetres (image
landmarks through the image's pixel -> LPS matrix; volume landmarks are LPS already).

Label = landmark name, description = "confidence 0.934" (and "; check" for a point a person should look at),
missing landmarks with positionStatus "missing".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..case import Case, Landmarks, Volume
from ..errors import InputError
from .atomic import atomic_write_text

SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
          "Schema/markups-schema-v1.0.3.json#")



def markups_document(landmarks: Landmarks, case: Case | Volume) -> dict:
    lps = np.nan_to_num(landmarks.points) if landmarks.dim == 3 else case.to_lps(np.nan_to_num(landmarks.points))
    points = []
    for i, name in enumerate(landmarks.names):
        present = bool(landmarks.present[i])
        points.append({
            "id": str(i + 1), "label": name, "description": landmarks.description(i),
            "associatedNodeID": "", "position": [float(v) for v in lps[i]] if present else [0.0, 0.0, 0.0],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True,
            "positionStatus": "defined" if present else "missing",
        })
    return {"@schema": SCHEMA, "markups": [{
        "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": False,
        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d", "lastUsedControlPointNumber": len(points),
        "controlPoints": points, "measurements": [],
    }]}


def write_markups(path, landmarks: Landmarks, case: Case | Volume) -> Path:
    return atomic_write_text(path, json.dumps(markups_document(landmarks, case), indent=2))


def read_markups(path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(names, N x 3 LPS positions, confidence, present, check) of the first markup in a `.mrk.json` file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        markup = doc["markups"][0]
        points = markup.get("controlPoints", [])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{path}: not a Slicer markups file ({type(e).__name__}: {e})") from None
    flip = np.array([-1.0, -1.0, 1.0]) if markup.get("coordinateSystem", "LPS") == "RAS" else np.ones(3)
    names, positions, confidence, present, check = [], [], [], [], []
    for i, p in enumerate(points):
        names.append(p.get("label") or f"L{i}")
        status = p.get("positionStatus", "defined")
        position = p.get("position")
        ok = status == "defined" and position is not None and len(position) == 3
        positions.append(np.asarray(position, float) * flip if ok else np.full(3, np.nan))
        value, flagged = Landmarks.read_description(p.get("description", ""))
        confidence.append(float(ok) if value is None else value)
        present.append(ok)
        check.append(ok and flagged)
    return (names, np.array(positions).reshape(-1, 3), np.array(confidence), np.array(present, bool),
            np.array(check, bool))


def landmarks_from_markups(path, case: Case | Volume) -> Landmarks:
    """Landmarks of `case` from a `.mrk.json`: LPS mm for a volume; for an image its pixels, through the inverse
    of the image's pixel -> LPS."""
    names, lps, confidence, present, check = read_markups(path)
    if isinstance(case, Volume):
        return Landmarks(names, lps, confidence, present, check)
    m = case.pixel_to_lps
    # least squares through the in-plane columns of the matrix: exact for points on the image plane
    a = m[:3, :2]
    pixels = np.linalg.lstsq(a, (np.nan_to_num(lps) - m[:3, 3]).T, rcond=None)[0].T
    pixels[~present] = np.nan
    return Landmarks(names, pixels, confidence, present, check)
