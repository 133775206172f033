"""The engine as an application uses it (the Slicer module and its worker process): detect, fine-tune, models.

A thin layer over `load_detector`, the catalogue's `resolve`, `training.finetune` and
`training.finetune_on_atlas`, so that callers need not know the engine's inner modules. Importing it needs no
torch; torch comes in with the first detection or fine-tune (`adapter_info` and `case_checksum` read headers and
numpy only). Progress callbacks take (fraction 0..1, message); a cancel callable returning True stops the work
with `Cancelled` and writes nothing.

The last model or adapter detector stays loaded for the next call while its files are unchanged. Its key is each
file's content (size, modification time and the SHA256 of its first MiB, where safetensors and torch files keep
their header), not its path: an adapter re-trained into the same file is loaded again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from .case import Case, Landmarks, Volume
from .errors import Cancelled, InputError, NotBetter
from .io.checksum import case_checksum

__all__ = ["Cancelled", "InputError", "NotBetter", "adapter_info", "adapters_dir", "case_checksum", "detect",
           "file_key", "finetune", "models", "needs_download", "resolve_model"]

Progress = Callable[[float, str], None]
HEADER_BYTES = 1 << 20

_loaded: dict = {"key": None, "detector": None}  # the last model detector and the key it was loaded under


def models() -> dict:
    """The models to pick from: name (`NAME` or `NAME:SET`) -> display name, e.g. "MedSapiens head (ISBI 19)"."""
    from .models.catalogue import choices

    return {c.name: c.display for c in choices()}


def needs_download(name_or_path: str):
    """The catalogue entries (the model and its base) not on disk yet, to ask the user first; None when none."""
    from .models.download import downloads_needed

    return downloads_needed(str(name_or_path)) or None


def resolve_model(name_or_path: str, progress: Progress | None = None, cancel=None) -> Path:
    """A local file for a weight file or catalogue name; a catalogue model is downloaded once, with progress."""
    from .models.download import resolve

    def bytes_done(done, total):
        _check(cancel)
        if progress:
            progress(done / total if total else 0.0, f"downloading {name_or_path}: {done / 2 ** 20:.0f} MB")

    return resolve(str(name_or_path), progress=bytes_done)[0]


def adapters_dir() -> Path:
    """Where adapters trained in an application are kept (beside the download cache); created on first use."""
    from .models.catalogue import cache_dir

    path = Path(cache_dir()).parent / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_key(path) -> tuple:
    """(size, mtime in ns, SHA256 of the first MiB): changes when the file is rewritten, whatever its path."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEADER_BYTES)).hexdigest()
    return st.st_size, st.st_mtime_ns, head


def detect(case: Case | Volume, model: str | None = None, *, adapter: str | None = None,
           atlas: list[Case | Volume] | None = None, deformable: bool = False, device: str | None = None,
           precision: str = "auto", progress: Progress | None = None, cancel=None) -> Landmarks:
    """Landmarks on `case`, by a model (weight file or catalogue name, optionally with a LoRA adapter file), by an
    adapter fine-tuned on the atlas alone (`adapter` without a model: it carries its atlas cases), or by the
    weight-free atlas of annotated `atlas` cases (`deformable`: add the B-spline stage). Volume atlas cases make
    the 3D atlas, which detects on a Volume (points in LPS mm)."""
    if atlas is not None:
        if model is not None or adapter is not None:
            raise InputError("give either a model or atlas cases, not both")
        if atlas and isinstance(atlas[0], Volume):
            if deformable:
                raise InputError("the deformable stage is for 2D atlases; this atlas holds volumes")
            return _detect_in_volume(case, list(atlas), progress, cancel)
        from .detectors.atlas import AtlasDetector, AtlasSettings

        if progress:
            progress(0.0, f"registering {len(atlas)} atlas cases")
        detector = AtlasDetector(list(atlas), AtlasSettings(deformable=deformable))
    else:
        if model is None and adapter is None:
            raise InputError("no model given: a weight file, a catalogue name, an atlas adapter, or atlas cases")
        if isinstance(case, Volume):
            raise InputError(f"{case.label}: a 3D volume; models and adapters detect on 2D images, volumes need an "
                             "atlas of annotated volumes")
        detector = _loaded_detector(model, adapter, device, precision, progress, cancel)
    _check(cancel)
    if progress:
        progress(0.5, "detecting")
    return detector.detect(case)


def _detect_in_volume(volume: Volume, atlas: list[Volume], progress, cancel) -> Landmarks:
    """The 3D atlas, one atlas volume at a time so that progress moves and Cancel is checked between them."""
    from .detectors.atlas3d import Atlas3DDetector, fuse

    def stage(fraction: float, message: str) -> None:
        _check(cancel)
        if progress:
            progress(fraction, message)

    stage(0.0, f"preparing {len(atlas)} atlas volumes and the volume")  # about a tenth of the time
    detector = Atlas3DDetector(atlas)
    prepared = detector.prepare(volume)
    votes = []
    for i in range(len(atlas)):
        stage(0.1 + 0.9 * i / len(atlas), f"registering atlas volume {i + 1} of {len(atlas)}")
        votes += detector.votes(volume, prepared, [i])
    _check(cancel)
    return fuse(votes, volume, detector.names, detector.settings)


def _loaded_detector(model, adapter, device, precision, progress, cancel):
    """The detector of a model (+ adapter) or of an atlas adapter alone, kept loaded while its files are unchanged."""
    from .detectors.factory import is_refined_atlas, load_detector

    model_path = resolve_model(model, progress, cancel) if model is not None else None
    adapter_path = resolve_model(adapter, progress, cancel) if adapter else None
    if model_path is None and not is_refined_atlas(adapter_path):
        raise InputError(f"{adapter}: a LoRA adapter runs on its base model; choose the model it was trained on")
    key = (str(model), model_path and file_key(model_path), adapter_path and file_key(adapter_path), device,
           precision)
    if key != _loaded["key"]:
        _loaded["key"] = _loaded["detector"] = None  # the old model's memory is freed before the new one loads
        if progress:
            files = [Path(p).name for p in (model_path, adapter_path) if p is not None]
            progress(0.0, f"loading {' + '.join(files)}")
        detector = load_detector(model, adapter=adapter, device=device, precision=precision, progress=False)
        _loaded.update(key=key, detector=detector)
    return _loaded["detector"]


def finetune(base: str | None, cases: list[Case], out, *, unannotated: list[Case] = (),
             progress: Progress | None = None, cancel=None, device: str | None = None, **settings) -> Path:
    """Train an adapter for the cases' landmarks and write it atomically to `out`; on Cancelled, NotBetter or any
    error `out` is left as it was.

    base None: learn on top of the weight-free atlas of the cases (training.refine.finetune_on_atlas): a patch
    refiner with its error estimated on held-out cases, warm-started (at most half the steps) from an adapter at
    `out` for the same landmarks; `adapter_info(out)` then says what it learned. `unannotated`: more images of
    the task (the ones to detect on will do), labelled by the atlas for the refiner to learn from too. NotBetter
    (an InputError, one line) when it was worse than the atlas on the held-out cases. settings: steps (per fold),
    time_budget (s, the whole run), lr, batch, patch, width, seed (training.RefineSettings), deformable (the
    atlas's B-spline stage); None leaves the default. Runs on the CPU (`device` is not used).
    base a weight file, catalogue name or architecture name: LoRA fine-tuning (training.loops.finetune).
    settings: time_budget (s), steps, lr, input_hw (training.Settings), views_per_case, lora_blocks, min_steps,
    head_channels (training.FinetuneSettings; the schedule on a CPU is planned: training/schedule.py).
    """
    if base is None:
        return _finetune_on_atlas(cases, unannotated, out, progress, cancel, settings)
    if unannotated:
        raise InputError("unannotated images are for fine-tuning on the atlas (no base model)")
    from dataclasses import fields, replace

    from .training.loops import FINETUNE_DEFAULTS, FinetuneSettings, Settings
    from .training.loops import finetune as train_adapter

    train = {k: settings.pop(k) for k in list(settings) if k in {f.name for f in fields(Settings)}}
    if "input_hw" in train:  # a list when it came through JSON
        train["input_hw"] = tuple(train["input_hw"])
    unknown = set(settings) - {f.name for f in fields(FinetuneSettings)}
    if unknown:
        raise InputError(f"unknown fine-tune settings: {', '.join(sorted(unknown))}")

    messages = {"plan": "timing this machine to plan the schedule", "views": "making training views",
                "features": "caching the frozen blocks"}

    def report(p):
        if progress:
            progress(p.fraction, messages.get(p.phase) or f"step {p.step}, loss {p.loss:.3f}")

    return Path(train_adapter(base, cases, out, settings=FinetuneSettings(replace(FINETUNE_DEFAULTS, **train),
                                                                              **settings),
                              device=device, progress=report, cancel=cancel))


# weight of each phase of the fine-tune on the atlas in the progress bar (the training takes most of the time)
ATLAS_PHASES = {"atlas": 0.15, "pseudo-labels": 0.25, "train": 0.8, "estimate": 0.05, "save": 0.0}


def _phase_spans(pseudo: bool) -> dict:
    """phase -> (start, end) of the progress bar; no room for the pseudo-labels when there are no images for it."""
    weights = {k: w for k, w in ATLAS_PHASES.items() if pseudo or k != "pseudo-labels"}
    total, spans, start = sum(weights.values()), {}, 0.0
    for phase, w in weights.items():
        spans[phase] = (start / total, (start + w) / total)
        start += w
    return spans


def _finetune_on_atlas(cases, unannotated, out, progress, cancel, settings) -> Path:
    from dataclasses import fields, replace

    from .training.refine import REFINE_DEFAULTS, finetune_on_atlas, folds_of

    settings = {k: v for k, v in settings.items() if v is not None}
    atlas = replace(REFINE_DEFAULTS.atlas, deformable=bool(settings.pop("deformable", False)))
    unknown = set(settings) - ({f.name for f in fields(REFINE_DEFAULTS)} - {"atlas"})
    if unknown:
        raise InputError(f"unknown settings for fine-tuning on the atlas: {', '.join(sorted(unknown))}")
    if "scale" in settings:  # a list when it came through JSON
        settings["scale"] = tuple(settings["scale"])

    def report(p):
        if not progress:
            return
        phase, _, fold = p.phase.partition(" ")  # "atlas", "pseudo-labels", "train 2/3", "estimate", "save"
        start, end = spans[phase]
        if phase == "train":
            f, n = map(int, fold.split("/"))
            fraction = (f - 1 + p.fraction) / n
            message = f"training network {f} of {n}: step {p.step} of {p.total}"
            if p.remaining is not None:
                message += f", about {p.remaining:.0f} s of training left"
        else:
            fraction = p.fraction
            message = {"atlas": f"atlas of the other cases: {p.step} of {p.total} held out",
                       "pseudo-labels": f"atlas labelling the unannotated images: {p.step} of {p.total}",
                       "estimate": "measuring the error on held-out cases", "save": "saving"}[phase]
            if phase in ("atlas", "pseudo-labels") and 0 < p.step < p.total:
                message += f", about {p.elapsed / p.step * (p.total - p.step):.0f} s left in this phase"
        progress(start + (end - start) * fraction, message)

    spans = _phase_spans(bool(unannotated))
    if progress:
        progress(0.0, f"atlas of the other cases: 0 of {len(folds_of(len(cases)))} held out")
    try:
        result = finetune_on_atlas(cases, out, unannotated=unannotated, progress=report, cancel=cancel,
                                   settings=replace(REFINE_DEFAULTS, atlas=atlas, **settings))
    except NotBetter as e:
        est = e.estimate or {}
        raise NotBetter("the fine-tuned adapter was not better than the atlas on held-out cases "
                        f"({_estimate_figures(est)}); nothing was saved and the previous detector is kept",
                        e.estimate) from None
    return Path(result.path)


def adapter_info(path) -> dict:
    """What an application shows of an adapter fine-tuned on the atlas, read from the file's header (no torch):

    adapter_mre_mm, atlas_mre_mm: the held-out mean radial error of the refiner (on every landmark) and of the
    atlas, in mm; method ("leave-one-case-out" or "N-fold") and cases_estimated (how many held-out cases);
    per_landmark: name -> {"atlas_mm", "refined_mm"} (None where no held-out case has it); refined_landmarks:
    the names the detector refines (all but those where the held-out cases show the atlas better beyond chance;
    there it keeps the atlas's answer); landmark_names; cases: [{"label", "sha256"}] the atlas cases it holds and was
    trained on (sha256 = case_checksum(case, landmark_names)); unannotated_images (how many atlas-labelled
    images it also learned from; 0 for files from before they existed); steps, steps_per_fold, train_seconds,
    warm_started, schedule_complete, created.
    """
    from .models.weight_files import read_metadata

    meta = read_metadata(path)
    if not meta or meta.get("kind") != "atlas-refiner":
        raise InputError(f"{path}: not an adapter fine-tuned on the atlas")
    est, names = meta["estimate"], meta["landmark_names"]
    return {"path": str(path), "landmark_names": names, "adapter_mre_mm": est["refined_mre_mm"],
            "atlas_mre_mm": est["atlas_mre_mm"], "method": est["method"],
            "cases_estimated": sum(len(h) for h in est["held_out_cases"]), "per_landmark": est["per_landmark"],
            "refined_landmarks": [n for n, use in zip(names, meta["use_refined"]) if use],
            "cases": [{"label": c["label"], "sha256": c["sha256"]} for c in meta["cases"]],
            "unannotated_images": meta.get("unannotated_images", 0),
            **{k: meta.get(k) for k in ("steps", "steps_per_fold", "train_seconds", "warm_started",
                                        "schedule_complete", "created")}}


def _estimate_figures(est: dict) -> str:
    """'adapter 2.31 mm, atlas 2.05 mm, leave-one-case-out on 3 cases' from refine's estimate dict."""
    mm = lambda v: "n/a" if v is None else f"{v:.2f} mm"  # noqa: E731
    n = sum(len(h) for h in est.get("held_out_cases", []))
    return f"adapter {mm(est.get('refined_mre_mm'))}, atlas {mm(est.get('atlas_mre_mm'))}, " \
           f"{est.get('method', 'held out')} on {n} cases"


def _check(cancel) -> None:
    if cancel and cancel():
        raise Cancelled("cancelled")
