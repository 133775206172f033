"""Weight-free detection from 1..N annotated cases (atlases) by image registration with SimpleITK.

Each atlas is registered to the new image (atlas = fixed, new image = moving, so the transform carries atlas
points straight onto the new image): moments initialisation, similarity then affine (Mattes mutual information,
multi-resolution), then a B-spline stage. Each mapped point is refined by normalised cross-correlation of an
atlas patch within a small window. Across atlases the per-landmark median is kept; confidence falls with the
spread of the atlases' answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from numpy.lib.stride_tricks import sliding_window_view

from .case import Case, Landmarks
from .errors import InputError
from .intensity import to_rgb255


@dataclass(frozen=True)
class AtlasSettings:
    global_side: int = 256  # working size (longest side, px) of the similarity / affine stages
    local_side: int = 512  # working size of the B-spline stage and the patch refinement
    bspline_mesh: int = 6  # control-point mesh per side
    patch_radius: int = 10  # refinement template half-size (px at local_side)
    search_radius: int = 6  # refinement search half-size
    spread_mm: float = 2.0  # atlas disagreement at which confidence drops to 0.61 (one sigma)
    seed: int = 7


def _working_image(case: Case, side: int) -> sitk.Image:
    """Grey 0..1 image resampled to `side` px whose physical space is the case's pixels."""
    grey = (to_rgb255(case.image).mean(axis=2) / 255.0).astype(np.float32)
    image = sitk.GetImageFromArray(grey)
    w, h = case.size
    f = max(w, h) / side
    if f > 1:
        image = sitk.SmoothingRecursiveGaussian(image, 0.5 * f)
        size = [max(int(round(w / f)), 8), max(int(round(h / f)), 8)]
        spacing = [w / size[0], h / size[1]]
        origin = [(s - 1) / 2 for s in spacing]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, [1, 0, 0, 1], 0.0,
                              sitk.sitkFloat32)
    return image


def _registration(shrink, smooth, seed) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smooth)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def register(atlas: sitk.Image, target: sitk.Image, atlas_fine: sitk.Image, target_fine: sitk.Image,
             s: AtlasSettings) -> sitk.Transform:
    """Transform taking atlas pixel coordinates to the target's (fixed = atlas, moving = target)."""
    init = sitk.CenteredTransformInitializer(atlas, target, sitk.Similarity2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _registration([4, 2, 1], [2, 1, 0], s.seed)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    similarity = sitk.Similarity2DTransform(reg.Execute(atlas, target).GetNthTransform(0))

    affine = sitk.AffineTransform(2)
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    reg = _registration([2, 1], [1, 0], s.seed)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-4, 100, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(atlas, target)

    bspline = sitk.BSplineTransformInitializer(atlas_fine, [s.bspline_mesh] * 2, 3)
    reg = _registration([4, 2], [2, 1], s.seed)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=200)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(atlas_fine, target_fine)
    return sitk.CompositeTransform([affine, bspline])


def _refine(point_atlas, transform, atlas_fine, target_fine, s: AtlasSettings):
    """NCC of the atlas patch around the landmark against the target resampled into atlas space."""
    spacing = np.array(atlas_fine.GetSpacing())
    origin = np.array(atlas_fine.GetOrigin())
    idx = np.round((np.asarray(point_atlas) - origin) / spacing).astype(int)
    r, q = s.patch_radius, s.search_radius
    size = np.array(atlas_fine.GetSize())
    if (idx - r - q < 0).any() or (idx + r + q >= size).any():
        return transform.TransformPoint(tuple(float(v) for v in point_atlas))
    a = sitk.GetArrayViewFromImage(atlas_fine)
    template = a[idx[1] - r: idx[1] + r + 1, idx[0] - r: idx[0] + r + 1]
    region_origin = origin + (idx - r - q) * spacing
    region = sitk.Resample(target_fine, [2 * (r + q) + 1] * 2, transform, sitk.sitkLinear, region_origin.tolist(),
                           spacing.tolist(), [1, 0, 0, 1], 0.0, sitk.sitkFloat32)
    windows = sliding_window_view(sitk.GetArrayViewFromImage(region), template.shape)
    t = (template - template.mean()) / (template.std() + 1e-6)
    w = windows - windows.mean(axis=(2, 3), keepdims=True)
    ncc = (w * t).sum(axis=(2, 3)) / (np.sqrt((w ** 2).sum(axis=(2, 3))) * np.sqrt((t ** 2).sum()) + 1e-6)
    dy, dx = np.unravel_index(np.argmax(ncc), ncc.shape)
    shifted = np.asarray(point_atlas) + (np.array([dx, dy]) - q) * spacing
    return transform.TransformPoint(tuple(float(v) for v in shifted))


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
                raise InputError(f"atlas case {a.label} has landmarks {_short(a.landmarks.names)}, but "
                                 f"{atlases[0].label} has {_short(names)}; all atlases need the same set")
        self.names = list(names)
        self.settings = settings
        self.refine = refine
        self.atlases = [(a, _working_image(a, settings.global_side), _working_image(a, settings.local_side))
                        for a in atlases]

    @classmethod
    def from_path(cls, path, ids: list[str] | None = None) -> "AtlasDetector":
        """A landmarks.csv (all rows, or those of `ids`) or a folder of `.mrk.json` + image pairs."""
        path = Path(path)
        if path.is_dir():
            return cls(_markups_folder(path))
        from .datasets import Dataset

        ds = Dataset(path)
        rows = ds.select(ids) if ids else range(len(ds))
        return cls([ds.case(i) for i in rows])

    def detect(self, case: Case) -> Landmarks:
        s = self.settings
        target, target_fine = _working_image(case, s.global_side), _working_image(case, s.local_side)
        per_atlas = []
        for atlas, atlas_img, atlas_fine in self.atlases:
            transform = register(atlas_img, target, atlas_fine, target_fine, s)
            pts = np.full((len(self.names), 2), np.nan)
            for i, (p, ok) in enumerate(zip(atlas.landmarks.points, atlas.landmarks.present)):
                if ok:
                    pts[i] = _refine(p, transform, atlas_fine, target_fine, s) if self.refine else \
                        transform.TransformPoint(tuple(float(v) for v in p))
            per_atlas.append(pts)
        stack = np.stack(per_atlas)  # (atlases, K, 2)
        present = np.isfinite(stack).all(axis=2).any(axis=0)
        points = np.full((len(self.names), 2), np.nan)
        confidence = np.zeros(len(self.names))
        sigma_px = s.spread_mm / np.mean(case.spacing)
        for k in np.flatnonzero(present):
            votes = stack[:, k][np.isfinite(stack[:, k]).all(axis=1)]
            points[k] = np.median(votes, axis=0)
            if len(votes) > 1:
                spread = np.median(np.linalg.norm(votes - points[k], axis=1))
                confidence[k] = float(np.exp(-0.5 * (spread / sigma_px) ** 2))
            else:
                confidence[k] = 0.5  # one atlas: no agreement to measure
        inside = np.isfinite(points).all(axis=1)
        return Landmarks(self.names, points, confidence, present & inside)


def _markups_folder(folder: Path) -> list[Case]:
    from .images import read_image
    from .markups import landmarks_from_markups

    cases = []
    for mrk in sorted(folder.glob("*.mrk.json")):
        stem = mrk.name[: -len(".mrk.json")]
        images = [p for p in folder.iterdir() if p.name.split(".")[0] == stem and p != mrk]
        if not images:
            raise InputError(f"{mrk}: no image named {stem}.* beside it")
        case = read_image(images[0])
        case.landmarks = landmarks_from_markups(mrk, case)
        cases.append(case)
    if not cases:
        raise InputError(f"{folder}: no .mrk.json files in the atlas folder")
    return cases


def _short(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
