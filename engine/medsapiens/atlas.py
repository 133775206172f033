"""Weight-free detection from 1..N annotated cases (atlases) by image registration with SimpleITK.

Each atlas is registered to the new image (atlas = fixed, new image = moving, so the transform carries atlas
points straight onto the new image), with Mattes mutual information taken over the atlas's landmark region
only (labels, rulers and collimator edges mislead it): similarity from the image centres (intensity moments
are pulled away by bright collimator fields), then affine, then a coarse B-spline, each multi-resolution.
Each mapped point is refined coarse-to-fine by normalised cross-correlation of the atlas patch around it.
Across atlases, votes far from the median (a failed registration) are dropped and the rest averaged;
confidence falls with their spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.lib.stride_tricks import sliding_window_view

from .case import Case, Landmarks
from .errors import InputError, short_list
from .intensity import to_rgb255


MIN_NCC_GAIN = 0.02


@dataclass(frozen=True)
class AtlasSettings:
    global_side: int = 256  # working size (longest side, px) of the similarity / affine stages
    local_side: int = 512  # working size of the B-spline stage
    bspline_mesh: int = 4  # B-spline control-point mesh per side
    levels: tuple = ((4.0, 16, 8), (2.0, 16, 6), (1.0, 14, 4))  # refinement: (px step, patch, search radius)
    mask_margin: float = 0.15  # metric region: landmark box grown by this share of its size
    spread_mm: float = 2.0  # atlas disagreement at which confidence drops to 0.61 (one sigma)
    seed: int = 7


def _working_image(full: sitk.Image, side: int) -> sitk.Image:
    """The full-resolution image resampled to `side` px; its physical space stays the original pixels."""
    image = full
    w, h = full.GetSize()
    f = max(w, h) / side
    if f > 1:
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 * f)
        size = [max(int(round(w / f)), 8), max(int(round(h / f)), 8)]
        spacing = [w / size[0], h / size[1]]
        origin = [(s - 1) / 2 for s in spacing]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, [1, 0, 0, 1], 0.0,
                              sitk.sitkFloat32)
    return image


@dataclass
class _Prepared:
    coarse: sitk.Image  # global stages
    fine: sitk.Image  # B-spline stage
    levels: dict  # px step -> full-resolution image smoothed for that step (refinement)
    coarse_mask: sitk.Image | None = None  # atlases: where the metric looks (around the landmarks)
    fine_mask: sitk.Image | None = None


def _prepare(case: Case, s: "AtlasSettings") -> _Prepared:
    full = sitk.GetImageFromArray((to_rgb255(case.image).mean(axis=2) / 255.0).astype(np.float32))  # grey 0..1
    levels = {step: sitk.SmoothingRecursiveGaussian(full, 0.5 * step) if step > 1 else full
              for step, _, _ in s.levels}
    prepared = _Prepared(_working_image(full, s.global_side), _working_image(full, s.local_side), levels)
    if case.landmarks is not None:
        prepared.coarse_mask = _landmark_mask(prepared.coarse, case.landmarks, s.mask_margin)
        prepared.fine_mask = _landmark_mask(prepared.fine, case.landmarks, s.mask_margin)
    return prepared


def _landmark_mask(image: sitk.Image, landmarks: Landmarks, margin: float) -> sitk.Image:
    """The landmarks' bounding box grown by `margin` of its size: the anatomy, not labels, rulers or collimators."""
    pts = landmarks.points[landmarks.present]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pad = margin * (hi - lo)
    lo, hi = lo - pad, hi + pad
    size = image.GetSize()
    idx_lo = np.clip(np.floor((lo - image.GetOrigin()) / image.GetSpacing()), 0, np.array(size) - 1).astype(int)
    idx_hi = np.clip(np.ceil((hi - image.GetOrigin()) / image.GetSpacing()), 0, np.array(size) - 1).astype(int)
    mask = np.zeros(size[::-1], np.uint8)
    mask[idx_lo[1]: idx_hi[1] + 1, idx_lo[0]: idx_hi[0] + 1] = 1
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    return out


def _registration(shrink, smooth, seed, mask=None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smooth)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def register(atlas_p: _Prepared, target_p: _Prepared, s: AtlasSettings) -> sitk.Transform:
    """Transform taking atlas pixel coordinates to the target's (fixed = atlas, moving = target); the metric
    is taken over the atlas's landmark region only."""
    atlas, target = atlas_p.coarse, target_p.coarse
    init = sitk.CenteredTransformInitializer(atlas, target, sitk.Similarity2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = _registration([4, 2, 1], [2, 1, 0], s.seed, atlas_p.coarse_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    similarity = sitk.Similarity2DTransform(reg.Execute(atlas, target).GetNthTransform(0))

    affine = sitk.AffineTransform(2)
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    reg = _registration([2, 1], [1, 0], s.seed, atlas_p.coarse_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-4, 100, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(atlas, target)

    bspline = sitk.BSplineTransformInitializer(atlas_p.fine, [s.bspline_mesh] * 2, 3)
    reg = _registration([4, 2], [2, 1], s.seed, atlas_p.fine_mask)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=200)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(atlas_p.fine, target_p.fine)
    return sitk.CompositeTransform([affine, bspline])


def _match(point_atlas, transform, atlas_full, target_full, spacing, r, q):
    """Shift (atlas px) of the best NCC match of the atlas patch (radius r, search q, in working px of size
    `spacing`) within the target resampled into atlas space; zero unless clearly better than no shift."""
    p = np.asarray(point_atlas, float)
    grid = [2 * (r + q) + 1] * 2
    origin = (p - (r + q) * spacing).tolist()
    patch_origin = (p - r * spacing).tolist()
    identity = sitk.Transform()
    template = sitk.GetArrayFromImage(sitk.Resample(atlas_full, [2 * r + 1] * 2, identity, sitk.sitkLinear,
                                                    patch_origin, [spacing] * 2, [1, 0, 0, 1], 0.0,
                                                    sitk.sitkFloat32))
    if template.std() < 1e-3:  # a flat patch (background) holds nothing to match
        return np.zeros(2)
    region = sitk.GetArrayFromImage(sitk.Resample(target_full, grid, transform, sitk.sitkLinear, origin,
                                                  [spacing] * 2, [1, 0, 0, 1], 0.0, sitk.sitkFloat32))
    windows = sliding_window_view(region, template.shape)
    t = template - template.mean()
    w = windows - windows.mean(axis=(2, 3), keepdims=True)
    ncc = (w * t).sum(axis=(2, 3)) / (np.sqrt((w ** 2).sum(axis=(2, 3)) * (t ** 2).sum()) + 1e-9)
    dy, dx = np.unravel_index(np.argmax(ncc), ncc.shape)
    if ncc[dy, dx] < ncc[q, q] + MIN_NCC_GAIN:
        dy = dx = q
    return (np.array([dx, dy]) + _subpixel(ncc, dy, dx) - q) * spacing


def _subpixel(score: np.ndarray, y: int, x: int) -> np.ndarray:
    """Offset of a parabola's vertex through the peak and its two neighbours, per axis (0 at the border)."""
    offset = np.zeros(2)
    for axis, (i, n) in enumerate(((x, score.shape[1]), (y, score.shape[0]))):
        if 0 < i < n - 1:
            a, b, c = (score[y, i - 1], score[y, i], score[y, i + 1]) if axis == 0 else \
                (score[i - 1, x], score[i, x], score[i + 1, x])
            curvature = a - 2 * b + c
            if curvature < 0:
                offset[axis] = np.clip(0.5 * (a - c) / curvature, -0.5, 0.5)
    return offset


def _refine(point_atlas, transform, atlas: _Prepared, target: _Prepared, s: "AtlasSettings"):
    """Coarse-to-fine local search: the landmark's neighbourhood may sit a few mm off after the global stage."""
    p = np.asarray(point_atlas, float)
    for step, r, q in s.levels:
        p = p + _match(p, transform, atlas.levels[step], target.levels[step], step, r, q)
    return np.array(transform.TransformPoint(tuple(float(v) for v in p)))


class AtlasDetector:
    """Landmarks of new images from annotated cases; `detect(case) -> Landmarks` like every detector."""

    def __init__(self, atlases: list[Case], settings: AtlasSettings = AtlasSettings(), refine: bool = True):
        if not atlases:
            raise InputError("the atlas is empty: give at least one annotated case")
        for a in atlases:
            if a.landmarks is None or not a.landmarks.present.any():
                raise InputError(f"atlas case {a.label} has no landmarks")
        names = atlases[0].landmarks.names
        for a in atlases[1:]:
            if a.landmarks.names != names:
                raise InputError(f"atlas case {a.label} has landmarks {short_list(a.landmarks.names)}, but "
                                 f"{atlases[0].label} has {short_list(names)}; all atlases need the same set")
        self.names = list(names)
        self.settings = settings
        self.refine = refine
        self.atlases = [(a, _prepare(a, settings)) for a in atlases]

    @classmethod
    def from_path(cls, path, ids: list[str] | None = None) -> "AtlasDetector":
        """A landmarks.csv (all rows, or those of `ids`) or a folder of `.mrk.json` + image pairs."""
        from .datasets import load_cases

        return cls(load_cases(path, ids))

    def detect(self, case: Case) -> Landmarks:
        s = self.settings
        target = _prepare(case, s)
        per_atlas = []
        for atlas, prepared in self.atlases:
            transform = register(prepared, target, s)
            pts = np.full((len(self.names), 2), np.nan)
            for i, (p, ok) in enumerate(zip(atlas.landmarks.points, atlas.landmarks.present)):
                if ok:
                    pts[i] = _refine(p, transform, prepared, target, s) if self.refine else \
                        transform.TransformPoint(tuple(float(v) for v in p))
            per_atlas.append(pts)
        stack = np.stack(per_atlas)  # (atlases, K, 2)
        present = np.isfinite(stack).all(axis=2).any(axis=0)
        points = np.full((len(self.names), 2), np.nan)
        confidence = np.zeros(len(self.names))
        sigma_px = s.spread_mm / np.mean(case.spacing)
        for k in np.flatnonzero(present):
            valid = np.isfinite(stack[:, k]).all(axis=1)
            votes = stack[valid, k]
            if len(votes) > 2:  # drop votes far from the median (a failed registration), average the rest
                dist = np.linalg.norm(votes - np.median(votes, axis=0), axis=1)
                votes = votes[dist <= max(2 * np.median(dist), sigma_px)]
            points[k] = votes.mean(axis=0)
            if len(votes) > 1:
                spread = np.median(np.linalg.norm(votes - points[k], axis=1))
                confidence[k] = float(np.exp(-0.5 * (spread / sigma_px) ** 2))
            else:
                confidence[k] = 0.5  # one atlas: no agreement to measure
        inside = np.isfinite(points).all(axis=1)
        return Landmarks(self.names, points, confidence, present & inside)
