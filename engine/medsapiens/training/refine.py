"""Fine-tuning on top of the atlas: learn a patch refiner from a few annotated cases, with an honest estimate.

Phases (each reports progress and checks cancel; nothing is written before the last one):
  atlas          leave-one-case-out atlas: each case detected by the atlas of the other cases, which gives the
                 atlas's error on unseen cases, its spread (the refiner's training offsets and prior), and the
                 starting points to score the refiner on. The atlas's B-spline stage is tried on up to 5 of them
                 and kept for the adapter where it is clearly better there (hands: fingers move on their own).
  pseudo-labels  (with unannotated images of the task) each case's atlas votes on each image once; every fold
                 fuses the votes of its own training cases only, so its held-out cases stay unseen. Three cases
                 are few; tens of atlas-labelled images show the refiner how the anatomy varies (their labels
                 carry the atlas's error, which the true cases' share of every batch corrects).
  train          one refiner network per fold (the cases but the held-out ones, and the images labelled by their
                 atlas), on patches cut around the landmarks at offsets drawn from the atlas's error, rotated,
                 scaled and re-toned a little.
  estimate       each fold's network refines its held-out cases' atlas estimates: the adapter's error on unseen
                 cases, next to the atlas's, per landmark; the prior's spread is the one of `prior_scales` that
                 did best there. The adapter refines every landmark but those where the held-out cases show
                 the atlas better beyond chance.
  save           one file: the fold networks, the atlas cases (images and points, checksummed), the estimate.
The detector averages the fold networks, so the estimate describes networks that are all in the adapter.
Re-fine-tuning with an adapter at `out` warm-starts each fold from a previous network that did not see the
fold's held-out case, with at most half the previous run's steps in all (a case more means a fold more, so
half the steps per fold would not do) and half its time (or of the budget, if less); the atlas votes on the
unannotated images that the adapter stores are reused, so only a new case's atlas labels them.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..case import Case
from ..detectors.atlas import STAGE_TRIAL_CASES, AtlasDetector, stage_choice
from ..detectors.calibration import WITHIN_MM, Calibration, Evidence, fit_calibration
from ..detectors.refiner import (
    KIND,
    PatchNet,
    Refined,
    Refiner,
    RefinerConfig,
    case_checksum,
    cell_centres,
    grey,
    patch_grid,
    refine_votes,
    refined_evidence,
    sample_patches,
    standardise,
    vote_starts,
)
from ..errors import InputError, NotBetter
from ..io.checksum import image_checksum
from ..models import weight_files
from ..progress import Callback, Cancel, Progress, check, report, spans
from ..settings import REFINE_DEFAULTS, AtlasSettings, RefineSettings, TrainSettings
from .loops import FinetuneResult, check_cases, fit

MAX_FOLDS = 5
ATLAS_WINS_P = 0.05  # a landmark stays the atlas's where a one-sided sign test says the refiner lost beyond chance
# each phase's share of the progress bar (training takes most of the time)
PHASE_WEIGHTS = {"atlas": 0.15, "pseudo-labels": 0.25, "train": 0.8, "estimate": 0.05, "save": 0.0}


def folds_of(n: int) -> list[list[int]]:
    """Held-out case indices per fold: each case alone up to MAX_FOLDS cases, then round-robin groups."""
    if n < 2:
        raise InputError("fine-tuning on the atlas needs at least 2 annotated cases (3 or more recommended)")
    k = min(n, MAX_FOLDS)
    return [list(range(i, n, k)) for i in range(k)]


class PatchSampler:
    """Random training patches around the true landmarks of some cases, and their soft targets."""

    def __init__(self, cases: list[Case], names: list[str], cfg: RefinerConfig, s: RefineSettings, offset_px: float):
        self.cfg, self.s = cfg, s
        self.images = [grey(c) for c in cases]
        marks = [c.landmarks.subset(names) for c in cases]
        self.points = [torch.from_numpy(m.points).float() for m in marks]
        self.pairs = np.array([(i, k) for i, m in enumerate(marks) for k in np.flatnonzero(m.present)])
        self.offset_px = offset_px
        self.max_offset = ((cfg.patch - 1) / 2 - 6) * cfg.step * s.scale[0]  # the truth stays inside the patch
        self.cells = cell_centres(cfg)

    def batch(self, rng: np.random.Generator, size: int):
        s, cfg = self.s, self.cfg
        pick = self.pairs[rng.integers(0, len(self.pairs), size)]
        xs, ts, ks = [], [], []
        for i in np.unique(pick[:, 0]):
            k = torch.from_numpy(pick[pick[:, 0] == i, 1])
            n = len(k)
            truth = self.points[i][k]
            offset = torch.from_numpy(rng.normal(0, self.offset_px, (n, 2))).float()
            offset = offset.clamp(-self.max_offset, self.max_offset)
            angle = torch.from_numpy(np.deg2rad(rng.uniform(-s.max_rotation, s.max_rotation, n))).float()
            scale = torch.from_numpy(rng.uniform(*s.scale, n)).float()
            centre = truth + offset
            patches = sample_patches(self.images[i], patch_grid(centre, cfg, angle, scale))
            # where the truth lies in patch samples: the inverse rotation / scale of (truth - centre)
            c, sn = torch.cos(angle), torch.sin(angle)
            d = -offset / (scale[:, None] * cfg.step)
            local = torch.stack([c * d[:, 0] + sn * d[:, 1], -sn * d[:, 0] + c * d[:, 1]], 1)
            xs.append(self._tone(patches, rng)), ts.append(self._target(local)), ks.append(k)
        return torch.cat(xs), torch.cat(ts), torch.cat(ks)

    def _tone(self, patches: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Gamma 0.7-1.4 and a little noise per patch, then standardised (contrast and level drop out there)."""
        n = len(patches)
        gamma = torch.from_numpy(np.exp(rng.uniform(np.log(0.7), np.log(1.4), n))).float().view(n, 1, 1, 1)
        patches = 255 * (patches.clamp(0, 255) / 255) ** gamma
        noise = torch.from_numpy(rng.uniform(0, 4, n)).float().view(n, 1, 1, 1)
        patches = patches + noise * torch.from_numpy(rng.standard_normal(patches.shape)).float()
        return standardise(patches)

    def _target(self, local: torch.Tensor) -> torch.Tensor:
        """(n, C, C) normalised Gaussians (target_sigma cells) at `local` (patch samples from the centre)."""
        sig = 2 * self.s.target_sigma
        gx = torch.exp(-(self.cells[None] - local[:, :1]) ** 2 / (2 * sig ** 2))
        gy = torch.exp(-(self.cells[None] - local[:, 1:]) ** 2 / (2 * sig ** 2))
        t = gy[:, :, None] * gx[:, None, :]
        return t / t.sum((1, 2), keepdim=True)


def soft_cross_entropy(pred, target, index) -> torch.Tensor:
    """Cross-entropy of each patch's own landmark map against its soft target."""
    out = pred[torch.arange(len(index)), index]
    log_p = torch.log_softmax(out.reshape(len(index), -1), 1)
    return -(target.reshape(len(index), -1) * log_p).sum(1).mean()


@dataclass
class _Run:
    """One fine-tune's inputs and the state its phases hand on (nothing is written before the last phase)."""

    cases: list[Case]
    names: list[str]
    folds: list[list[int]]
    pool: list[Case]                 # the unannotated images to label
    case_sums: list[str]             # case_checksum of each case: how the file names them, keys of stored votes
    image_sums: list[str]            # image_checksum of each image of the pool
    settings: RefineSettings
    previous: dict | None            # the adapter at `out` to warm-start from
    steps: int                       # per fold
    budget: float                    # seconds for the whole run
    bar: dict                        # phase -> (start, end) on the progress bar
    progress: Callback
    cancel: Cancel
    t_start: float = field(default_factory=time.monotonic)
    seconds: dict = field(default_factory=dict)  # phase -> seconds
    atlas_stage: dict | None = None  # how the B-spline stage did where it was tried (_choose_stage)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.cases]

    def report(self, phase: str, fraction: float, message: str, **fields) -> None:
        """Progress of the whole run from `fraction` of one phase."""
        start, end = self.bar[phase]
        report(self.progress, start + (end - start) * fraction, message, phase=phase, **fields)


@dataclass
class _AtlasErrors:
    """The leave-one-case-out atlas: its estimates of each case, the truth, and the patch geometry its error
    asks for (sigma: its error per axis, px)."""

    estimates: np.ndarray            # cases x K x 2, NaN where not found
    truth: np.ndarray
    sigma: float
    config: RefinerConfig
    evidence: list[Evidence]         # per case: what the atlas saw of each estimate (its calibration's inputs)
    starts: list[np.ndarray]         # per case: its atlas's own votes (the refiner starts from each too)


def finetune_on_atlas(cases: list[Case], out, *, unannotated: list[Case] = (),
                      settings: RefineSettings = REFINE_DEFAULTS, progress: Callback = None, cancel: Cancel = None,
                      warm_start: bool = True, keep_worse: bool = False) -> FinetuneResult:
    """Fine-tune an atlas-refiner adapter from annotated cases and write it atomically to `out`; `unannotated`
    images of the same task (any landmarks they carry are ignored) are labelled by the atlas and add variety.

    Raises Cancelled (cancel() -> True; `out` untouched) or NotBetter (the refined landmarks were worse than the
    atlas's on held-out cases; `out` untouched unless keep_worse). A previous adapter at `out` for the same
    landmarks warm-starts the networks (half the steps)."""
    run = _start(cases, unannotated, out, settings, progress, cancel, warm_start)
    atlas = _atlas_phase(run)
    votes = _pseudo_label_phase(run)
    nets, steps = _train_phase(run, atlas, votes)
    estimate, config = _estimate_phase(run, atlas, nets, votes)
    better = estimate["refined_mre_mm"] <= estimate["atlas_mre_mm"]
    path = _save_phase(run, out, config, nets, votes, estimate, steps) if better or keep_worse else None
    result = FinetuneResult(path, steps, time.monotonic() - run.t_start,
                            {k: round(v, 1) for k, v in run.seconds.items()}, estimate, better)
    if not better and not keep_worse:
        raise NotBetter("the fine-tuned adapter was not better than the atlas on held-out cases "
                        f"({_estimate_figures(estimate)}); nothing was saved and the previous detector is kept",
                        estimate)
    return result


def _estimate_figures(est: dict) -> str:
    """'adapter 2.31 mm, atlas 2.05 mm, leave-one-case-out on 3 cases'."""
    mm = lambda v: "n/a" if v is None else f"{v:.2f} mm"  # noqa: E731
    cases = sum(len(h) for h in est["held_out_cases"])
    return f"adapter {mm(est['refined_mre_mm'])}, atlas {mm(est['atlas_mre_mm'])}, {est['method']} on {cases} cases"


def _start(cases, unannotated, out, s: RefineSettings, progress, cancel, warm_start) -> _Run:
    """Check the cases, pick the images to label, and size the run: a warm start takes at most half the steps
    of the run before it in all (a case more is a fold more) and half its time (or of the budget, if less)."""
    names = check_cases(cases)
    labels = [c.label for c in cases]
    if len(set(labels)) != len(labels):
        raise InputError(f"two training cases share a name ({', '.join(labels)}); give each case its own")
    folds = folds_of(len(cases))
    pool = _unannotated(unannotated, cases, s.max_unannotated)
    previous = _previous(out, names) if warm_start else None
    steps = s.steps if previous is None else max(1, min(s.steps // 2, previous["steps"] // (2 * len(folds))))
    budget = s.time_budget if previous is None else min(s.time_budget, previous["seconds"]) / 2
    bar = spans({k: w for k, w in PHASE_WEIGHTS.items() if pool or k != "pseudo-labels"})
    run = _Run(cases, names, folds, pool, [case_checksum(c, names) for c in cases],
               [image_checksum(image) for image in pool], s, previous, steps, budget, bar, progress, cancel)
    run.report("atlas", 0.0, f"atlas of the other cases: 0 of {len(folds)} held out", step=0, total=len(folds))
    return run


def _atlas_phase(run: _Run) -> _AtlasErrors:
    """Each case detected by the atlas of the others: the atlas's error on unseen cases, its spread (the
    refiner's training offsets and prior), and the starting points the refiner is scored from. Unless the
    settings ask for it already, the atlas's B-spline stage is tried on a few of them (`_choose_stage`)."""
    t0, n = time.monotonic(), len(run.cases)
    _keep_previous_stage(run)
    if _stage_to_try(run):
        trial = min(n, STAGE_TRIAL_CASES)
        bars = np.array([0, trial, 3 * trial, 3 * trial + 2 * (n - trial)]) / (3 * trial + 2 * (n - trial))
        held = _choose_stage(run, list(range(trial)), bars[:3])  # then the stage chosen for the other cases
        held = _leave_one_out(run, run.settings.atlas, range(trial, n), (bars[2], 1.0), into=held)
    else:
        held = _leave_one_out(run, run.settings.atlas, range(n), (0.0, 1.0))
    s = run.settings
    truth = _truth(run)
    miss = held.estimates - truth
    ok = np.isfinite(miss).all(axis=2)
    sigma = max(float(np.sqrt(np.mean(miss[ok] ** 2))) if ok.any() else 10.0, s.min_sigma_px)  # px per axis
    step_px = max(1.0, 3 * sigma / ((s.patch - 1) / 2 - 6))
    config = RefinerConfig(s.patch, round(step_px, 3), s.width, round(sigma, 3))
    if run.previous is not None and run.previous["config"] != asdict(replace(config, prior_sigma=0, step=0)):
        run.previous, run.steps, run.budget = None, s.steps, s.time_budget  # another patch geometry: start over
    run.seconds["atlas"] = time.monotonic() - t0
    return _AtlasErrors(held.estimates, truth, sigma, config, held.evidence, held.starts)


@dataclass
class _HeldOut:
    """What the atlas of the other cases made of each case (NaN / None for the cases not yet detected)."""

    estimates: np.ndarray            # cases x K x 2 px, NaN where not found
    evidence: list                   # per case: Evidence
    starts: list                     # per case: its atlas's own votes


def _leave_one_out(run: _Run, settings: AtlasSettings, which, bar: tuple[float, float],
                   into: _HeldOut | None = None) -> _HeldOut:
    """Cases `which`, each detected by the atlas of the cases outside its fold (the atlas phase's share `bar`
    of the progress bar)."""
    n, t0 = len(run.cases), time.monotonic()
    held = into or _HeldOut(np.full((n, len(run.names), 2), np.nan), [None] * n, [None] * n)
    which = set(which)
    folds = [(f, [i for i in fold if i in which]) for f, fold in enumerate(run.folds)]
    folds = [(f, cases) for f, cases in folds if cases]
    what = "atlas of the other cases" + (" with its B-spline stage" if settings.deformable else "")
    for done, (f, cases) in enumerate(folds, 1):
        check(run.cancel, "training cancelled")
        detector = AtlasDetector([c for i, c in enumerate(run.cases) if i not in run.folds[f]], settings)
        for i in cases:
            check(run.cancel, "training cancelled")
            stack, scores = detector.votes(run.cases[i])
            found, held.evidence[i] = detector.fuse_with_evidence(run.cases[i], stack, scores)
            held.estimates[i] = np.where(found.present[:, None], found.points, np.nan)
            held.starts[i] = vote_starts(stack, scores)
        run.report("atlas", bar[0] + (bar[1] - bar[0]) * done / len(folds), _phase_line(
            what, done, len(folds), " held out", time.monotonic() - t0), step=done, total=len(folds))
    return held


def _stage_to_try(run: _Run) -> bool:
    """Whether to try the atlas's B-spline stage: not where the settings ask for it already or turn the trial
    off, nor on a warm start (it keeps its previous adapter's stage: `_keep_previous_stage`)."""
    s = run.settings
    return s.try_deformable and not s.atlas.deformable and run.previous is None


def _keep_previous_stage(run: _Run) -> None:
    """A warm start where the trial is on keeps the stage its previous adapter chose (and how it did then): an
    Add case costs no second trial."""
    s = run.settings
    if run.previous is None or not s.try_deformable or s.atlas.deformable:
        return
    if run.previous["atlas_settings"].get("deformable"):
        run.settings = replace(s, atlas=replace(s.atlas, deformable=True))
    run.atlas_stage = run.previous["atlas_stage"]


def _choose_stage(run: _Run, trial: list[int], bars) -> _HeldOut:
    """The first cases (`trial`), each detected by the atlas of the others without and with the B-spline stage
    (fingers that moved on their own): the stage is kept, for the whole adapter, where `stage_choice` finds it
    clearly better. `bars`: where the two passes start and end on the progress bar. Returns the kept stage's
    detections."""
    flexible = replace(run.settings.atlas, deformable=True)
    affine = _leave_one_out(run, run.settings.atlas, trial, (bars[0], bars[1]))
    bspline = _leave_one_out(run, flexible, trial, (bars[1], bars[2]))
    run.atlas_stage = stage_choice(_mre_mm(run, affine.estimates, trial), _mre_mm(run, bspline.estimates, trial),
                                   len(trial))
    if run.atlas_stage["bspline"]:
        run.settings = replace(run.settings, atlas=flexible)
    return bspline if run.atlas_stage["bspline"] else affine


def _truth(run: _Run) -> np.ndarray:
    return np.stack([c.landmarks.subset(run.names).points for c in run.cases])


def _mre_mm(run: _Run, estimates: np.ndarray, which: list[int]) -> float:
    spacing = np.array([run.cases[i].spacing for i in which])[:, None, :]
    return float(np.nanmean(np.linalg.norm((estimates[which] - _truth(run)[which]) * spacing, axis=2)))


def _pseudo_label_phase(run: _Run) -> list:
    """The atlas cases most like each unannotated image vote on it once (for at most half of the budget that the
    atlas phase left); each fold
    fuses only its own training cases' votes later, so that its held-out cases stay unseen. Votes the previous
    adapter stored for the same image and atlas case are reused, not run again."""
    if not run.pool:
        return []
    t0, s = time.monotonic(), run.settings
    allowed = (run.budget - (t0 - run.t_start)) / 2  # the other half of what is left is training's
    atlas = AtlasDetector(run.cases, s.atlas)
    stored = run.previous["votes"] if run.previous is not None and \
        run.previous["atlas_settings"] == _atlas_meta(s.atlas) else {}
    votes = []  # per labelled image: (atlas cases x K x 2, atlas cases x K)
    for j, image in enumerate(run.pool):
        check(run.cancel, "training cancelled")
        if j and time.monotonic() - t0 > allowed:  # the first image always: asked for, never silently dropped
            break
        votes.append(_votes(atlas, image, run.image_sums[j], run.case_sums, stored))
        run.report("pseudo-labels", (j + 1) / len(run.pool), _phase_line(
            "atlas labelling the unannotated images", j + 1, len(run.pool), "", time.monotonic() - t0),
            step=j + 1, total=len(run.pool))
    run.pool, run.image_sums = run.pool[:len(votes)], run.image_sums[:len(votes)]
    run.seconds["pseudo-labels"] = time.monotonic() - t0
    return votes


def _phase_line(what: str, done: int, total: int, unit: str, spent: float) -> str:
    """'what: 2 of 5 held out, about 40 s left in this phase' (the time only while the phase runs)."""
    left = f", about {spent / done * (total - done):.0f} s left in this phase" if 0 < done < total else ""
    return f"{what}: {done} of {total}{unit}{left}"


def _train_phase(run: _Run, atlas: _AtlasErrors, votes: list) -> tuple[list[PatchNet], int]:
    """One refiner network per fold, on the fold's cases and the images its own atlas labelled; each fold gets
    its share of what is left of the budget."""
    t0 = time.monotonic()
    fuser = AtlasDetector(run.cases, run.settings.atlas) if run.pool else None
    nets, total = [], 0
    for f, held in enumerate(run.folds):
        check(run.cancel, "training cancelled")
        net, steps = _train_fold(run, atlas, f, held, pseudo_labels(fuser, run.pool, votes, _kept(run, held),
                                                                     run.names) if run.pool else [], t0)
        nets.append(net)
        total += steps
    run.seconds["train"] = time.monotonic() - t0
    return nets, total


def pseudo_share(cases: int, labelled: int, case_weight: float) -> float:
    """The share of each batch cut from the images the atlas labelled: an annotated case is worth case_weight of
    them, so the share falls as cases are added (20 cases + 30 images: 0.23) instead of outweighing the truth."""
    return labelled / (labelled + case_weight * cases)


def _kept(run: _Run, held: list[int]) -> list[int]:
    return [i for i in range(len(run.cases)) if i not in held]


def _train_fold(run: _Run, atlas: _AtlasErrors, f: int, held: list[int], pseudo: list[Case], t0: float):
    """The fold's network (warm-started from a previous one that never saw its held-out cases) and its steps."""
    s, n = run.settings, len(run.folds)
    torch.manual_seed(s.seed + f)
    net = PatchNet(len(run.names), s.width)
    start = _warm(run.previous, {run.labels[i] for i in held})
    if start is not None:
        net.load_state_dict(start)
    n_pseudo = int(round(s.batch * pseudo_share(len(run.cases), len(pseudo), s.case_weight)))
    spread = s.offset_spread * atlas.sigma
    samplers = [(PatchSampler([run.cases[i] for i in _kept(run, held)], run.names, atlas.config, s, spread),
                 s.batch - n_pseudo)]
    if n_pseudo:
        samplers.append((PatchSampler(pseudo, run.names, atlas.config, s, spread), n_pseudo))
    rng = np.random.default_rng(s.seed + f)

    def batch(_):
        return tuple(torch.cat(parts) for parts in zip(*(sp.batch(rng, k) for sp, k in samplers)))

    fold_budget = max(1.0, run.budget - (time.monotonic() - run.t_start)) / (n - f)
    t_fold = time.monotonic()

    def step(p: Progress) -> None:  # the whole training's time left: this fold's and the folds after it
        per_fold = (time.monotonic() - t_fold) / max(p.fraction, 1e-3)
        left = per_fold * (1 - p.fraction) + per_fold * (n - f - 1)
        run.report("train", (f + p.fraction) / n, f"training network {f + 1} of {n}: step {p.step} of "
                   f"{run.steps}, about {left:.0f} s of training left", step=p.step, total=run.steps, loss=p.loss,
                   remaining=left)

    result = fit(net, [{"params": list(net.parameters()), "weight_decay": 1e-4, "lr_scale": 1.0}], batch,
                 TrainSettings(lr=s.lr, weight_decay=1e-4, steps=run.steps, time_budget=fold_budget, warmup=0.05,
                               batch=s.batch, seed=s.seed), torch.device("cpu"), progress=step, cancel=run.cancel,
                 loss_fn=soft_cross_entropy)
    return net.eval(), result["steps"]


def _estimate_phase(run: _Run, atlas: _AtlasErrors, nets: list[PatchNet],
                    votes: list) -> tuple[dict, RefinerConfig]:
    """Each fold's network refines its held-out cases' atlas estimates, for each prior spread tried: the
    adapter's error on unseen cases next to the atlas's, per landmark; the best prior is kept, and the model
    of the adapter's error (its calibrated confidence and review rule) is fitted on those held-out points; the
    rule flags at most its share of the points on the unannotated images (`votes`: the atlas's on them) too."""
    t0 = time.monotonic()
    spacing = np.array([c.spacing for c in run.cases])[:, None, :]
    greys = [grey(c) for c in run.cases]
    tried = []  # per prior spread: (held-out MRE, config, per case its Refined)
    for scale in run.settings.prior_scales:
        check(run.cancel, "training cancelled")
        config = replace(atlas.config, prior_sigma=round(atlas.sigma * scale, 3))
        refined = [None] * len(run.cases)
        for f, held in enumerate(run.folds):
            refiner = Refiner([nets[f]], config, np.ones(len(run.names), bool))
            for i in held:
                refined[i] = refiner.refine(greys[i], atlas.estimates[i], np.isfinite(atlas.estimates[i]).all(1),
                                            WITHIN_MM / float(spacing[i].mean()), atlas.starts[i])
        points = np.stack([r.points for r in refined])
        tried.append((np.nanmean(np.linalg.norm((points - atlas.truth) * spacing, axis=2)), config, refined))
        run.report("estimate", len(tried) / len(run.settings.prior_scales), "measuring the error on held-out cases")
    _, config, refined = min(tried, key=lambda t: t[0])  # the first of equals: the narrower prior
    points = np.stack([r.points for r in refined])
    estimate = _estimate(run.names, run.labels, run.folds, atlas.estimates, points, atlas.truth, spacing)
    estimate["prior_scale"] = round(config.prior_sigma / atlas.sigma, 3)
    estimate["atlas_stage"] = run.atlas_stage
    use = np.array(estimate["use_refined"])
    estimate["calibration"] = _calibrate(atlas, refined, use, spacing,
                                         _unlabelled_evidence(run, Refiner(nets, config, use), votes)).to_dict()
    run.seconds["estimate"] = time.monotonic() - t0
    return estimate, config


def _calibrate(atlas: _AtlasErrors, refined: list[Refined], use: np.ndarray, spacing,
               unlabelled: list[tuple[Evidence, np.ndarray]]) -> Calibration:
    """The adapter's confidence model, on the points it would give on its held-out cases (refined where it
    refines, the atlas's elsewhere) and what it saw of each; `unlabelled`: what it sees of its unannotated
    images (the review rule flags at most its share of those too)."""
    nan = np.full(len(use), np.nan)
    chosen = [Refined(np.where(use[:, None], r.points, a), np.where(use, r.mass, nan), np.where(use, r.disagree, nan))
              for r, a in zip(refined, atlas.estimates)]
    evidence = [refined_evidence(e, a, c, s[0]) for e, a, c, s in zip(atlas.evidence, atlas.estimates, chosen, spacing)]
    error = np.linalg.norm((np.stack([c.points for c in chosen]) - atlas.truth) * spacing, axis=2)
    n, k = error.shape
    ok = np.isfinite(error).ravel()
    return fit_calibration(Evidence.stack(evidence).select(ok), error.ravel()[ok], np.repeat(np.arange(n), k)[ok],
                           np.tile(np.arange(k), n)[ok], k,
                           lambda model: np.concatenate([[]] + [model.probability(e)[found] for e, found in unlabelled]))


def _unlabelled_evidence(run: _Run, refiner: Refiner, votes: list) -> list[tuple[Evidence, np.ndarray]]:
    """What the adapter sees of each unannotated image as it will detect (all its cases' votes, all its networks),
    and which landmarks it finds there: the points of which its review rule may flag only its share."""
    fuser = AtlasDetector(run.cases, run.settings.atlas) if run.pool else None
    seen = []
    for image, (stack, scores) in zip(run.pool, votes):
        check(run.cancel, "training cancelled")
        found, _, _, evidence = refine_votes(fuser, refiner, image, stack, scores)
        seen.append((evidence, found.present))
    return seen


def _save_phase(run: _Run, out, config: RefinerConfig, nets, votes, estimate: dict, steps: int) -> Path:
    """One file, written atomically: the fold networks, the atlas cases (images and points, checksummed), the
    atlas's votes on the unannotated images (for the next warm start) and the estimate."""
    t0 = time.monotonic()
    run.report("save", 0.0, "saving")
    check(run.cancel, "training cancelled")
    meta = {"landmark_names": run.names, "refiner": asdict(config), "atlas_settings": _atlas_meta(run.settings.atlas),
            "cases": [{"label": c.label, "sha256": sha, "spacing": list(c.spacing)}
                      for c, sha in zip(run.cases, run.case_sums)],
            "folds": [[run.labels[i] for i in held] for held in run.folds], "estimate": estimate,
            "use_refined": estimate["use_refined"], "steps": steps, "steps_per_fold": run.steps,
            "unannotated_images": len(run.pool), "unannotated": [{"sha256": sha} for sha in run.image_sums],
            "warm_started": run.previous is not None, "train_seconds": round(time.monotonic() - run.t_start, 1),
            "schedule_complete": steps >= run.steps * len(run.folds)}
    tensors = {f"fold{f}.{k}": v for f, net in enumerate(nets) for k, v in net.state_dict().items()}
    for j, (stack, scores) in enumerate(votes):
        tensors[f"unannotated{j}.points"] = torch.from_numpy(stack)
        tensors[f"unannotated{j}.scores"] = torch.from_numpy(scores)
    for j, c in enumerate(run.cases):
        tensors[f"case{j}.image"] = grey(c).round().to(torch.uint8)
        tensors[f"case{j}.points"] = torch.from_numpy(c.landmarks.subset(run.names).points)
    path = weight_files.save_weights(out, tensors, meta, KIND)
    run.seconds["save"] = time.monotonic() - t0
    return path


def _estimate(names, labels, folds, atlas_loo, refined_loo, truth, spacing) -> dict:
    """Held-out errors (mm): overall and per landmark, atlas vs refined; which landmarks to refine."""
    err_a = np.linalg.norm((atlas_loo - truth) * spacing, axis=2)  # cases x K, NaN where missing
    err_r = np.linalg.norm((refined_loo - truth) * spacing, axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a landmark no held-out case has: NaN, said as None
        a_k, r_k = np.nanmean(err_a, 0), np.nanmean(err_r, 0)
    # With a handful of held-out cases a landmark's mean error is mostly noise (one case swings it by
    # millimetres), and 19 landmarks compared on 3 cases make a few look better with the atlas by chance alone.
    # The adapter is kept only when the refiner was better overall, so it refines every landmark except where
    # the held-out cases show the atlas better beyond chance (a one-sided sign test: with 3 or 4 cases no
    # landmark can show that; with 5 the refiner must lose on all of them).
    both = np.isfinite(err_a) & np.isfinite(err_r)
    lost, cases = ((err_r > err_a) & both).sum(0), both.sum(0)
    use = [bool(np.isfinite(r) and not atlas_wins(l, n)) for r, l, n in zip(r_k, lost, cases)]
    chosen = np.where(np.array(use)[None], err_r, err_a)
    rnd = lambda v: None if not np.isfinite(v) else round(float(v), 3)  # noqa: E731
    return {"method": "leave-one-case-out" if all(len(h) == 1 for h in folds) else f"{len(folds)}-fold",
            "held_out_cases": [[labels[i] for i in h] for h in folds],
            "atlas_mre_mm": rnd(np.nanmean(err_a)), "refined_mre_mm": rnd(np.nanmean(err_r)),
            "chosen_mre_mm": rnd(np.nanmean(chosen)),
            "per_landmark": {n: {"atlas_mm": rnd(a), "refined_mm": rnd(r)} for n, a, r in zip(names, a_k, r_k)},
            "use_refined": use}


def atlas_wins(lost: int, cases: int) -> bool:
    """Whether a refiner that lost to the atlas on `lost` of `cases` held-out cases did so beyond chance: the
    probability of losing that often if the two were equally good (one-sided sign test) is below ATLAS_WINS_P."""
    p = sum(math.comb(int(cases), k) for k in range(int(lost), int(cases) + 1)) / 2 ** int(cases)
    return cases > 0 and p < ATLAS_WINS_P


def pseudo_labels(atlas: AtlasDetector, images: list[Case], votes: list, keep: list[int], names) -> list[Case]:
    """The images with the landmarks that the atlas cases `keep` alone give them (fused from their votes, as
    `atlas.votes` gave them); images where none was found are left out."""
    labelled = []
    for image, (stack, scores) in zip(images, votes):
        found = atlas.fuse(image, stack[keep], scores[keep]).subset(names)
        if found.present.any():
            labelled.append(replace(image, landmarks=found))
    return labelled


def _votes(atlas: AtlasDetector, image: Case, image_sum: str, case_sums: list[str], stored: dict):
    """atlas.votes(image): the votes `stored` for this image, and those of the most similar cases that are not."""
    known = stored.get(image_sum, {})
    missing = [i for i in atlas.nearest_to(image) if case_sums[i] not in known]
    stack, scores = atlas.votes(image, missing)  # all cases' rows; those not asked hold no vote
    for i, sha in enumerate(case_sums):
        if sha in known:
            stack[i], scores[i] = known[sha]
    return stack, scores


def _unannotated(images, cases: list[Case], most: int) -> list[Case]:
    """The images to pseudo-label: 2D, not an annotated case's image, at most `most` (evenly spaced)."""
    pool = []
    for image in images:
        if not isinstance(image, Case):
            raise InputError(f"{image.label}: a 3D volume; fine-tuning on the atlas learns from 2D images")
        if not any(image.image.shape == c.image.shape and np.array_equal(image.image, c.image) for c in cases):
            pool.append(image)
    if len(pool) > most:
        pool = [pool[i] for i in np.linspace(0, len(pool) - 1, most).round().astype(int)]
    return pool


def _atlas_meta(a: AtlasSettings) -> dict:
    """The atlas settings as the adapter file stores them (JSON: tuples become lists)."""
    return json.loads(json.dumps(asdict(a)))


def _previous(out, names) -> dict | None:
    """The adapter at `out`, if it is an atlas-refiner for these landmarks: its fold networks and folds."""
    out = Path(out)
    if not (out.is_file() and weight_files.is_weights_file(out)):
        return None
    tensors, meta = weight_files.load_weights(out)
    if meta.get("kind") != KIND or meta.get("landmark_names") != names:
        return None
    nets = {}
    for key, v in tensors.items():
        if key.startswith("fold"):
            f, name = key.split(".", 1)
            nets.setdefault(int(f[4:]), {})[name] = v
    cfg = dict(meta["refiner"], prior_sigma=0, step=0)
    votes = {}  # image SHA256 -> {atlas case SHA256 -> (points K x 2, local NCC K)}
    for j, image in enumerate(meta.get("unannotated", [])):
        points, scores = tensors[f"unannotated{j}.points"].numpy(), tensors[f"unannotated{j}.scores"].numpy()
        votes[image["sha256"]] = {c["sha256"]: (points[i], scores[i]) for i, c in enumerate(meta["cases"])
                                  if np.isfinite(scores[i]).any()}  # a case not asked then (not nearest) may vote later
    return {"config": cfg, "nets": nets, "folds": meta["folds"], "steps": int(meta["steps"]),
            "seconds": float(meta["train_seconds"]), "votes": votes, "atlas_settings": meta["atlas_settings"],
            "atlas_stage": meta["estimate"].get("atlas_stage")}


def _warm(previous: dict | None, held: set[str]) -> dict | None:
    """A previous fold network that never saw the held-out cases (so the estimate stays honest), or None."""
    if previous is None:
        return None
    for f, held_before in enumerate(previous["folds"]):
        seen = {c for g, h in enumerate(previous["folds"]) if g != f for c in h}
        if not (seen & held) and f in previous["nets"]:
            return previous["nets"][f]
    return None
