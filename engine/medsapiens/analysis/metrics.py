"""Accuracy as the field reports it: radial error in mm, MRE, and SDR (share of errors below a radius)."""
from __future__ import annotations

import numpy as np

from ..case import Landmarks
from ..settings import CEPH_RADII


def radial_errors(predicted: Landmarks, truth: Landmarks, spacing=1.0) -> np.ndarray:
    """(K,) errors in mm for truth's landmarks; NaN where truth is missing, inf where the prediction is.
    Image points are pixels (times `spacing`); volume points are LPS mm already."""
    pred = predicted.subset(truth.names)
    scale = 1.0 if truth.dim == 3 else np.asarray(spacing, float).reshape(-1)[:2]
    delta = (pred.points - truth.points) * scale
    errors = np.linalg.norm(delta, axis=1)
    errors[~pred.present] = np.inf  # a landmark the detector failed to give counts as a miss
    errors[~truth.present] = np.nan
    return errors


def summary(errors: np.ndarray, radii=CEPH_RADII) -> dict:
    """MRE (over found landmarks) and SDR per radius (over all annotated ones) of an (images, K) error table."""
    scored = errors[np.isfinite(errors) | np.isinf(errors)]
    found = scored[np.isfinite(scored)]
    return {"mre_mm": float(found.mean()) if found.size else float("nan"),
            "sdr": {float(r): float(np.mean(scored < r)) for r in radii},
            "scored": int(scored.size), "not_found": int(np.isinf(scored).sum())}


def format_sdr(sdr: dict) -> str:
    """'2 mm 30.5%, 2.5 mm 43.9%, ...' from {radius: share} (radii as numbers or, read from JSON, strings)."""
    return ", ".join(f"{float(r):g} mm {100 * v:.1f}%" for r, v in sdr.items())


def format_summary(s: dict) -> str:
    return f"MRE {s['mre_mm']:.2f} mm; SDR {format_sdr(s['sdr'])} ({s['scored']} landmarks, {s['not_found']} not found)"
