"""Fine-tuning on top of the atlas: learn a patch refiner from a few annotated cases, with an honest estimate.

Phases (each reports progress and checks cancel; nothing is written before the last one):
  atlas     leave-one-case-out atlas: each case detected by the atlas of the other cases, which gives the
            atlas's error on unseen cases, its spread (the refiner's training offsets and prior), and the
            starting points to score the refiner on.
  train     one refiner network per fold (the cases but the held-out ones), on patches cut around the true
            landmarks at offsets drawn from the atlas's error, rotated, scaled and re-toned a little.
  estimate  each fold's network refines its held-out cases' atlas estimates: the adapter's error on unseen
            cases, next to the atlas's, per landmark. The adapter refines the landmarks where that was better.
  save      one file: the fold networks, the atlas cases (images and points, checksummed), the estimate.
The detector averages the fold networks, so the estimate describes networks that are all in the adapter.
Re-fine-tuning with an adapter at `out` warm-starts each fold from a previous network that did not see the
fold's held-out case, with at most half the previous run's steps in all (a case more means a fold more, so
half the steps per fold would not do) and half the time budget.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..case import Case
from ..errors import InputError, NotBetter
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


@dataclass(frozen=True)
class RefineSettings:
    steps: int = 600             # optimiser steps per fold (a warm start takes half)
    time_budget: float = 420.0   # seconds for all folds together: the schedule is cut short (and says so) past it
    batch: int = 32
    lr: float = 2e-3
    patch: int = 64
    width: int = 12
    max_rotation: float = 15.0   # degrees
    scale: tuple[float, float] = (0.9, 1.1)
    target_sigma: float = 1.0    # output cells
    offset_spread: float = 1.25  # training offsets ~ N(0, this x the atlas's error per axis)
    min_sigma_px: float = 2.0
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

    def batch(self, rng: np.random.Generator):
        s, cfg = self.s, self.cfg
        pick = self.pairs[rng.integers(0, len(self.pairs), s.batch)]
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


def finetune_on_atlas(cases: list[Case], out, *, settings: RefineSettings = RefineSettings(), progress=None,
                      cancel=None, warm_start: bool = True, keep_worse: bool = False) -> FinetuneResult:
    """Fine-tune an atlas-refiner adapter from annotated cases and write it atomically to `out`.

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
    previous = _previous(out, names, s) if warm_start else None
    steps = s.steps if previous is None else max(1, min(s.steps // 2, previous["steps"] // (2 * len(folds))))
    budget = s.time_budget if previous is None else s.time_budget / 2

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
        sampler = PatchSampler(train_cases, names, cfg, s, s.offset_spread * sigma)
        rng = np.random.default_rng(s.seed + f)
        fold_budget = max(1.0, budget - (time.monotonic() - t0)) / (len(folds) - f)
        train_settings = Settings(lr=s.lr, weight_decay=1e-4, steps=steps, time_budget=fold_budget, warmup=0.05,
                                  batch=s.batch, seed=s.seed)
        params = [{"params": list(net.parameters()), "weight_decay": 1e-4, "lr_scale": 1.0}]
        t_fold = time.monotonic()

        def fold_progress(p, f=f, t_fold=t_fold):
            spent = time.monotonic() - t0
            per_fold = (time.monotonic() - t_fold) / max(p.fraction, 1e-3)
            left = per_fold * (1 - p.fraction) + per_fold * (len(folds) - f - 1)
            report(f"train {f + 1}/{len(folds)}", p.step, steps, p.loss, spent, left)

        result = fit(net, params, lambda _: sampler.batch(rng), train_settings, torch.device("cpu"),
                     progress=fold_progress, cancel=cancel, loss_fn=soft_cross_entropy)
        total_steps += result["steps"]
        nets.append(net.eval())
    phase_seconds["train"] = time.monotonic() - t0

    # ---- estimate on the held-out cases
    t0 = time.monotonic()
    refined_loo = np.full_like(atlas_loo, np.nan)
    everything = np.ones(len(names), bool)
    for f, held in enumerate(folds):
        check()
        refiner = Refiner([nets[f]], cfg, everything)
        for i in held:
            present = np.isfinite(atlas_loo[i]).all(axis=1)
            refined_loo[i] = refiner.refine(grey(cases[i]), atlas_loo[i], present)
        report("estimate", f + 1, len(folds), t_phase=time.monotonic() - t0)
    spacing = np.array([c.spacing for c in cases])[:, None, :]
    estimate = _estimate(names, labels, folds, atlas_loo, refined_loo, truth, spacing)
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
                "cases": [{"label": c.label, "sha256": case_checksum(c, names), "spacing": list(c.spacing)}
                          for c in cases],
                "folds": [[labels[i] for i in held] for held in folds], "estimate": estimate,
                "use_refined": estimate["use_refined"], "steps": total_steps, "steps_per_fold": steps,
                "warm_started": previous is not None, "train_seconds": round(seconds, 1),
                "schedule_complete": total_steps >= steps * len(folds)}
        tensors = {f"fold{f}.{k}": v for f, net in enumerate(nets) for k, v in net.state_dict().items()}
        for j, c in enumerate(cases):
            tensors[f"case{j}.image"] = grey(c).round().to(torch.uint8)
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
    use = [bool(np.isfinite(r) and (not np.isfinite(a) or r <= a)) for a, r in zip(a_k, r_k)]
    chosen = np.where(np.array(use)[None], err_r, err_a)
    rnd = lambda v: None if not np.isfinite(v) else round(float(v), 3)  # noqa: E731
    return {"method": "leave-one-case-out" if all(len(h) == 1 for h in folds) else f"{len(folds)}-fold",
            "held_out_cases": [[labels[i] for i in h] for h in folds],
            "atlas_mre_mm": rnd(np.nanmean(err_a)), "refined_mre_mm": rnd(np.nanmean(err_r)),
            "chosen_mre_mm": rnd(np.nanmean(chosen)),
            "per_landmark": {n: {"atlas_mm": rnd(a), "refined_mm": rnd(r)} for n, a, r in zip(names, a_k, r_k)},
            "use_refined": use}


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
    return {"config": cfg, "nets": nets, "folds": meta["folds"], "steps": int(meta["steps"])}


def _warm(previous: dict | None, held: set[str]) -> dict | None:
    """A previous fold network that never saw the held-out cases (so the estimate stays honest), or None."""
    if previous is None:
        return None
    for f, held_before in enumerate(previous["folds"]):
        seen = {c for g, h in enumerate(previous["folds"]) if g != f for c in h}
        if not (seen & held) and f in previous["nets"]:
            return previous["nets"][f]
    return None
