"""Pixel <-> RAS for the 2D image the engine sees, and resampling a volume on a slice plane.

Pixel (x = column, y = row, row 0 at the top) maps to RAS through one 4 x 4 matrix whose columns are the
column step (mm per pixel), the row step, the unit plane normal and the RAS of pixel (0, 0). Every mapping in
the module goes through it, so oblique reformats and flipped volumes need no special cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SIDE = 2048  # pixels; a larger field of view is sampled more coarsely


@dataclass(frozen=True)
class PlaneGeometry:
    pixel_to_ras: np.ndarray  # 4 x 4
    thickness: float          # mm between neighbouring slices of the volume along the normal

    @property
    def spacing(self) -> tuple[float, float]:
        return (float(np.linalg.norm(self.pixel_to_ras[:3, 0])), float(np.linalg.norm(self.pixel_to_ras[:3, 1])))

    @property
    def pixel_to_lps(self) -> np.ndarray:
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.pixel_to_ras

    def to_ras(self, points) -> np.ndarray:
        """(N, 2) pixels -> (N, 3) RAS mm on the plane."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (np.column_stack([p, np.zeros(len(p)), np.ones(len(p))]) @ self.pixel_to_ras.T)[:, :3]

    def to_pixel(self, ras) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) RAS -> (N, 2) pixels of the point's projection on the plane, and its (N,) distance off it in mm."""
        r = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        q = np.column_stack([r, np.ones(len(r))]) @ np.linalg.inv(self.pixel_to_ras).T
        return q[:, :2], np.abs(q[:, 2])


def thickness_along(ijk_to_ras: np.ndarray, normal: np.ndarray) -> float:
    """Distance in mm between neighbouring voxel planes along `normal` (the spacing, for an axis-aligned normal)."""
    steps = np.linalg.solve(ijk_to_ras[:3, :3], normal)  # voxels per mm along the normal
    return float(1.0 / np.linalg.norm(steps))


def plane_matrix(origin, u, v, spacing: float) -> np.ndarray:
    """pixel -> RAS for a plane through `origin` (RAS of pixel 0, 0) with unit column / row directions u, v."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    n = np.cross(u, v)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = u * spacing, v * spacing, n / np.linalg.norm(n), origin
    return m


def slice_plane(slice_to_ras: np.ndarray, field_of_view, ijk_to_ras: np.ndarray, dims) -> tuple[np.ndarray, tuple]:
    """The pixel grid of a slice view cut to the volume's footprint: (pixel -> RAS, (width, height)).

    The view's x axis (SliceToRAS column 0) runs along image columns, its y axis (column 1, up on screen) against
    the rows, so the image appears as on screen with row 0 at the top. Pixels are the volume's finest spacing.
    """
    u, v, centre = slice_to_ras[:3, 0], slice_to_ras[:3, 1], slice_to_ras[:3, 3]
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    spacing = float(np.linalg.norm(ijk_to_ras[:3, :3], axis=0).min())
    # where the plane cuts the volume's box (voxel edges at -0.5 .. dims - 0.5), in plane coordinates a, b
    cut = _plane_box_cut(ijk_to_ras, dims, centre, np.cross(u, v))
    if len(cut) == 0:
        raise ValueError("the slice view does not cross the volume")
    a, b = (cut - centre) @ u, (cut - centre) @ v
    half_w, half_h = field_of_view[0] / 2, field_of_view[1] / 2
    a0, a1 = max(a.min(), -half_w), min(a.max(), half_w)
    b0, b1 = max(b.min(), -half_h), min(b.max(), half_h)
    if a1 - a0 < spacing or b1 - b0 < spacing:
        raise ValueError("the slice view does not cross the volume")
    spacing = max(spacing, max(a1 - a0, b1 - b0) / MAX_SIDE)
    width, height = int(np.ceil((a1 - a0) / spacing)), int(np.ceil((b1 - b0) / spacing))
    top_left = centre + (a0 + spacing / 2) * u + (b1 - spacing / 2) * v
    return plane_matrix(top_left, u, -v, spacing), (width, height)


def _plane_box_cut(ijk_to_ras: np.ndarray, dims, point, normal) -> np.ndarray:
    """RAS points where the plane (point, normal) crosses the edges of the volume's box."""
    lo, hi = np.full(3, -0.5), np.asarray(dims, float) - 0.5
    corners = np.array([[(lo, hi)[(c >> d) & 1][d] for d in range(3)] for c in range(8)])
    ras = corners @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    dist = (ras - point) @ normal
    points = []
    for c in range(8):
        for d in range(3):
            e = c | (1 << d)
            if e != c and (dist[c] <= 0 <= dist[e] or dist[e] <= 0 <= dist[c]) and dist[c] != dist[e]:
                t = dist[c] / (dist[c] - dist[e])
                points.append(ras[c] + t * (ras[e] - ras[c]))
    return np.array(points)


def resample(image_data, ijk_to_ras: np.ndarray, pixel_to_ras: np.ndarray, size, background: float) -> np.ndarray:
    """The volume's scalars at each pixel of the plane (linear interpolation), as an (H, W[, C]) array."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    image_to_ijk = np.eye(4)  # vtkImageData's own origin and spacing (Slicer keeps them at 0 and 1)
    image_to_ijk[:3, :3] = np.diag(image_data.GetSpacing())
    image_to_ijk[:3, 3] = image_data.GetOrigin()
    axes = image_to_ijk @ np.linalg.inv(ijk_to_ras) @ pixel_to_ras
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, axes[r, c])
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(image_data)
    reslice.SetResliceAxes(matrix)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputExtent(0, size[0] - 1, 0, size[1] - 1, 0, 0)
    reslice.SetInterpolationModeToLinear()
    reslice.SetBackgroundLevel(background)
    reslice.Update()
    out = reslice.GetOutput()
    scalars = vtk_to_numpy(out.GetPointData().GetScalars())
    comps = out.GetNumberOfScalarComponents()
    return scalars.reshape(size[1], size[0], comps) if comps > 1 else scalars.reshape(size[1], size[0])
