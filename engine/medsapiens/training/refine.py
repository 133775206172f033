"""Fine-tuning on top of the atlas: learn a patch refiner from a few annotated cases, with an honest estimate.

Phases (each reports progress and checks cancel; nothing is written before the last one):
  atlas          leave-one-case-out atlas: each case detected by the atlas of the other cases, which gives the
                 atlas's error on unseen cases, its spread (the refiner's training offsets and prior), and the
                 starting points to score the refiner on.
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

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..case import Case
from ..errors import InputError, NotBetter
from ..io.checksum import image_checksum
from ..models import weight_files
from ..detectors.atlas import AtlasDetector, AtlasSettings
from ..detectors.refiner import (
    KIND,
    PatchNet,
    Refiner,
    RefinerConfig,
    case_checksum,
    cell_centres,
    grey,
    patch_grid,
    sample_patches,
    standardise,
)
from .loops import Cancelled, Progress, Settings, check_cases, fit

MAX_FOLDS = 5
ATLAS_WINS_P = 0.05  # a landmark stays the atlas's where a one-sided sign test says the refiner lost beyond chance


@dataclass(frozen=True)
class RefineSettings:
    steps: int = 600             # optimiser steps per fold (a warm start takes half)
    time_budget: float = 540.0   # seconds for the whole run, atlas phases included: training is cut short (and
                                 # says so) past it; 9 minutes, so that a user waits at most about 10
    batch: int = 32
    lr: float = 2e-3
    patch: int = 64
    width: int = 12
    max_rotation: float = 15.0   # degrees
    scale: tuple[float, float] = (0.9, 1.1)
    target_sigma: float = 1.0    # output cells
    offset_spread: float = 1.25  # training offsets ~ N(0, this x the atlas's error per axis)
    min_sigma_px: float = 2.0
    pseudo_share: float = 0.75   # share of each batch cut from unannotated images the atlas labelled (if given)
    max_unannotated: int = 50    # at most this many of them (evenly spaced): about 2.5 s of atlas each
    prior_scales: tuple[float, ...] = (1.0, 2.0, 4.0)  # prior spreads (x the atlas's error) tried on held-out cases
    seed: int = 0
    atlas: AtlasSettings = AtlasSettings()


REFINE_DEFAULTS = RefineSettings()


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
class FinetuneResult:
    path: Path | None
    steps: int
    seconds: float
    phase_seconds: dict
    estimate: dict
    better: bool

    def line(self) -> str:
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        return f"{self.path}  {self.steps} steps  {self.seconds:.1f} s  {phases}"


def finetune_on_atlas(cases: list[Case], out, *, unannotated: list[Case] = (), settings: RefineSettings = RefineSettings(),
                      progress=None, cancel=None, warm_start: bool = True, keep_worse: bool = False) -> FinetuneResult:
    """Fine-tune an atlas-refiner adapter from annotated cases and write it atomically to `out`; `unannotated`
    images of the same task (any landmarks they carry are ignored) are labelled by the atlas and add variety.

    Raises Cancelled (cancel() -> True; `out` untouched) or NotBetter (the refined landmarks were worse than the
    atlas's on held-out cases; `out` untouched unless keep_worse). A previous adapter at `out` for the same
    landmarks warm-starts the networks (half the steps)."""
    names = check_cases(cases)
    s = settings
    t_start = time.monotonic()
    phase_seconds: dict[str, float] = {}
    labels = [c.label for c in cases]
    if len(set(labels)) != len(labels):
        raise InputError(f"two training cases share a name ({', '.join(labels)}); give each case its own")
    folds = folds_of(len(cases))
    pool = _unannotated(unannotated, cases, s.max_unannotated)
    case_sums = [case_checksum(c, names) for c in cases]  # how the file names them; keys of stored atlas votes
    image_sums = [image_checksum(image) for image in pool]
    previous = _previous(out, names, s) if warm_start else None
    steps = s.steps if previous is None else max(1, min(s.steps // 2, previous["steps"] // (2 * len(folds))))
    # a warm start takes at most half the time of the run before it (or of the budget, if that is less)
    budget = s.time_budget if previous is None else min(s.time_budget, previous["seconds"]) / 2

    def check():
        if cancel and cancel():
            raise Cancelled("training cancelled")

    def report(phase, done, total, loss=float("nan"), t_phase=0.0, remaining=None):
        if progress:
            progress(Progress(done, done / max(total, 1), loss, t_phase, phase, total, remaining))

    # ---- atlas, leave one case out
    t0 = time.monotonic()
    atlas_loo = np.full((len(cases), len(names), 2), np.nan)
    for f, held in enumerate(folds):
        check()
        rest = [c for i, c in enumerate(cases) if i not in held]
        detector = AtlasDetector(rest, s.atlas)
        for i in held:
            check()
            found = detector.detect(cases[i]).subset(names)
            atlas_loo[i] = np.where(found.present[:, None], found.points, np.nan)
        report("atlas", f + 1, len(folds), t_phase=time.monotonic() - t0)
    truth = np.stack([c.landmarks.subset(names).points for c in cases])
    miss = atlas_loo - truth
    ok = np.isfinite(miss).all(axis=2)
    sigma = float(np.sqrt(np.mean(miss[ok] ** 2))) if ok.any() else 10.0  # px per axis
    sigma = max(sigma, s.min_sigma_px)
    step_px = max(1.0, 3 * sigma / ((s.patch - 1) / 2 - 6))
    cfg = RefinerConfig(s.patch, round(step_px, 3), s.width, round(sigma, 3))
    if previous is not None and previous["config"] != asdict(replace(cfg, prior_sigma=0, step=0)):
        previous = None  # another patch geometry: nothing to start from
        steps, budget = s.steps, s.time_budget
    phase_seconds["atlas"] = time.monotonic() - t0

    # ---- pseudo-labels: every case's atlas votes on each unannotated image once; each fold fuses only its own
    #      training cases' votes, so that its held-out cases stay unseen
    #      (votes the previous adapter stored for the same image and atlas case are reused, not run again)
    votes = []  # per labelled image: (atlas cases x K x 2, atlas cases x K)
    if pool:
        t0 = time.monotonic()
        atlas_all = AtlasDetector(cases, s.atlas)
        stored = previous["votes"] if previous is not None and previous["atlas_settings"] == _atlas_meta(s.atlas) \
            else {}
        for j, image in enumerate(pool):
            check()
            if time.monotonic() - t0 > budget / 2:  # at most half the time budget goes to labelling
                break
            votes.append(_votes(atlas_all, image, image_sums[j], case_sums, stored))
            report("pseudo-labels", j + 1, len(pool), t_phase=time.monotonic() - t0)
        pool, image_sums = pool[:len(votes)], image_sums[:len(votes)]
        phase_seconds["pseudo-labels"] = time.monotonic() - t0

    # ---- train one network per fold
    t0 = time.monotonic()
    nets, total_steps = [], 0
    for f, held in enumerate(folds):
        check()
        train_cases = [c for i, c in enumerate(cases) if i not in held]
        torch.manual_seed(s.seed + f)
        net = PatchNet(len(names), s.width)
        start = _warm(previous, {labels[i] for i in held})
        if start is not None:
            net.load_state_dict(start)
        keep = [i for i in range(len(cases)) if i not in held]
        pseudo = pseudo_labels(atlas_all, pool, votes, keep, names) if pool else []
        n_pseudo = int(round(s.batch * s.pseudo_share)) if pseudo else 0
        samplers = [(PatchSampler(train_cases, names, cfg, s, s.offset_spread * sigma), s.batch - n_pseudo)]
        if n_pseudo:
            samplers.append((PatchSampler(pseudo, names, cfg, s, s.offset_spread * sigma), n_pseudo))
        rng = np.random.default_rng(s.seed + f)

        def batch(_, samplers=samplers, rng=rng):
            return tuple(torch.cat(parts) for parts in zip(*(sp.batch(rng, n) for sp, n in samplers)))
        fold_budget = max(1.0, budget - (time.monotonic() - t_start)) / (len(folds) - f)
        train_settings = Settings(lr=s.lr, weight_decay=1e-4, steps=steps, time_budget=fold_budget, warmup=0.05,
                                  batch=s.batch, seed=s.seed)
        params = [{"params": list(net.parameters()), "weight_decay": 1e-4, "lr_scale": 1.0}]
        t_fold = time.monotonic()

        def fold_progress(p, f=f, t_fold=t_fold):
            spent = time.monotonic() - t0
            per_fold = (time.monotonic() - t_fold) / max(p.fraction, 1e-3)
            left = per_fold * (1 - p.fraction) + per_fold * (len(folds) - f - 1)
            report(f"train {f + 1}/{len(folds)}", p.step, steps, p.loss, spent, left)

        result = fit(net, params, batch, train_settings, torch.device("cpu"),
                     progress=fold_progress, cancel=cancel, loss_fn=soft_cross_entropy)
        total_steps += result["steps"]
        nets.append(net.eval())
    phase_seconds["train"] = time.monotonic() - t0

    # ---- estimate on the held-out cases
    t0 = time.monotonic()
    spacing = np.array([c.spacing for c in cases])[:, None, :]
    greys = [grey(c) for c in cases]
    tried = []  # per prior spread: (held-out MRE, config, refined points)
    everything = np.ones(len(names), bool)
    for scale in s.prior_scales:
        check()
        scaled = replace(cfg, prior_sigma=round(sigma * scale, 3))
        refined_loo = np.full_like(atlas_loo, np.nan)
        for f, held in enumerate(folds):
            refiner = Refiner([nets[f]], scaled, everything)
            for i in held:
                present = np.isfinite(atlas_loo[i]).all(axis=1)
                refined_loo[i] = refiner.refine(greys[i], atlas_loo[i], present)
        tried.append((np.nanmean(np.linalg.norm((refined_loo - truth) * spacing, axis=2)), scaled, refined_loo))
        report("estimate", len(tried), len(s.prior_scales), t_phase=time.monotonic() - t0)
    _, cfg, refined_loo = min(tried, key=lambda t: t[0])  # the first of equals: the narrower prior
    estimate = _estimate(names, labels, folds, atlas_loo, refined_loo, truth, spacing)
    estimate["prior_scale"] = round(cfg.prior_sigma / sigma, 3)
    phase_seconds["estimate"] = time.monotonic() - t0
    better = estimate["refined_mre_mm"] <= estimate["atlas_mre_mm"]

    # ---- save
    t0 = time.monotonic()
    report("save", 0, 1)
    check()
    seconds = time.monotonic() - t_start
    path = None
    if better or keep_worse:
        meta = {"landmark_names": names, "refiner": asdict(cfg), "atlas_settings": _atlas_meta(s.atlas),
                "cases": [{"label": c.label, "sha256": sha, "spacing": list(c.spacing)}
                          for c, sha in zip(cases, case_sums)],
                "folds": [[labels[i] for i in held] for held in folds], "estimate": estimate,
                "use_refined": estimate["use_refined"], "steps": total_steps, "steps_per_fold": steps,
                "unannotated_images": len(pool), "unannotated": [{"sha256": sha} for sha in image_sums],
                "warm_started": previous is not None,
                "train_seconds": round(seconds, 1),
                "schedule_complete": total_steps >= steps * len(folds)}
        tensors = {f"fold{f}.{k}": v for f, net in enumerate(nets) for k, v in net.state_dict().items()}
        for j, (stack, scores) in enumerate(votes):  # the atlas's votes, for the next warm start
            tensors[f"unannotated{j}.points"] = torch.from_numpy(stack)
            tensors[f"unannotated{j}.scores"] = torch.from_numpy(scores)
        for j, c in enumerate(cases):
            tensors[f"case{j}.image"] = greys[j].round().to(torch.uint8)
            tensors[f"case{j}.points"] = torch.from_numpy(c.landmarks.subset(names).points)
        path = weight_files.save_weights(out, tensors, meta, KIND)
    phase_seconds["save"] = time.monotonic() - t0
    result = FinetuneResult(path, total_steps, time.monotonic() - t_start,
                            {k: round(v, 1) for k, v in phase_seconds.items()}, estimate, better)
    if not better and not keep_worse:
        raise NotBetter(f"the fine-tuned adapter was worse than the atlas on held-out cases "
                        f"({estimate['refined_mre_mm']:.2f} vs {estimate['atlas_mre_mm']:.2f} mm MRE); "
                        f"{out} was not written - keep using the atlas of these cases", estimate)
    return result


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
    """atlas.votes(image), with the votes `stored` for this image and an atlas case run again only where missing."""
    known = stored.get(image_sum, {})
    missing = [i for i, sha in enumerate(case_sums) if sha not in known]
    stack = np.full((len(case_sums), len(atlas.names), 2), np.nan)
    scores = np.full((len(case_sums), len(atlas.names)), -np.inf)
    if missing:
        stack[missing], scores[missing] = atlas.votes(image, missing)
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
    return {k: (list(map(list, v)) if k == "levels" else v) for k, v in asdict(a).items()}


def _previous(out, names, s: RefineSettings) -> dict | None:
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
        votes[image["sha256"]] = {c["sha256"]: (points[i], scores[i]) for i, c in enumerate(meta["cases"])}
    return {"config": cfg, "nets": nets, "folds": meta["folds"], "steps": int(meta["steps"]),
            "seconds": float(meta["train_seconds"]), "votes": votes, "atlas_settings": meta["atlas_settings"]}


def _warm(previous: dict | None, held: set[str]) -> dict | None:
    """A previous fold network that never saw the held-out cases (so the estimate stays honest), or None."""
    if previous is None:
        return None
    for f, held_before in enumerate(previous["folds"]):
        seen = {c for g, h in enumerate(previous["folds"]) if g != f for c in h}
        if not (seen & held) and f in previous["nets"]:
            return previous["nets"][f]
    return None
