"""The atlas, refined: a small CNN looks at a full-resolution patch around each atlas estimate and moves it.

The weight-free atlas (atlas.py) already puts every landmark in its neighbourhood; what a few annotated cases
can still teach is the landmark's exact local appearance. One small encoder-decoder, shared by all landmarks
(one output map per landmark), reads a grey patch centred on the atlas estimate and scores every cell of the
patch as the landmark's position (log-probabilities). The atlas's own error (measured leave-one-case-out when
fine-tuning) is the prior: posterior = network scores + log N(atlas estimate, sigma). Several networks (one
per training fold) are averaged. They refine from the atlas's fused estimate and from each atlas's own vote, and
the answer is the median of those refinements. Per landmark the adapter keeps the atlas's answer where the
held-out cases said the atlas was better.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..case import Case, Landmarks
from ..errors import InputError
from ..io.checksum import case_checksum
from ..io.intensity import to_rgb255
from ..models import weight_files
from ..progress import Callback, Cancel, check, report, within
from ..settings import AtlasSettings, from_dict
from .calibration import WITHIN_MM, Calibration, Evidence, calibrated

KIND = "atlas-refiner"  # the weight file kind (weight_files.py)


@dataclass(frozen=True)
class RefinerConfig:
    patch: int = 64        # patch side in samples (the output grid is patch / 2)
    step: float = 1.0      # image px per patch sample
    width: int = 12        # channels of the first stage (then 2x, 4x, 6x)
    prior_sigma: float = 8.0  # px: the atlas's error per axis, the prior around its estimate

    @property
    def cells(self) -> int:
        return self.patch // 2


def _block(cin, cout, stride=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(inplace=True))


class PatchNet(nn.Module):
    """(B, 1, P, P) standardised patches -> (B, K, P/2, P/2) scores, one map per landmark (a small U-Net)."""

    def __init__(self, num_landmarks: int, width: int = 12):
        super().__init__()
        w = width
        self.down1 = nn.Sequential(_block(1, w, 2), _block(w, 2 * w))            # P/2
        self.down2 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))  # P/4
        self.down3 = nn.Sequential(_block(4 * w, 6 * w, 2), _block(6 * w, 6 * w))  # P/8
        self.up3 = nn.Conv2d(6 * w, 4 * w, 1)
        self.fuse2 = _block(4 * w, 4 * w)
        self.up2 = nn.Conv2d(4 * w, 2 * w, 1)
        self.fuse1 = _block(2 * w, 2 * w)
        self.out = nn.Conv2d(2 * w, num_landmarks, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(a)
        c = self.down3(b)
        b = self.fuse2(b + F.interpolate(self.up3(c), size=b.shape[-2:], mode="bilinear", align_corners=False))
        a = self.fuse1(a + F.interpolate(self.up2(b), size=a.shape[-2:], mode="bilinear", align_corners=False))
        return self.out(a)


def grey(case: Case) -> torch.Tensor:
    """The image as the atlas sees it: H x W float 0..255."""
    return torch.from_numpy(to_rgb255(case.image).mean(axis=2).astype(np.float32))


def patch_grid(centres: torch.Tensor, cfg: RefinerConfig, angle=None, scale=None) -> torch.Tensor:
    """(B, P, P, 2) image px (x, y) of each patch sample: patch offsets rotated / scaled about the centre."""
    half = (cfg.patch - 1) / 2
    t = (torch.arange(cfg.patch, dtype=torch.float32) - half) * cfg.step
    offsets = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1)  # P x P x 2 (x, y)
    if angle is None:
        return centres[:, None, None] + offsets
    c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # B x 2 x 2
    return centres[:, None, None] + torch.einsum("bij,hwj->bhwi", rot, offsets)


def sample_patches(image: torch.Tensor, grid_px: torch.Tensor) -> torch.Tensor:
    """(B, 1, P, P) bilinear samples of one H x W image at (B, P, P, 2) px; outside the image: the edge value."""
    h, w = image.shape
    g = torch.stack([(2 * grid_px[..., 0] + 1) / w - 1, (2 * grid_px[..., 1] + 1) / h - 1], -1)
    return F.grid_sample(image[None, None].expand(len(g), 1, h, w), g, mode="bilinear", padding_mode="border",
                         align_corners=False)


def standardise(patches: torch.Tensor) -> torch.Tensor:
    mean = patches.mean((-1, -2), keepdim=True)
    std = patches.std((-1, -2), keepdim=True)
    return (patches - mean) / (std + 4.0)  # + 4 grey levels: flat patches stay near 0, not noise x 1000


def cell_centres(cfg: RefinerConfig) -> torch.Tensor:
    """(cells,) patch-sample coordinate of each output cell's centre, relative to the patch centre."""
    return (torch.arange(cfg.cells, dtype=torch.float32) * 2 + 0.5) - (cfg.patch - 1) / 2


def log_prior(cfg: RefinerConfig) -> torch.Tensor:
    """(cells, cells) log N(0, prior_sigma) over the output cells (the patch is centred on the atlas estimate)."""
    t = cell_centres(cfg) * cfg.step
    d2 = t[None, :] ** 2 + t[:, None] ** 2
    return -d2 / (2 * cfg.prior_sigma ** 2)


def decode(log_p: torch.Tensor, cfg: RefinerConfig) -> torch.Tensor:
    """(B, C, C) log-probabilities -> (B, 2) offsets (x, y) in image px from the patch centre: the probability-
    weighted mean over the 5 x 5 cells around the best one."""
    b, n, _ = log_p.shape
    best = log_p.reshape(b, -1).argmax(1)
    by, bx = best // n, best % n
    t = cell_centres(cfg)
    r = torch.arange(-2, 3)
    ys = (by[:, None] + r).clamp(0, n - 1)
    xs = (bx[:, None] + r).clamp(0, n - 1)
    window = log_p[torch.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]  # B x 5 x 5
    w = torch.softmax(window.reshape(b, -1), 1).reshape(b, 5, 5)
    x = (w * t[xs][:, None, :]).sum((1, 2))
    y = (w * t[ys][:, :, None]).sum((1, 2))
    return torch.stack([x, y], 1) * cfg.step


class Refiner:
    """Networks (one per fold) + config: `refine(image, points, present, radius_px, starts) -> Refined` for the
    landmarks in `use`."""

    def __init__(self, nets: list[PatchNet], cfg: RefinerConfig, use: np.ndarray):
        self.nets = [n.eval() for n in nets]
        self.cfg = cfg
        self.use = np.asarray(use, bool)

    @torch.inference_mode()
    def log_probs(self, image: torch.Tensor, centres: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, C, C) network log-probabilities (fold average) of landmarks `index` around `centres`."""
        x = standardise(sample_patches(image, patch_grid(centres, self.cfg)))
        total = 0
        for net in self.nets:
            out = net(x)[torch.arange(len(index)), index]
            total = total + torch.log_softmax(out.reshape(len(index), -1), 1).reshape(out.shape)
        return total / len(self.nets)

    def refine(self, image: torch.Tensor, points: np.ndarray, present: np.ndarray, radius_px: float,
               starts: np.ndarray | None = None, use=None) -> "Refined":
        """Points moved by the networks (image px), for present landmarks in `use` (default self.use).

        The networks refine from `points` (the atlas's fused estimate) and from each of `starts` (S x K x 2, the
        atlases' own votes; NaN where an atlas has none), each with the prior centred on its start; a landmark's
        answer is the median of those refinements, so that one start that leads to a neighbouring structure does
        not decide it. With it: the posterior probability within `radius_px` of the refinement from `points`, and
        how far the refinements lie from the answer (RMS px)."""
        use = self.use if use is None else np.asarray(use, bool)
        ks = np.flatnonzero(present & use)
        nan = np.full(len(points), np.nan)
        out = Refined(points.copy(), nan, nan.copy())
        if not len(ks):
            return out
        begin = np.stack([points] + [np.where(np.isfinite(s), s, points) for s in
                                     (starts if starts is not None else [])])[:, ks]  # starts x ks x 2
        centres = torch.from_numpy(begin.reshape(-1, 2)).float()
        log_p = self.log_probs(image, centres, torch.from_numpy(np.tile(ks, len(begin)))) + log_prior(self.cfg)
        offsets = decode(log_p, self.cfg)
        moved = (centres + offsets).double().numpy().reshape(begin.shape)
        out.points[ks] = np.median(moved, axis=0)
        out.mass[ks] = mass_within(log_p[:len(ks)], offsets[:len(ks)], radius_px, self.cfg).double().numpy()
        out.disagree[ks] = np.sqrt(np.mean(np.sum((moved - out.points[ks]) ** 2, axis=2), axis=0))
        return out


@dataclass
class Refined:
    """What the refiner made of one image's estimates (K each; NaN where a landmark was not refined)."""

    points: np.ndarray    # K x 2 px
    mass: np.ndarray      # posterior probability within the radius of the refinement from the fused estimate
    disagree: np.ndarray  # RMS px of the refinements from the several starts about the answer


def vote_starts(stack: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The atlases' votes (atlases x K x 2, as AtlasDetector.votes gives them) that the refiner starts from:
    those of the atlases that voted, NaN where a vote is none (off the image, or not asked)."""
    voted = np.isfinite(scores).any(axis=1)
    return np.where(np.isfinite(scores[voted])[..., None], stack[voted], np.nan)


def mass_within(log_p: torch.Tensor, offsets: torch.Tensor, radius_px: float, cfg: RefinerConfig) -> torch.Tensor:
    """(B,) posterior probability of the cells within `radius_px` of each decoded offset (B x 2 px)."""
    t = cell_centres(cfg) * cfg.step
    d2 = (t[None, None, :] - offsets[:, None, None, 0]) ** 2 + (t[None, :, None] - offsets[:, None, None, 1]) ** 2
    p = torch.softmax(log_p.reshape(len(log_p), -1), 1).reshape(log_p.shape)
    return (p * (d2 <= radius_px ** 2)).sum((1, 2))


def refined_evidence(evidence: Evidence, atlas_points, refined: Refined, spacing) -> Evidence:
    """The atlas's evidence and the refiner's: how far it moved each point (mm), its posterior mass there, and how
    far its refinements from the several votes lie from it (mm)."""
    moved = np.isfinite(refined.mass)
    shift = np.where(moved, np.linalg.norm((refined.points - atlas_points) * spacing, axis=1), np.nan)
    return replace(evidence, shift_mm=shift, mass=refined.mass, disagree_mm=refined.disagree * float(np.mean(spacing)))


class RefinedAtlasDetector:
    """atlas -> refiner, `detect(case) -> Landmarks`; `detect_both` also returns the atlas's own answer."""

    dim = 2

    def __init__(self, atlas, refiner: Refiner, meta: dict | None = None):
        self.atlas, self.refiner, self.meta = atlas, refiner, meta or {}
        self.names = atlas.names
        calibration = self.meta.get("estimate", {}).get("calibration")  # older adapters: the raw confidence
        self.calibration = Calibration.from_dict(calibration) if calibration else None

    def detect(self, case: Case, progress: Callback = None, cancel: Cancel = None) -> Landmarks:
        return self._detect(case, progress, cancel)[0]

    def detect_both(self, case: Case, progress: Callback = None, cancel: Cancel = None) -> tuple[Landmarks, Landmarks]:
        """The adapter's landmarks and the atlas's own answer from the same registrations, each with its own
        calibrated confidence (the atlas's is fitted on its cases on the first call)."""
        refined, found, evidence = self._detect(case, progress, cancel)
        return refined, calibrated(found, evidence, self.atlas.calibration(cancel=cancel))

    def _detect(self, case: Case, progress: Callback, cancel: Cancel) -> tuple[Landmarks, Landmarks, Evidence]:
        stack, scores = self.atlas.votes(case, progress=within(progress, 0.0, 0.95), cancel=cancel)
        check(cancel)
        report(progress, 0.95, "refining the atlas's estimates")
        found, evidence, refined, seen = refine_votes(self.atlas, self.refiner, case, stack, scores)
        landmarks = Landmarks(self.names, refined.points, found.confidence, found.present)
        if self.calibration is not None:
            landmarks = calibrated(landmarks, seen, self.calibration)
        return landmarks, found, evidence


def refine_votes(atlas, refiner: Refiner, case: Case, stack: np.ndarray, scores: np.ndarray
                 ) -> tuple[Landmarks, Evidence, Refined, Evidence]:
    """An atlas's fused estimate of its votes on `case` and its evidence, the refinement from it and from each vote,
    and the evidence of both: what detection gives, and what the fine-tune's review rule sees of its unannotated
    images, so the two never differ."""
    found, evidence = atlas.fuse_with_evidence(case, stack, scores)
    mm = np.array(case.spacing)
    refined = refiner.refine(grey(case), found.points, found.present, WITHIN_MM / float(mm.mean()),
                             vote_starts(stack, scores))
    return found, evidence, refined, refined_evidence(evidence, found.points, refined, mm)


def _local_stage_nested(atlas_settings: dict) -> dict:
    """Adapter files written before the local stage had settings of its own hold its fields at the top level."""
    flat = {"levels", "level_side", "iterations", "spread_mm", "rate", "fusion_ncc"}
    if "local" in atlas_settings or not flat & set(atlas_settings):
        return atlas_settings
    return {**{k: v for k, v in atlas_settings.items() if k not in flat},
            "local": {k: atlas_settings[k] for k in flat if k in atlas_settings}}


def load_refined_atlas(path) -> RefinedAtlasDetector:
    """The detector an atlas-refiner adapter describes; everything it needs is in the file (checksummed)."""
    tensors, meta = weight_files.load_weights(path)
    if meta.get("kind") != KIND:
        raise InputError(f"{path}: a {meta.get('kind')} file, not an atlas-refiner adapter")
    names = meta["landmark_names"]
    cases = []
    for j, info in enumerate(meta["cases"]):
        image = tensors[f"case{j}.image"].numpy()
        points = tensors[f"case{j}.points"].numpy()
        case = Case(image, tuple(info["spacing"]), Landmarks(names, points, present=np.isfinite(points).all(1)),
                    name=info["label"])
        if case_checksum(case, names) != info["sha256"]:
            raise InputError(f"{path}: atlas case {info['label']} does not match its checksum; the file is damaged")
        cases.append(case)
    from .atlas import AtlasDetector

    try:
        settings = from_dict(AtlasSettings, _local_stage_nested(meta["atlas_settings"]))
    except InputError as e:
        raise InputError(f"{path}: {e}; fine-tune it again") from None
    atlas = AtlasDetector(cases, settings)
    cfg = RefinerConfig(**meta["refiner"])
    nets = []
    for f in range(len(meta["folds"])):
        net = PatchNet(len(names), cfg.width)
        net.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"fold{f}.")})
        nets.append(net)
    return RefinedAtlasDetector(atlas, Refiner(nets, cfg, np.array(meta["use_refined"])), meta)
