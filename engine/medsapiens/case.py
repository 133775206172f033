"""The data shape shared by every layer: one 2D image with its pixel spacing, and its landmarks.

Points are (x = column, y = row) in pixels, origin at the centre of the top-left pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class Landmarks:
    """Named points on one image; `present[i]` False means landmark i is missing (not annotated / not found)."""

    names: list[str]
    points: np.ndarray
    confidence: np.ndarray = None
    present: np.ndarray = None

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        n = len(self.names)
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        if len(self.points) != n:
            raise InputError(f"{n} landmark names but {len(self.points)} points")
        if len(set(self.names)) != n:
            raise InputError(f"duplicate landmark names in {self.names}")
        if self.present is None:
            self.present = np.isfinite(self.points).all(axis=1)
        self.present = np.asarray(self.present, dtype=bool).reshape(n)
        if self.confidence is None:
            self.confidence = self.present.astype(np.float64)
        self.confidence = np.clip(np.asarray(self.confidence, dtype=np.float64).reshape(n), 0.0, 1.0)
        if not np.isfinite(self.points[self.present]).all():
            raise InputError("a landmark marked present has a non-finite position")

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names: list[str]) -> "Landmarks":
        """The same landmarks in the order of `names`; names not held here come back missing."""
        index = {n: i for i, n in enumerate(self.names)}
        pts = np.full((len(names), 2), np.nan)
        conf = np.zeros(len(names))
        present = np.zeros(len(names), dtype=bool)
        for j, n in enumerate(names):
            if n in index:
                i = index[n]
                pts[j], conf[j], present[j] = self.points[i], self.confidence[i], self.present[i]
        return Landmarks(list(names), pts, conf, present)


@dataclass
class Case:
    """One 2D image (H x W grey or H x W x 3 RGB, any dtype), spacing (sx, sy) in mm per pixel, optional landmarks."""

    image: np.ndarray
    spacing: tuple[float, float] | float = 1.0
    landmarks: Landmarks | None = None
    name: str = field(default="")
    pixel_to_lps: np.ndarray | None = None  # 4 x 4: (x, y, 0, 1) -> LPS mm; default (x * sx, y * sy, 0)

    def __post_init__(self):
        image = np.asarray(self.image)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise InputError(f"{self.label}: image must be H x W or H x W x 3, got shape {image.shape}")
        if min(image.shape[:2]) < 2:
            raise InputError(f"{self.label}: image is too small ({image.shape[1]} x {image.shape[0]} px)")
        self.image = image
        spacing = np.broadcast_to(np.asarray(self.spacing, dtype=np.float64).ravel(), (2,))
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise InputError(f"{self.label}: pixel spacing must be finite and positive, got {tuple(spacing)}")
        self.spacing = (float(spacing[0]), float(spacing[1]))
        if self.pixel_to_lps is None:
            self.pixel_to_lps = np.diag([self.spacing[0], self.spacing[1], 1.0, 1.0])
        self.pixel_to_lps = np.asarray(self.pixel_to_lps, dtype=np.float64).reshape(4, 4)

    def to_lps(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) pixel points -> (N, 3) LPS millimetres through the image's own matrix."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        homogeneous = np.column_stack([points, np.zeros(len(points)), np.ones(len(points))])
        return (homogeneous @ self.pixel_to_lps.T)[:, :3]

    @property
    def label(self) -> str:
        return self.name or "image"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])
