"""Training: few-shot LoRA adapters (`finetune`) and specialist / generalist models (`train`), one loop for both.

The recipe is MedSapiens's (sapiens.md): masked MSE on UDP heatmaps, AdamW with layer-wise lr decay 0.85 and
no weight decay on 1-D parameters, biases and the position embedding, gradient clip 1, linear warm-up from
0.001x, lr x0.1 at 81 % and x0.01 at 95 % of the run. Runs are bounded by steps and/or a time budget (the lr
schedule follows whichever is further along), report progress through a callback, and stop on a cancel flag
without writing anything. Under `torchrun` the loop runs data-parallel (DDP: gloo on CPU, NCCL on GPU).

Few-shot speed on a CPU comes from a fixed set of augmented views per case, computed once; when LoRA sits only
on the last blocks (as `schedule.py` plans it for a large base on a CPU), the frozen blocks before them run once
per view and their tokens are cached.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..case import Case, Volume
from ..detectors.heatmap import PRECISIONS, image_tensor, normalise, pick_device, pick_precision
from ..errors import Cancelled, InputError, short_list
from ..models import lora, weight_files
from ..models.build import architecture_of, backbone_tensors, base_for_training, head_tensors, require_base
from ..models.checkpoints import read_checkpoint
from ..models.codec import UDPCodec
from ..models.download import resolve
from ..models.sapiens import ARCHS, SapiensPose, grid_size
from ..progress import Callback, Cancel, check, report, spans, within
from ..settings import DEFAULT_ARCH, LORA_DEFAULTS, NO_AUGMENT, TRAIN_DEFAULTS, Augment, LoraSettings, TrainSettings
from . import schedule
from .augment import random_view

LOSS_SCALE = 1000.0  # masked MSE of heatmaps in [0, 1] is ~1e-3; scaled so that gradient clipping at 1 means something


def lr_factor(p: float, warmup: float) -> float:
    if p < warmup:
        return 0.001 + (1 - 0.001) * p / warmup
    return 1.0 if p < 0.81 else 0.1 if p < 0.95 else 0.01


def param_groups(model: SapiensPose, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: lr x decay^(depth + 1 - layer), no decay on 1-D / pos_embed."""
    depth = model.arch.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("backbone.patch_embed.", "backbone.pos_embed")):
            layer = 0
        elif name.startswith("backbone.layers."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        decay = p.ndim > 1 and not name.endswith(".bias") and "pos_embed" not in name
        g = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "lr_scale": layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    for g in groups.values():
        g["lr"] = lr * g["lr_scale"]
    return list(groups.values())


class Views:
    """Training images in memory, landmarks ordered as `names`; `sample` makes one augmented, encoded view."""

    def __init__(self, cases: list[Case], names: list[str], settings: TrainSettings, flip_pairs=()):
        self.names = list(names)
        self.settings = settings
        self.flip_pairs = tuple(flip_pairs)
        self.input_wh = settings.input_hw[::-1]
        self.codec = UDPCodec(self.input_wh, (self.input_wh[0] // 4, self.input_wh[1] // 4), settings.sigma)
        self.images = [image_tensor(c, "cpu") for c in cases]  # uint8, converted per view
        marks = [c.landmarks.subset(self.names) for c in cases]
        self.points = [m.points for m in marks]
        self.present = [m.present for m in marks]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int, rng: np.random.Generator, augment: Augment | None = None):
        view, pts, present = random_view(self.images[i], self.points[i], self.present[i], self.input_wh,
                                         augment or self.settings.augment, rng, self.flip_pairs)
        target, weight = self.codec.encode(pts, present)
        return normalise(view[None])[0], torch.from_numpy(target), torch.from_numpy(weight)

    def batch(self, indices, rng: np.random.Generator):
        xs, ts, ws = zip(*(self.sample(int(i), rng) for i in indices))
        return torch.stack(xs), torch.stack(ts), torch.stack(ws)


class Tail(nn.Module):
    """Blocks [start, depth) + final norm + head: the trainable part above cached frozen blocks."""

    def __init__(self, model: SapiensPose, start: int, grid: tuple[int, int]):
        super().__init__()
        self.model, self.start, self.grid = model, start, grid

    def forward(self, x):
        bb = self.model.backbone
        tokens = bb.ln1(bb.forward_tokens(x, self.start))
        return self.model.head(tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid))


def masked_mse(pred, target, weight) -> torch.Tensor:
    return (((pred.float() - target) ** 2) * weight[:, :, None, None]).mean() * LOSS_SCALE


def fit(net: nn.Module, params: list[dict], next_batch: Callable[[int], tuple], settings: TrainSettings, device,
        precision: str = "fp32", progress: Callback = None, cancel: Cancel = None, start_step: int = 0,
        optimizer_state=None, on_checkpoint=None, checkpoint_every: float | None = None, loss_fn=None) -> dict:
    """The loop: `next_batch(step) -> (inputs, target, weight)`; returns steps, seconds, last loss, optimizer.

    loss_fn(pred, target, weight) -> scalar; default the masked heatmap MSE. Stops at settings.steps or
    settings.time_budget, whichever comes first (all ranks agree under DDP); raises Cancelled on cancel(). The
    learning-rate schedule follows whichever of the two is further along.
    """
    _check_bounds(settings)
    opt = torch.optim.AdamW(params, betas=(0.9, 0.999))
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    trainable = [p for g in params for p in g["params"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    t0 = last_save = time.monotonic()
    step, smooth = start_step, None
    net.train()
    while not _stop(_done(settings, step, time.monotonic() - t0), cancel, device):
        for g in opt.param_groups:
            g["lr"] = settings.lr * g["lr_scale"] * lr_factor(_done(settings, step, time.monotonic() - t0),
                                                               settings.warmup)
        x, target, weight = (t.to(device) for t in next_batch(step))
        with autocast:
            pred = net(x)
        loss = (loss_fn or masked_mse)(pred, target, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.clip)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        _report_step(progress, settings, step, smooth, time.monotonic() - t0)
        if on_checkpoint and checkpoint_every and time.monotonic() - last_save > checkpoint_every:
            on_checkpoint(step, opt)
            last_save = time.monotonic()
    net.eval()
    return {"steps": step, "seconds": time.monotonic() - t0, "loss": smooth, "optimizer": opt}


def _check_bounds(settings: TrainSettings) -> None:
    if settings.steps is None and settings.time_budget is None:
        raise ValueError("give steps or a time budget")
    if (settings.steps is not None and settings.steps < 1) or (settings.time_budget is not None
                                                               and not settings.time_budget > 0):
        raise InputError(f"training needs at least one step and a time budget above 0 (steps {settings.steps}, "
                         f"time budget {settings.time_budget} s)")


def _done(settings: TrainSettings, step: int, elapsed: float) -> float:
    """How far the run is, by steps or by time, whichever is further (1 = finished)."""
    return max(step / settings.steps if settings.steps else 0.0,
               elapsed / settings.time_budget if settings.time_budget else 0.0)


def _stop(done: float, cancel: Cancel, device) -> bool:
    """True when the run is over; Cancelled when the user asked to stop. Under DDP every rank decides alike."""
    flags = torch.tensor([float(done >= 1.0), float(bool(cancel and cancel()))])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flags = flags.to(device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if flags[1]:
        raise Cancelled("training cancelled")
    return bool(flags[0])


def _report_step(progress: Callback, settings: TrainSettings, step: int, loss: float, spent: float) -> None:
    done = min(_done(settings, step, spent), 1.0)
    of = f" of {settings.steps}" if settings.steps else ""
    report(progress, done, f"step {step}{of}, loss {loss:.3f}", phase="train", step=step, total=settings.steps, loss=loss,
           remaining=spent * (1 - done) / done if done > 0 else None)


# ---------------------------------------------------------------------------------------------- few-shot adapter

@dataclass
class FinetuneResult:
    """What a fine-tune made: the adapter (None where nothing was written), its steps and seconds (per phase),
    on the atlas its held-out estimate and whether it beat the atlas, on a base the schedule it followed."""

    path: Path | None
    steps: int
    seconds: float
    phase_seconds: dict
    estimate: dict | None = None
    better: bool = True
    schedule: str | None = None

    def line(self) -> str:
        """`<adapter path>  <steps> steps  <seconds> s  <phase times>`: the command line's result."""
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        return f"{self.path}  {self.steps} steps  {self.seconds:.1f} s  {phases}"

    def notes(self) -> list[str]:
        """What a user should read beside the result: the schedule, or the held-out errors (and a warning for an
        adapter kept although it lost to the atlas)."""
        if self.schedule:
            return [f"schedule: {self.schedule}"]
        if self.estimate is None:
            return []
        est = self.estimate
        lines = [f"held-out error ({est['method']}): atlas {est['atlas_mre_mm']:.2f} mm, refined "
                 f"{est['refined_mre_mm']:.2f} mm; refining {sum(est['use_refined'])} of {len(est['use_refined'])} "
                 "landmarks"]
        if est.get("atlas_stage"):
            from ..detectors.atlas import stage_line  # SimpleITK: only where an atlas was fine-tuned on

            lines.append(stage_line(est["atlas_stage"]))
        if est.get("calibration"):
            lines.append(review_line(est["calibration"]))
        if not self.better:
            lines.append("medsapiens: warning: the adapter was worse than the atlas on the held-out cases (written "
                         "anyway, as asked)")
        return lines


def review_line(calibration: dict) -> str:
    """'review (held-out cases): check where P < 0.42: 18 % of the points flagged, 5 of 6 errors > 3 mm among
    them; AUC 0.81, calibration error 0.06'."""
    fig = calibration["held_out"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    caught = round((fig["gross_caught"] or 0) * fig["gross_errors"])
    num = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"review (held-out cases): check where P < {calibration['review_below']:.2f}: {pct(fig['flagged'])} of "
            f"the points flagged, {caught} of {fig['gross_errors']} errors > 3 mm among them; AUC "
            f"{num(fig['auc'])}, calibration error {num(fig['calibration_error'])}")


def check_cases(cases: list[Case]) -> list[str]:
    """The landmark names all training cases share; one clear error for anything unusable."""
    if not cases:
        raise InputError("no training cases given")
    names = None
    for c in cases:
        if isinstance(c, Volume):
            raise InputError(f"{c.label}: fine-tuning learns from 2D images; for volumes the 3D atlas needs no "
                             "training: `medsapiens detect --atlas CASES VOLUME...`")
        if c.landmarks is None:
            raise InputError(f"{c.label}: a training case needs landmarks")
        if names is None:
            names = c.landmarks.names
        elif c.landmarks.names != names:
            raise InputError(f"{c.label}: its landmarks ({short_list(c.landmarks.names)}) differ from those of "
                             f"{cases[0].label} ({short_list(names)})")
        if not c.landmarks.present.any():
            raise InputError(f"{c.label}: no landmark is placed")
    return list(names)


@dataclass
class _Trainable:
    """What a few-shot run trains: the model, the first block with LoRA (the blocks below run once per view),
    the views per case, the plan (None when every weight is trained) and the base file."""

    model: SapiensPose
    start: int
    views_per_case: int
    plan: schedule.Plan | None = None
    base_path: Path | None = None


def finetune(base, cases: list[Case], out, *, flip_pairs=(), settings: LoraSettings = LORA_DEFAULTS,
             device=None, precision="fp32", progress: Callback = None, cancel: Cancel = None) -> FinetuneResult:
    """Train an adapter (LoRA + head) for the cases' landmarks on `base` and write it atomically to `out`.

    base: a weight file or catalogue name (LoRA on its frozen backbone, as `schedule.py` plans it), or an
    architecture name from model.ARCHS (no pre-training: every weight is trained, the result is a whole model
    file). The time budget covers the whole run, reading the base included. cancel() -> True stops with
    Cancelled and leaves `out` as it was.
    """
    names = check_cases(cases)
    s = settings.train
    dev = pick_device(device)
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}")
    torch.manual_seed(s.seed)
    t_run, seconds = time.monotonic(), {}
    run = _trainable(base, names, len(cases), settings, dev, precision, within(progress, 0.0, 0.05), seconds)
    bar = spans({"setup": 0.05, "views": 0.05, "features": 0.25 if run.start > 0 else 0.0, "train": 0.65})
    t0 = time.monotonic()
    inputs, targets, weights = _fixed_views(cases, names, s, flip_pairs, run.views_per_case,
                                            within(progress, *bar["views"]), cancel)
    seconds["views"] = round(time.monotonic() - t0, 1)
    if run.start > 0:
        t0 = time.monotonic()
        inputs = _frozen_tokens(run.model, inputs, run.start, dev, pick_precision("auto", dev),
                                within(progress, *bar["features"]), cancel)
        seconds["features"] = round(time.monotonic() - t0, 1)
    rng = np.random.default_rng(s.seed)

    def next_batch(step):
        idx = rng.choice(len(inputs), size=min(s.batch, len(inputs)), replace=False)
        return inputs[idx], targets[idx], weights[idx]

    train = s if s.time_budget is None else replace(  # what the plan, views and cached tokens left of the budget
        s, time_budget=max(s.time_budget - (time.monotonic() - t_run), 0.1 * s.time_budget))
    net = Tail(run.model, run.start, grid_size(s.input_hw)) if run.start > 0 else run.model
    result = fit(net, param_groups(run.model, s.lr, s.weight_decay, s.layer_decay), next_batch, train, dev,
                 precision, within(progress, *bar["train"]), cancel)
    seconds["train"] = round(result["seconds"], 1)
    _warn_if_short(run, result["steps"], settings)
    path = weight_files.save_trained(
        out, run.model.cpu(), names, s.input_hw, s.sigma, base=run.base_path,
        flip_pairs=[list(p) for p in flip_pairs], training_cases=[c.label for c in cases], steps=result["steps"],
        train_seconds=round(result["seconds"], 1), views_per_case=run.views_per_case, phase_seconds=seconds,
        **({} if run.plan is None else {"schedule": asdict(run.plan)}))
    return FinetuneResult(path, result["steps"], time.monotonic() - t_run, seconds,
                          schedule=run.plan.describe(run.model.arch.depth) if run.plan else None)


def _trainable(base, names, cases: int, settings: LoraSettings, dev, precision, progress: Callback,
               seconds: dict) -> _Trainable:
    """The model to train: an architecture from scratch, or the base with LoRA on the blocks the plan gives."""
    s = settings.train
    if str(base) in ARCHS and not Path(str(base)).exists():
        return _Trainable(SapiensPose(str(base), len(names), grid_size(s.input_hw)), 0, settings.views_per_case)
    t0 = time.monotonic()
    base_path = resolve(str(base))[0]
    ckpt = read_checkpoint(base_path)
    require_base(ckpt)
    seconds["base"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    plan = _plan(ckpt, len(names), cases, settings, dev, precision, progress)
    if plan.step_seconds:  # measured here
        seconds["plan"] = round(time.monotonic() - t0, 1)
    model = base_for_training(ckpt, names, plan.head_channels)
    del ckpt
    start = model.arch.depth - plan.lora_blocks
    model.requires_grad_(False)
    if plan.lora_blocks:
        lora.add_lora(model, range(start, model.arch.depth))
    model.head.requires_grad_(True)
    return _Trainable(model.to(dev), start, plan.views_per_case, plan, base_path)


def _warn_if_short(run: _Trainable, steps: int, settings: LoraSettings) -> None:
    if run.plan is not None and settings.train.steps is None and steps < settings.min_steps:
        warnings.warn(f"only {steps} steps fitted in the {settings.train.time_budget:g} s budget on this device "
                      f"(the plan asks for {settings.min_steps}); the adapter may be poor: give a larger "
                      "--time-budget", stacklevel=3)


def _plan(ckpt, keypoints: int, cases: int, settings: LoraSettings, dev, precision, progress) -> schedule.Plan:
    """The recipe on a GPU, with explicit `lora_blocks` or without a time budget; otherwise measured here."""
    arch_name, _, head_width = architecture_of({**backbone_tensors(ckpt), **head_tensors(ckpt)}, ckpt)
    arch = replace(ARCHS[arch_name], head_channels=head_width or ARCHS[arch_name].head_channels)
    s = settings.train
    if settings.head_channels is not None and head_width is not None:
        raise InputError(f"{ckpt.path}: the base brings its own {head_width}-channel head; a head width can only "
                         "be chosen for a base without one")
    if settings.lora_blocks is not None or dev.type == "cuda" or s.time_budget is None:
        blocks = arch.depth if settings.lora_blocks is None else min(arch.depth, settings.lora_blocks)
        return schedule.Plan(blocks, settings.head_channels or arch.head_channels, settings.views_per_case, 0.0,
                             0.0)
    report(progress, 0.5, "timing this machine to plan the schedule", phase="plan")
    costs = schedule.measure(arch, s.input_hw, keypoints, s.batch, dev, pick_precision("auto", dev), precision)
    return schedule.choose(arch, head_width is None, cases, settings.views_per_case, s.batch, s.time_budget,
                           settings.min_steps, costs)


def _fixed_views(cases, names, s: TrainSettings, flip_pairs, per_case: int, progress: Callback, cancel: Cancel):
    """`per_case` views of each case: the plain whole-image view first, then augmented ones (seeded)."""
    views = Views(cases, names, s, flip_pairs)
    rng = np.random.default_rng(s.seed)
    xs, ts, ws = [], [], []
    total = len(cases) * per_case
    for i in range(len(cases)):
        for v in range(per_case):
            check(cancel, "training cancelled")
            x, t, w = views.sample(i, rng, NO_AUGMENT if v == 0 else None)
            xs.append(x), ts.append(t), ws.append(w)
            report(progress, len(xs) / total, f"making training views: {len(xs)} of {total}", phase="views")
    return torch.stack(xs), torch.stack(ts), torch.stack(ws)


@torch.no_grad()
def _frozen_tokens(model: SapiensPose, inputs: torch.Tensor, stop: int, device, precision: str, progress: Callback,
                   cancel: Cancel, chunk=16):
    """Tokens after the first `stop` (frozen) blocks for every view, computed once, in the inference precision
    (bf16 where the device is fast at it, as detection does)."""
    model.eval()
    out = []
    t0 = time.monotonic()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(0, len(inputs), chunk):
        check(cancel, "training cancelled")
        with autocast:
            out.append(model.backbone.forward_tokens(inputs[i:i + chunk].to(device), 0, stop).float().cpu())
        done = min(i + chunk, len(inputs)) / len(inputs)
        spent = time.monotonic() - t0
        report(progress, done, f"caching the frozen blocks: {min(i + chunk, len(inputs))} of {len(inputs)} views",
               phase="features", remaining=spent * (1 - done) / done)
    return torch.cat(out)


# --------------------------------------------------------------------------------- specialist / generalist models

def union_names(name_sets: list[list[str]]) -> list[str]:
    """One head over all landmark sets, in order of first appearance (MedSapiens's generalist)."""
    names: list[str] = []
    for ns in name_sets:
        names += [n for n in ns if n not in names]
    return names


def train(cases: list[Case], names: list[str], out, *, arch=DEFAULT_ARCH, settings: TrainSettings = TRAIN_DEFAULTS,
          resume=None, device=None, precision="fp32", progress=None, cancel=None,
          checkpoint_every: float | None = 600.0) -> Path:
    """Train a whole model on annotated cases (landmarks a case's set lacks get weight 0) and save it to `out`.

    Under torchrun each process trains on its own random views with DDP; rank 0 writes `out` (and every
    `checkpoint_every` seconds, with the optimizer state beside it in `<out>.state`, for `resume`).
    """
    rank, world = distributed.setup(device)
    dev = pick_device(distributed.process_device(device))
    s = settings
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    start_step, optimizer_state = 0, None
    if resume is not None:
        model, start_step, optimizer_state = _resume(resume, names, s)
    else:
        model = SapiensPose(arch, len(names), grid_size(s.input_hw))
    model.to(dev)
    if rank == 0:
        report(progress, 0.0, f"training {arch if resume is None else resume} on {len(cases)} images, {len(names)} landmarks, {world} "
                              "process(es)")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    views = Views(cases, names, s)
    rng = np.random.default_rng(s.seed + 1000 * rank + start_step)

    def next_batch(step):
        return views.batch(rng.integers(0, len(views), s.batch), rng)

    def save(step, opt):
        if rank == 0:
            _save_model(out, model, names, s, cases, step, opt)

    result = fit(net, param_groups(model, s.lr, s.weight_decay, s.layer_decay), next_batch, s, dev, precision,
                 progress if rank == 0 else None, cancel, start_step, optimizer_state, save, checkpoint_every)
    save(result["steps"], result["optimizer"])
    if world > 1:
        distributed.barrier()
    return Path(out)


def state_path(out) -> Path:
    return Path(str(out) + ".state")


def _save_model(out, model, names, s: TrainSettings, cases, step, opt) -> None:
    weight_files.save_trained(out, model, names, s.input_hw, s.sigma, steps=step, training_cases=len(cases),
                              lr=s.lr, batch=s.batch)
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in state["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    weight_files.save_weights(state_path(out), tensors, {"step": step, "param_groups": state["param_groups"]},
                              "state")


def _resume(path, names, s: TrainSettings):
    from ..models.build import build_model
    from ..models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    if ckpt.layout != "model":
        raise InputError(f"{path}: only a model written by `medsapiens train` can be resumed")
    if ckpt.landmark_names != list(names):
        raise InputError(f"{path}: trained for {short_list(ckpt.landmark_names or [])}, not for the landmarks "
                         f"of these data sets ({short_list(names)})")
    if tuple(ckpt.meta.get("input_hw", ())) != tuple(s.input_hw):
        raise InputError(f"{path}: trained at input {ckpt.meta.get('input_hw')}, not {list(s.input_hw)}")
    model = build_model(ckpt)
    sp = state_path(path)
    if not sp.is_file():
        return model, int(ckpt.meta.get("steps", 0)), None
    tensors, meta = weight_files.load_weights(sp)
    state: dict = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    return model, int(meta["step"]), {"state": state, "param_groups": meta["param_groups"]}
