"""Weight-free landmark detection in 3D volumes (CT, CBCT, micro-CT) from 1..N annotated volumes (atlases).

The 2D atlas detector's structure, made to survive arbitrary orientation. Per atlas and new volume:
1. orientation: the principal axes of each volume's bright structure (Otsu foreground) give candidate
   rotations (every proper signed permutation of the axes, since their order and signs are not reliable across
   specimens, each also twisted about each axis, since two axes of equal spread leave the frame free to turn),
   each scored by NCC over the atlas's landmark region on a coarse grid; the best few distinct ones go on;
2. similarity registration (SimpleITK, correlation over every voxel of the landmark region, multi-resolution)
   from each kept hypothesis; the best by NCC then gets an affine stage on a finer grid;
3. each landmark's neighbourhood gets its own affine map, fitted by NCC coarse to fine (`ncc_align`, all
   landmarks in one torch batch), sampling the new volume through the global map, so nothing is resampled
   whole.
Each atlas votes for each landmark with weight exp((NCC - best NCC) / fusion_ncc); confidence falls with the
weighted spread of the votes; a landmark is missing where no vote stays in the volume or the votes disagree
by more than `disagree_mm`. All geometry goes through each volume's own index -> LPS matrix (origin, spacing,
direction), so a volume's layout on disk does not change the physical answer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..case import Landmarks, Volume
from ..errors import InputError
from ..progress import Callback, Cancel, check, each, report, within
from ..settings import Atlas3DSettings, Stage
from .atlas import atlas_names, fuse_votes
from .ncc_align import align_windows, ncc, sample


def _rotations(twists_deg=(30.0, 60.0)) -> np.ndarray:
    """Candidate rotations between principal frames: the 24 proper signed permutations of the axes (their order
    and signs are not reliable across specimens), each also twisted by `twists_deg` about each axis (two
    axes of nearly equal spread leave the frame free to turn about the third)."""
    cube = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            q = np.zeros((3, 3))
            q[range(3), perm] = signs
            if np.linalg.det(q) > 0:
                cube.append(q)
    twists = [np.eye(3)]
    for axis in range(3):
        for angle in np.deg2rad(twists_deg):
            c, s = np.cos(angle), np.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            twists.append(r)
    return np.array([q @ r for q in cube for r in twists])


ROTATIONS = _rotations()


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a float32 SimpleITK image with the same index -> LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.voxels, dtype=np.float32))
    spacing = volume.spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection((volume.index_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(volume.index_to_lps[:3, 3].tolist())
    return image


def index_to_lps(image: sitk.Image) -> np.ndarray:
    """4 x 4 voxel index (x, y, z) -> LPS mm of a SimpleITK image."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def _regridded(image: sitk.Image, side: int) -> sitk.Image:
    """The image on an isotropic grid along its own axes with `side` voxels along its longest extent, centred on
    the volume's centre (so that a flipped or permuted layout of the same volume gets the same grid points),
    smoothed against aliasing; returned as it is when already as fine as that."""
    size = np.array(image.GetSize())
    extent = size * np.array(image.GetSpacing())
    spacing = extent.max() / side
    if spacing <= min(image.GetSpacing()) * 1.0001:
        return image
    direction = np.array(image.GetDirection()).reshape(3, 3)
    new_size = np.array([max(int(np.ceil(e / spacing)), 4) for e in extent])
    centre = np.array(image.GetOrigin()) + direction @ ((size - 1) / 2 * np.array(image.GetSpacing()))
    origin = centre - direction @ ((new_size - 1) / 2 * spacing)
    new_size = new_size.tolist()
    smooth = sitk.SmoothingRecursiveGaussian(image, 0.5 * spacing)
    return sitk.Resample(smooth, new_size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), [spacing] * 3,
                         direction.ravel().tolist(), 0.0, sitk.sitkFloat32)


def _box_mask(image: sitk.Image, lps: np.ndarray, margin: float) -> sitk.Image:
    """Voxels of `image` inside the LPS box of the points grown by `margin` of its size (the anatomy)."""
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    pad = margin * (hi - lo)
    lo, hi = lo - pad, hi + pad
    shape = image.GetSize()[::-1]
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    points = zyx[:, ::-1] @ index_to_lps(image)[:3, :3].T + index_to_lps(image)[:3, 3]
    inside = ((points >= lo) & (points <= hi)).all(axis=1).reshape(shape)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


@dataclass
class Prepared:
    """One volume made ready for registration: grids, pyramid, principal axes; atlases also their masks."""

    work_to_lps: np.ndarray  # 4 x 4, the working grid's voxel index -> LPS
    levels: dict  # voxel step -> working grid (torch, D x H x W) smoothed for that step (local alignment)
    coarse: sitk.Image  # orientation search and similarity stage
    mid: sitk.Image  # affine stage
    centre: np.ndarray  # (3,) LPS centroid of the foreground
    axes: np.ndarray  # 3 x 3, principal axes as columns (largest spread first), det +1
    spread: np.ndarray  # (3,) standard deviations along the axes, mm
    coarse_mask: sitk.Image | None = None  # atlases: where the metrics look (around the landmarks)
    mid_mask: sitk.Image | None = None


def work_spacing(volume: Volume, s: Atlas3DSettings) -> float:
    """The finest voxel size (mm) of the volume's working grid."""
    return max(float((np.array(volume.size) * volume.spacing).max() / s.work_side), float(volume.spacing.min()))


def prepare(volume: Volume, s: Atlas3DSettings, levels: tuple, voxel_mm: float) -> Prepared:
    """levels: (atlas voxel step, half window); voxel_mm: the atlases' voxel size. Every level is smoothed by
    half its step in mm, atlas and new volume alike, whatever the new volume's own grid."""
    full = to_sitk(volume)
    work = _regridded(full, s.work_side)
    coarse, mid = _regridded(work, s.coarse_side), _regridded(work, s.mid_side)
    levels_t = {step: torch.from_numpy(sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(work, 0.5 * step * voxel_mm))) for step, _ in levels}
    centre, axes, spread = _principal_axes(coarse, volume.label)
    prepared = Prepared(index_to_lps(work), levels_t, coarse, mid, centre, axes, spread)
    if volume.landmarks is not None:
        lps = volume.landmarks.points[volume.landmarks.present]
        prepared.coarse_mask = _box_mask(coarse, lps, s.mask_margin)
        prepared.mid_mask = _box_mask(mid, lps, s.mask_margin)
    return prepared


def _principal_axes(image: sitk.Image, label: str):
    """Centroid, principal axes (columns, det +1, largest spread first) and spreads of the Otsu foreground."""
    values = sitk.GetArrayFromImage(image)
    if not np.isfinite(values).all() or values.max() <= values.min():
        raise InputError(f"{label}: the volume is empty (constant intensity) or holds non-finite values")
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)).astype(bool)
    if mask.sum() < 10:
        raise InputError(f"{label}: no structure stands out of the background to register")
    zyx = np.argwhere(mask)
    m = index_to_lps(image)
    lps = zyx[:, ::-1] @ m[:3, :3].T + m[:3, 3]
    centre = lps.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov((lps - centre).T))
    order = np.argsort(eigenvalues)[::-1]
    axes = vectors[:, order]
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    return centre, axes, np.sqrt(np.maximum(eigenvalues[order], 1e-12))


def _coarse_samples(atlas_p: Prepared, max_samples: int = 6000):
    """LPS positions (N x 3) and values (N) of the atlas's coarse grid inside its landmark region."""
    values = sitk.GetArrayFromImage(atlas_p.coarse)
    inside = sitk.GetArrayFromImage(atlas_p.coarse_mask).astype(bool)
    zyx = np.argwhere(inside)
    every = max(1, len(zyx) // max_samples)  # a regular subset is plenty for a correlation
    zyx = zyx[::every]
    m = index_to_lps(atlas_p.coarse)
    return zyx[:, ::-1] @ m[:3, :3].T + m[:3, 3], values[tuple(zyx.T)]


def _similarity_ncc(atlas_p: Prepared, target_p: Prepared, matrices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """NCC over the atlas's coarse landmark region of the target mapped by y = M x + t, for H maps at once."""
    lps, values = _coarse_samples(atlas_p)
    lps_to_index = np.linalg.inv(index_to_lps(target_p.coarse))
    mapped = np.einsum("hij,nj->hni", matrices, lps) + offsets[:, None]  # H x N x 3 target LPS
    index = mapped @ lps_to_index[:3, :3].T + lps_to_index[:3, 3]
    target = torch.from_numpy(sitk.GetArrayFromImage(target_p.coarse))
    moved = sample(target, torch.from_numpy(index).float())
    fixed = torch.from_numpy(values).float().expand_as(moved)
    return ncc(fixed, moved).numpy()


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Degrees of the rotation between two rotation matrices."""
    return float(np.degrees(np.arccos(np.clip((np.trace(a @ b.T) - 1) / 2, -1.0, 1.0))))


def _as_matrix(transform: sitk.Transform):
    """(M, t) with y = M x + t for a SimpleITK matrix-offset transform (similarity or affine)."""
    m = np.array(transform.GetMatrix()).reshape(3, 3)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    return m, c + t - m @ c


def _registration(stage: Stage, mask) -> sitk.ImageRegistrationMethod:
    """Correlation over every voxel of `mask` (the same answer whatever the layout), as `stage` says."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricFixedMask(mask)
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(stage.shrink))
    reg.SetSmoothingSigmasPerLevel(list(stage.smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetOptimizerAsRegularStepGradientDescent(stage.step, stage.min_step, stage.iterations,
                                                 relaxationFactor=stage.relaxation)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def register(atlas_p: Prepared, target_p: Prepared, s: Atlas3DSettings):
    """(M, t): the affine map y = M x + t from atlas LPS to target LPS (fixed = atlas, moving = target)."""
    # 1. orientation hypotheses from the principal axes, scored at the coarse grid
    scale = float(np.prod(target_p.spread / atlas_p.spread) ** (1 / 3))
    rotations = np.einsum("ij,hjk,lk->hil", target_p.axes, ROTATIONS, atlas_p.axes)
    offsets = target_p.centre - scale * rotations @ atlas_p.centre
    scores = _similarity_ncc(atlas_p, target_p, scale * rotations, offsets)
    # 2. similarity from the best few distinct ones, the best of those by the same NCC
    chosen = []
    for h in np.argsort(-scores):
        if all(_angle(rotations[h], rotations[c]) > s.distinct_deg for c in chosen):
            chosen.append(h)
        if len(chosen) == s.keep:
            break
    results = []
    for h in chosen:
        init = sitk.Similarity3DTransform()
        init.SetCenter(atlas_p.centre.tolist())
        init.SetMatrix(rotations[h].ravel().tolist())
        init.SetScale(scale)
        init.SetTranslation((target_p.centre - atlas_p.centre).tolist())
        reg = _registration(s.similarity, atlas_p.coarse_mask)
        reg.SetInitialTransform(init, inPlace=True)
        try:
            reg.Execute(atlas_p.coarse, target_p.coarse)
        except RuntimeError:  # too little overlap left under this hypothesis: it drops out
            continue
        results.append(init)
    if not results:
        raise InputError("the atlas and the volume do not overlap under any orientation")
    maps = [_as_matrix(t) for t in results]
    finals = _similarity_ncc(atlas_p, target_p, np.array([m for m, _ in maps]), np.array([t for _, t in maps]))
    similarity = results[int(np.argmax(finals))]
    # 3. affine on the finer grid
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    reg = _registration(s.affine, atlas_p.mid_mask)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(atlas_p.mid, target_p.mid)
    return _as_matrix(affine)


def locate(atlas: Volume, atlas_p: Prepared, target_p: Prepared, s: Atlas3DSettings, levels: tuple):
    """Where one atlas puts its landmarks in the target (K x 3 LPS, NaN where the atlas has none) and how well
    each landmark's neighbourhood matched (K local NCC, -inf where none)."""
    m, t = register(atlas_p, target_p, s)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = m, t
    # atlas working voxels -> target working voxels, one 4 x 4 (the local stage samples the target through it)
    to_target = torch.from_numpy(np.linalg.inv(target_p.work_to_lps) @ affine @ atlas_p.work_to_lps).float()

    def to_moving(xyz):
        return xyz @ to_target[:3, :3].T + to_target[:3, 3]

    ok = atlas.landmarks.present
    lps_to_atlas = np.linalg.inv(atlas_p.work_to_lps)
    start = torch.from_numpy(atlas.landmarks.points[ok] @ lps_to_atlas[:3, :3].T + lps_to_atlas[:3, 3]).float()
    moved, score = align_windows(atlas_p.levels, target_p.levels, start, levels, s.local.iterations, s.local.rate, to_moving)
    d, h, w = next(iter(atlas_p.levels.values())).shape
    off_grid = ((moved < 0) | (moved > torch.tensor([w - 1, h - 1, d - 1]))).any(dim=1)  # drifted out of the atlas
    moved[off_grid] = start[off_grid]  # such a window keeps the global stage's answer, as the weakest vote
    score[off_grid] = -1.0
    points = np.full((len(ok), 3), np.nan)
    points[ok] = to_moving(moved).double().numpy() @ target_p.work_to_lps[:3, :3].T + target_p.work_to_lps[:3, 3]
    scores = np.full(len(ok), -np.inf)
    scores[ok] = score.double().numpy()
    return points, scores


def fuse(votes: list, target: Volume, names: list[str], s: Atlas3DSettings) -> Landmarks:
    """Landmarks from the atlases' (points K x 3 LPS, local NCC K) votes: NCC-weighted mean, confidence from
    their weighted spread; missing where no vote lies in the volume or the votes disagree."""
    stack = np.stack([v[0] for v in votes])  # (atlases, K, 3)
    scores = np.stack([v[1] for v in votes])  # (atlases, K)
    inside = np.stack([target.contains(p) for p in stack])
    scores = np.where(inside, scores, -np.inf)  # a vote out of the volume is no vote
    points, confidence, present, spread = fuse_votes(stack, scores, s.local.fusion_ncc, s.local.spread_mm)
    present &= ~(spread > s.disagree_mm)  # votes that disagree: missing (a single vote has no spread)
    points[~present] = np.nan
    confidence[~present] = 0.0
    return Landmarks(names, points, confidence, present)


class Atlas3DDetector:
    """Landmarks of new volumes from annotated ones; `detect(volume) -> Landmarks` (N x 3 LPS mm)."""

    dim = 3

    def __init__(self, atlases: list[Volume], settings: Atlas3DSettings = Atlas3DSettings()):
        self.names = atlas_names(atlases, Volume, "volume", "a 2D image; a 3D atlas needs volumes", least=4)
        self.settings = settings
        # local steps are atlas voxels of the working grid: they keep their anatomy on finely sampled atlases
        side = max(min(max(a.size), settings.work_side) for a in atlases)
        scale = max(1.0, side / settings.local.level_side)
        self.levels = tuple((step * scale, half) for step, half in settings.local.levels)
        self.voxel_mm = min(work_spacing(a, settings) for a in atlases)
        self.atlases = [(a, prepare(a, settings, self.levels, self.voxel_mm)) for a in atlases]

    def prepare(self, volume: Volume) -> Prepared:
        if not isinstance(volume, Volume):
            raise InputError(f"{volume.label}: a 2D image; this atlas is of 3D volumes")
        return prepare(volume, self.settings, self.levels, self.voxel_mm)

    def votes(self, volume: Volume, prepared: Prepared | None = None, which=None, progress: Callback = None,
              cancel: Cancel = None) -> list:
        """Each atlas's (points, local NCC) for `volume` (atlases `which`, default all), one atlas at a time so
        that progress moves and Cancel is checked between them."""
        prepared = prepared or self.prepare(volume)
        chosen = range(len(self.atlases)) if which is None else which
        return [locate(*self.atlases[i], prepared, self.settings, self.levels) for i in each(
            chosen, lambda n, total: f"registering atlas volume {n} of {total}", progress, cancel)]

    def detect(self, volume: Volume, progress: Callback = None, cancel: Cancel = None) -> Landmarks:
        report(progress, 0.0, "preparing the volume")  # about a tenth of the time
        prepared = self.prepare(volume)
        votes = self.votes(volume, prepared, progress=within(progress, 0.1, 1.0), cancel=cancel)
        check(cancel)
        return fuse(votes, volume, self.names, self.settings)
