"""Weight-free detection from 1..N annotated cases (atlases) by image registration with SimpleITK.

Each atlas is registered to the new image (atlas = fixed, new image = moving, so the transform carries atlas
points straight onto the new image), with Mattes mutual information taken over the atlas's landmark region
only (labels, rulers and collimator edges mislead it): similarity from the image centres (intensity moments
are pulled away by bright collimator fields), then affine, optionally a coarse B-spline (`deformable`: for
articulated anatomy such as hands), each multi-resolution. Then the new image, warped into the atlas's
space, is aligned to every landmark's neighbourhood by its own affine map, coarse to fine (`ncc_align`): one
global map cannot follow a jaw or a finger that moved on its own. Each atlas votes for each landmark with
weight exp((NCC - best NCC) / fusion_ncc), so the atlas that matches a landmark's neighbourhood best counts
most; confidence falls with the weighted spread of the votes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..case import Case, Landmarks, require_detectable
from ..errors import InputError, short_list
from ..io.intensity import to_rgb255
from ..progress import Callback, Cancel, each, within
from ..settings import AtlasSettings, Stage
from .calibration import Calibration, Evidence, calibrated, fit_calibration
from .ncc_align import align_windows, sample

STAGE_TRIAL_CASES = 5  # the B-spline stage is tried on at most this many cases, each held out in turn ...
BSPLINE_GAIN = 0.9     # ... and kept where its error there is at most this share of the affine atlas's


def stage_choice(affine_mm: float, bspline_mm: float, cases: int) -> dict:
    """Whether the B-spline stage is kept, with the held-out figures it was chosen on (as adapters store them):
    only where it is clearly better, for it costs about twice the registration time."""
    return {"bspline": bool(bspline_mm <= BSPLINE_GAIN * affine_mm), "cases": cases,
            "affine_mm": round(affine_mm, 3), "bspline_mm": round(bspline_mm, 3)}


def stage_line(stage: dict) -> str:
    """'atlas: B-spline stage kept (held-out 2.70 mm against 3.41 mm affine, 3 cases)' (or 'not kept')."""
    kept = "kept" if stage["bspline"] else "not kept"
    return (f"atlas: B-spline stage {kept} (held-out {stage['bspline_mm']:.2f} mm against {stage['affine_mm']:.2f} mm "
            f"affine, {stage['cases']} cases)")


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
    levels: dict  # px step -> full-resolution image (torch, H x W) smoothed for that step (local alignment)
    fine: sitk.Image | None = None  # B-spline stage
    coarse_mask: sitk.Image | None = None  # atlases: where the metric looks (around the landmarks)
    fine_mask: sitk.Image | None = None


def pyramid(full: sitk.Image, levels: tuple) -> dict:
    """px step -> the full-resolution image (torch, H x W) smoothed for sampling at that step."""
    return {step: torch.from_numpy(sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(full, 0.5 * step) if step > 1 else full)) for step, _ in levels}


def _grey_image(case: Case) -> sitk.Image:
    return sitk.GetImageFromArray((to_rgb255(case.image).mean(axis=2) / 255.0).astype(np.float32))  # grey 0..1


def _prepare(case: Case, s: AtlasSettings, levels: tuple) -> _Prepared:
    full = _grey_image(case)
    prepared = _Prepared(_working_image(full, s.global_side), pyramid(full, levels))
    if s.deformable:
        prepared.fine = _working_image(full, s.bspline_side)
    if case.landmarks is not None:
        prepared.coarse_mask = _landmark_mask(prepared.coarse, case.landmarks, s.mask_margin)
        if s.deformable:
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


def _registration(stage: Stage, s: AtlasSettings, mask=None) -> sitk.ImageRegistrationMethod:
    """Mattes mutual information over `mask` (the atlas's landmark region), multi-resolution as `stage` says."""
    reg = sitk.ImageRegistrationMethod()
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetMetricAsMattesMutualInformation(s.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(s.sampling, s.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(stage.shrink))
    reg.SetSmoothingSigmasPerLevel(list(stage.smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _gradient_descent(reg: sitk.ImageRegistrationMethod, stage: Stage) -> None:
    reg.SetOptimizerAsRegularStepGradientDescent(stage.step, stage.min_step, stage.iterations,
                                                 relaxationFactor=stage.relaxation)
    reg.SetOptimizerScalesFromPhysicalShift()


def register(atlas_p: _Prepared, target_p: _Prepared, s: AtlasSettings) -> sitk.Transform:
    """Transform taking atlas pixel coordinates to the target's (fixed = atlas, moving = target); the metric
    is taken over the atlas's landmark region only."""
    atlas, target = atlas_p.coarse, target_p.coarse
    init = sitk.CenteredTransformInitializer(atlas, target, sitk.Similarity2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = _registration(s.similarity, s, atlas_p.coarse_mask)
    _gradient_descent(reg, s.similarity)
    reg.SetInitialTransform(init, inPlace=False)
    similarity = sitk.Similarity2DTransform(reg.Execute(atlas, target).GetNthTransform(0))

    affine = sitk.AffineTransform(2)
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    reg = _registration(s.affine, s, atlas_p.coarse_mask)
    _gradient_descent(reg, s.affine)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(atlas, target)
    if not s.deformable:
        return affine

    bspline = sitk.BSplineTransformInitializer(atlas_p.fine, [s.bspline_mesh] * 2, 3)
    reg = _registration(s.bspline, s, atlas_p.fine_mask)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=s.bspline.iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=200)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(atlas_p.fine, target_p.fine)
    return sitk.CompositeTransform([affine, bspline])


def _mapping(transform: sitk.Transform, atlas_p: _Prepared) -> torch.Tensor:
    """Target px coordinates (x, y) of every atlas pixel: H x W x 2."""
    h, w = next(iter(atlas_p.levels.values())).shape
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, [w, h], [0.0, 0.0], [1.0, 1.0],
                                              [1, 0, 0, 1])
    ys, xs = np.mgrid[0:h, 0:w]
    return torch.from_numpy((sitk.GetArrayFromImage(field) + np.stack([xs, ys], -1)).astype(np.float32))


def locate(atlas: Case, atlas_p: _Prepared, target_p: _Prepared, s: AtlasSettings, levels: tuple):
    """Where one atlas puts its landmarks on the target (K x 2 px, NaN where the atlas has none) and how well
    each landmark's neighbourhood matched (K local NCC, -inf where none)."""
    mapping = _mapping(register(atlas_p, target_p, s), atlas_p)
    warped = {step: sample(image, mapping) for step, image in target_p.levels.items()}  # target in atlas space
    ok = atlas.landmarks.present
    start = torch.from_numpy(atlas.landmarks.points[ok]).float()
    moved, score = align_windows(atlas_p.levels, warped, start, levels, s.local.iterations, s.local.rate)
    h, w = mapping.shape[:2]
    off_grid = ((moved < 0) | (moved > torch.tensor([w - 1, h - 1]))).any(dim=1)  # drifted out of the atlas
    moved[off_grid] = start[off_grid]  # such a window keeps the global stage's answer, as the weakest vote
    score[off_grid] = -1.0
    points = np.full((len(ok), 2), np.nan)
    points[ok] = sample(mapping, moved).double().numpy()
    scores = np.full(len(ok), -np.inf)
    scores[ok] = score.double().numpy()
    return points, scores


def atlas_names(atlases: list, kind: type, noun: str, wrong_kind: str, least: int = 1) -> list[str]:
    """The landmark names every atlas case shares (2D or 3D atlas); one line for an empty atlas, a case of the
    other kind (`wrong_kind` says what it is), fewer than `least` landmarks, or another landmark set."""
    if not atlases:
        raise InputError(f"the atlas is empty: give at least one annotated {noun}")
    for a in atlases:
        if not isinstance(a, kind):
            raise InputError(f"atlas case {a.label} is {wrong_kind}")
        if a.landmarks is None or a.landmarks.present.sum() < least:
            few = "no landmarks" if least == 1 else f"fewer than {least} landmarks"
            raise InputError(f"atlas {noun} {a.label} has {few}")
    names = atlases[0].landmarks.names
    for a in atlases[1:]:
        if a.landmarks.names != names:
            raise InputError(f"atlas {noun} {a.label} has landmarks {short_list(a.landmarks.names)}, but "
                             f"{atlases[0].label} has {short_list(names)}; all atlases need the same set")
    return list(names)


class AtlasDetector:
    """Landmarks of new images from annotated cases; `detect(case) -> Landmarks` like every detector. Each image
    is registered to its `max_atlases` most similar cases only, so that its cost stops growing with the cases;
    confidence is calibrated (calibration.py) on the cases themselves, once, on the first detection.

    choose_stage: with the calibration, try the B-spline stage on up to STAGE_TRIAL_CASES of the cases and keep
    it where it is clearly better (`stage` then holds the figures, as `stage_choice` gives them)."""

    dim = 2

    def __init__(self, atlases: list[Case], settings: AtlasSettings = AtlasSettings(), choose_stage: bool = False):
        self.names = atlas_names(atlases, Case, "case", "a 3D volume; a 2D atlas needs images")
        self.settings = settings
        self._choose_stage = choose_stage and not settings.deformable and len(atlases) > 1
        self.stage: dict | None = None
        # the local stage works in atlas pixels: windows keep their anatomical size on finer-sampled atlases
        scale = max(1.0, max(max(a.image.shape[:2]) for a in atlases) / settings.local.level_side)
        self.levels = tuple((step * scale, half) for step, half in settings.local.levels)
        prepared_for = replace(settings, deformable=True) if self._choose_stage else settings  # the trial's images
        self.atlases = [(a, _prepare(a, prepared_for, self.levels)) for a in atlases]
        self._calibration: Calibration | None = None

    def detect(self, case: Case, progress: Callback = None, cancel: Cancel = None) -> Landmarks:
        share = 0.5 if self._calibration is None and len(self.atlases) > 1 else 0.0  # the first detection fits it
        calibration = self.calibration(within(progress, 0.0, share), cancel)
        found, evidence = self.fuse_with_evidence(case, *self.votes(case, progress=within(progress, share, 1.0),
                                                                    cancel=cancel))
        return calibrated(found, evidence, calibration)

    def votes(self, case: Case, atlases: list[int] | None = None, progress: Callback = None,
              cancel: Cancel = None) -> tuple[np.ndarray, np.ndarray]:
        """The answers on `case` of the atlases at indices `atlases` (default: the most similar max_atlases):
        points (all atlases x K x 2 px, NaN where none) and local NCC (atlases x K, -inf where no vote, also for
        a point off the image or an atlas not asked)."""
        if not isinstance(case, Case):
            raise InputError(f"{case.label}: a 3D volume; this atlas is of 2D images")
        require_detectable(case)
        target = _prepare(case, self.settings, self.levels)
        chosen = self.nearest(target.coarse, range(len(self.atlases))) if atlases is None else atlases
        return self._votes_on(case, target, chosen, progress, cancel)

    def nearest_to(self, case: Case) -> list[int]:
        """The atlases `votes(case)` registers to (indices)."""
        require_detectable(case)
        return self.nearest(_working_image(_grey_image(case), self.settings.global_side), range(len(self.atlases)))

    def nearest(self, coarse: sitk.Image, candidates) -> list[int]:
        """The max_atlases candidates (atlas indices) whose whole image looks most like `coarse` (NCC of small
        thumbnails): registering to all of them would make every case added cost more per image."""
        candidates = list(candidates)
        if len(candidates) <= self.settings.max_atlases:
            return candidates
        mine = _thumbnail(coarse)
        likeness = [float(np.mean(mine * _thumbnail(self.atlases[i][1].coarse))) for i in candidates]
        best = np.argsort(likeness)[::-1][:self.settings.max_atlases]
        return sorted(candidates[j] for j in best)

    def _votes_on(self, case: Case, target: _Prepared, chosen, progress, cancel,
                  settings: AtlasSettings | None = None):
        stack = np.full((len(self.atlases), len(self.names), 2), np.nan)
        scores = np.full((len(self.atlases), len(self.names)), -np.inf)
        for i in each(list(chosen), lambda n, total: f"registering atlas case {n} of {total}", progress, cancel):
            stack[i], scores[i] = locate(*self.atlases[i], target, settings or self.settings, self.levels)
        with np.errstate(invalid="ignore"):
            inside = ((stack >= -0.5) & (stack <= np.array(case.image.shape[1::-1]) - 0.5)).all(axis=2)
        scores[~inside] = -np.inf  # a vote off the image is no vote
        return stack, scores

    def fuse(self, case: Case, stack: np.ndarray, scores: np.ndarray) -> Landmarks:
        """Landmarks from votes (all atlases' or a subset's, as `votes` gives them), with the votes' agreement as
        an uncalibrated confidence."""
        return self.fuse_with_evidence(case, stack, scores)[0]

    def fuse_with_evidence(self, case: Case, stack: np.ndarray, scores: np.ndarray) -> tuple[Landmarks, Evidence]:
        """`fuse`, and the evidence about each point that its calibrated probability is computed from."""
        local, mm = self.settings.local, float(np.mean(case.spacing))
        points, confidence, present, spread = fuse_votes(stack, scores, local.fusion_ncc, local.spread_mm / mm)
        with np.errstate(invalid="ignore"):
            best = np.where(present, scores.max(axis=0), np.nan)
        return Landmarks(self.names, points, confidence, present), Evidence.of_atlas(spread * mm, best)

    def calibration(self, progress: Callback = None, cancel: Cancel = None) -> Calibration | None:
        """The model of this atlas's error, fitted once: up to calibration_cases of its cases, each detected by
        its most similar others (None for a one-case atlas: nothing to measure its error on). Where the stage is
        to be chosen, the first of them are detected with and without the B-spline stage first."""
        n = len(self.atlases)
        if self._calibration is not None or n < 2:
            return self._calibration
        picks = [int(i) for i in np.unique(np.linspace(0, n - 1, min(n, self.settings.calibration_cases)).round())]
        trial = picks[:STAGE_TRIAL_CASES] if self._choose_stage else []
        bar = np.cumsum([0, len(trial), len(trial), len(picks) - len(trial)]) / (len(picks) + len(trial))
        held = self._choose(trial, bar, progress, cancel) if trial else {}
        held |= self._held_out([i for i in picks if i not in held], self.settings, "measuring the atlas's error on "
                               "its cases", within(progress, bar[2], 1.0), cancel)
        evidence, errors = zip(*(held[i] for i in picks))
        error, k = np.concatenate(errors), len(self.names)
        ok = np.isfinite(error)  # found, and annotated on the case
        case_of, landmark_of = np.repeat(np.arange(len(picks)), k), np.tile(np.arange(k), len(picks))
        self._calibration = fit_calibration(Evidence.stack(list(evidence)).select(ok), error[ok], case_of[ok],
                                            landmark_of[ok], k)
        return self._calibration

    def _choose(self, trial: list[int], bar, progress, cancel) -> dict:
        """The trial cases detected without and with the B-spline stage; the stage kept where clearly better
        (`self.stage`, `self.settings`). Returns the kept stage's held-out results."""
        flexible = replace(self.settings, deformable=True)
        affine = self._held_out(trial, self.settings, "measuring the atlas's error on its cases",
                                within(progress, bar[0], bar[1]), cancel)
        bspline = self._held_out(trial, flexible, "trying the B-spline stage on the cases",
                                 within(progress, bar[1], bar[2]), cancel)
        mean = lambda held: float(np.nanmean(np.concatenate([e for _, e in held.values()])))  # noqa: E731
        self.stage = stage_choice(mean(affine), mean(bspline), len(trial))
        if self.stage["bspline"]:
            self.settings = flexible
        return bspline if self.stage["bspline"] else affine

    def _held_out(self, picks: list[int], settings: AtlasSettings, what: str, progress, cancel) -> dict:
        """Each case of `picks` detected by its most similar others: case -> (Evidence, error per landmark, mm)."""
        n, held = len(self.atlases), {}
        for i in each(picks, lambda j, total: f"{what}: {j} of {total}", progress, cancel):
            case, prepared = self.atlases[i]
            others = self.nearest(prepared.coarse, [j for j in range(n) if j != i])
            found, seen = self.fuse_with_evidence(case, *self._votes_on(case, prepared, others, None, cancel,
                                                                        settings))
            held[i] = seen, np.linalg.norm((found.points - case.landmarks.subset(self.names).points)
                                           * np.array(case.spacing), axis=1)
        return held


def _thumbnail(image: sitk.Image, side: int = 32) -> np.ndarray:
    """The image on a side x side grid, zero mean and unit variance: what `nearest` compares."""
    w, h = image.GetSize()
    image = sitk.SmoothingRecursiveGaussian(image, [0.5 * image.GetSpacing()[0] * w / side,
                                                    0.5 * image.GetSpacing()[1] * h / side])
    spacing = [image.GetSpacing()[0] * w / side, image.GetSpacing()[1] * h / side]
    origin = [o - s0 / 2 + s / 2 for o, s0, s in zip(image.GetOrigin(), image.GetSpacing(), spacing)]
    small = sitk.GetArrayFromImage(sitk.Resample(image, [side, side], sitk.Transform(), sitk.sitkLinear, origin,
                                                 spacing, [1, 0, 0, 1], 0.0, sitk.sitkFloat32))
    return (small - small.mean()) / (small.std() + 1e-6)


def fuse_votes(stack: np.ndarray, scores: np.ndarray, fusion_ncc: float, sigma: float):
    """The atlases' votes (atlases x K x D, local NCC atlases x K, -inf for no vote) -> per landmark the
    NCC-weighted mean, weight exp((NCC - best) / fusion_ncc); confidence exp(-(spread / sigma)^2 / 2) from the
    votes' weighted spread (sigma in the votes' units), 0.5 for a single vote; present; spread (NaN for one vote).
    The 2D and 3D atlases share it."""
    _, k_count, dim = stack.shape
    present = np.isfinite(scores).any(axis=0)
    points = np.full((k_count, dim), np.nan)
    confidence = np.zeros(k_count)
    spread = np.full(k_count, np.nan)
    for k in np.flatnonzero(present):
        weights = np.exp((scores[:, k] - scores[:, k].max()) / fusion_ncc)  # 0 for no vote
        valid = weights > 0
        weights, k_votes = weights[valid] / weights[valid].sum(), stack[valid, k]
        points[k] = weights @ k_votes
        if len(k_votes) > 1:
            spread[k] = np.sqrt(weights @ ((k_votes - points[k]) ** 2).sum(axis=1))
            confidence[k] = float(np.exp(-0.5 * (spread[k] / sigma) ** 2))
        else:
            confidence[k] = 0.5  # one atlas: no agreement to measure
    return points, confidence, present, spread
