"""The data shapes shared by every layer: one 2D image with its pixel spacing, or one 3D volume with its
index -> LPS geometry, and their landmarks.

On a 2D `Case` points are (x = column, y = row) in pixels, origin at the centre of the top-left pixel. On a
`Volume` points are LPS millimetres (the physical space in which ITK reads the file), so that they do not
depend on how the voxels happen to be laid out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, short_list
from .settings import MIN_IMAGE_SIDE, REVIEW_BELOW

_CONFIDENCE = re.compile(r"confidence\s+([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)")
_CHECK = re.compile(r";\s*check\b")
_CORRECTED = re.compile(r"(?:^|;)\s*corrected\b")


@dataclass
class Landmarks:
    """Named points on one image (N x 2 pixels) or volume (N x 3 LPS mm); `present[i]` False means landmark i is
    missing (not annotated / not found); `check[i]` True means a person should look at point i (by default: a
    present point less confident than REVIEW_BELOW; a detector with a review rule of its own sets it)."""

    names: list[str]
    points: np.ndarray
    confidence: np.ndarray = None
    present: np.ndarray = None
    check: np.ndarray = None

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        n = len(self.names)
        points = np.asarray(self.points, dtype=np.float64)
        dim = points.shape[-1] if points.ndim == 2 and points.shape[-1] in (2, 3) else 2
        self.points = points.reshape(-1, dim)
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
        if self.check is None:
            self.check = self.present & (self.confidence < REVIEW_BELOW)
        self.check = np.asarray(self.check, dtype=bool).reshape(n) & self.present

    def description(self, i: int) -> str:
        """Point i's description as markups files and Slicer show it: "confidence 0.934", "confidence 0.410; check"."""
        return f"confidence {self.confidence[i]:.3f}" + ("; check" if self.check[i] else "")

    @staticmethod
    def read_description(text: str) -> tuple[float | None, bool]:
        """(confidence or None, check) from a point's description as `description` writes it."""
        found = _CONFIDENCE.search(text or "")
        return (float(found.group(1)) if found else None), _CHECK.search(text or "") is not None

    @staticmethod
    def is_corrected(text: str) -> bool:
        """Whether a point's description says a person moved it (see corrected_description)."""
        return _CORRECTED.search(text or "") is not None

    @staticmethod
    def corrected_description(text: str) -> str:
        """The description of a point a person moved after detection: "confidence 0.410; corrected" (its
        confidence kept as it was detected, no longer "check")."""
        if Landmarks.is_corrected(text):
            return text
        kept = _CHECK.sub("", text or "").strip()
        return f"{kept}; corrected" if kept else "corrected"

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        """2 for image points (pixels), 3 for volume points (LPS mm)."""
        return self.points.shape[1]

    def subset(self, names: list[str]) -> "Landmarks":
        """The same landmarks in the order of `names`; names not held here come back missing."""
        index = {n: i for i, n in enumerate(self.names)}
        pts = np.full((len(names), self.dim), np.nan)
        conf = np.zeros(len(names))
        present, check = np.zeros(len(names), dtype=bool), np.zeros(len(names), dtype=bool)
        for j, n in enumerate(names):
            if n in index:
                i = index[n]
                pts[j], conf[j], present[j], check[j] = self.points[i], self.confidence[i], self.present[i], \
                    self.check[i]
        return Landmarks(list(names), pts, conf, present, check)


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


@dataclass
class Volume:
    """One 3D scalar volume: `voxels` (z, y, x) as numpy reads ITK images; `index_to_lps` (4 x 4) takes a voxel
    index (i, j, k) = (x, y, z) to LPS mm through the file's origin, spacing and direction; landmarks in LPS mm."""

    voxels: np.ndarray
    index_to_lps: np.ndarray
    landmarks: Landmarks | None = None
    name: str = field(default="")

    def __post_init__(self):
        voxels = np.asarray(self.voxels)
        if voxels.ndim != 3:
            raise InputError(f"{self.label}: a volume must be a 3D scalar array, got shape {voxels.shape}")
        if min(voxels.shape) < 2:
            raise InputError(f"{self.label}: volume is too small ({' x '.join(map(str, voxels.shape[::-1]))} voxels)")
        if voxels.dtype.kind not in "biuf":
            raise InputError(f"{self.label}: unsupported voxel type {voxels.dtype}")
        self.voxels = voxels
        m = np.asarray(self.index_to_lps, dtype=np.float64).reshape(4, 4)
        if not (np.isfinite(m).all() and abs(np.linalg.det(m[:3, :3])) > 1e-12):
            raise InputError(f"{self.label}: the volume's spacing or direction is degenerate or not finite")
        self.index_to_lps = m
        if self.landmarks is not None and self.landmarks.dim != 3:
            raise InputError(f"{self.label}: a volume's landmarks need 3 coordinates (LPS mm)")

    @property
    def label(self) -> str:
        return self.name or "volume"

    @property
    def spacing(self) -> np.ndarray:
        """(sx, sy, sz) mm: the lengths of the index axes in LPS."""
        return np.linalg.norm(self.index_to_lps[:3, :3], axis=0)

    @property
    def size(self) -> tuple[int, int, int]:
        """(x, y, z) voxels."""
        return tuple(int(v) for v in self.voxels.shape[::-1])

    def to_lps(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (x, y, z) -> (N, 3) LPS mm."""
        index = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        return index @ self.index_to_lps[:3, :3].T + self.index_to_lps[:3, 3]

    def to_index(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous voxel indices (x, y, z)."""
        lps = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
        return np.linalg.solve(self.index_to_lps[:3, :3], (lps - self.index_to_lps[:3, 3]).T).T

    def contains(self, lps: np.ndarray) -> np.ndarray:
        """(N,) whether each LPS point lies in the volume (up to half a voxel beyond the outer voxel centres)."""
        index = self.to_index(lps)
        with np.errstate(invalid="ignore"):
            return ((index >= -0.5) & (index <= np.array(self.size) - 0.5)).all(axis=1)


def require_detectable(case: Case) -> None:
    """Refuse an image too thin to find landmarks on (a strip of 40000 x 10 px, say), in one line."""
    w, h = case.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise InputError(f"{case.label}: the image is {w} x {h} px; finding landmarks needs at least "
                         f"{MIN_IMAGE_SIDE} px along each side")


def shared_landmarks(cases: list, same_set: bool = False, what: str = "case") -> list[str]:
    """The landmark names of annotated cases, in first-seen order: their union, or (same_set) the first case's
    names, which every other case must hold too (in any order; one line naming the case that does not)."""
    names = list(cases[0].landmarks.names)
    if not same_set:
        return list(dict.fromkeys(n for c in cases for n in c.landmarks.names))
    for c in cases[1:]:
        if set(c.landmarks.names) != set(names):
            raise InputError(f"{c.label}: {len(c.landmarks)} landmarks ({short_list(c.landmarks.names)}), but "
                             f"{cases[0].label} has {len(names)} ({short_list(names)}); every {what} needs the same "
                             "landmark names")
    return names
