"""The engine as an application uses it (the Slicer module and its worker process): detect, fine-tune, models.

A thin layer over `load_detector`, the catalogue's `resolve` and `training.finetune`, so that callers need not
know the engine's inner modules. Importing it needs no torch; torch comes in with the first detection or
fine-tune. Progress callbacks take (fraction 0..1, message); a cancel callable returning True stops the work
with `Cancelled` and writes nothing.

The last model detector stays loaded for the next call while its files are unchanged. Its key is each file's
content (size, modification time and the SHA256 of its first MiB, where safetensors and torch files keep
their header), not its path: an adapter re-trained into the same file is loaded again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from .case import Case, Landmarks, Volume
from .errors import Cancelled, InputError

__all__ = ["Cancelled", "InputError", "adapters_dir", "detect", "file_key", "finetune", "models", "needs_download",
           "resolve_model"]

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
    """Landmarks on `case`, by a model (weight file or catalogue name, optionally with an adapter file) or by the
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
        if model is None:
            raise InputError("no model given: a weight file, a catalogue name, or atlas cases")
        if isinstance(case, Volume):
            raise InputError(f"{case.label}: a 3D volume; models detect on 2D images, volumes need an atlas of "
                             "annotated volumes")
        detector = _model_detector(model, adapter, device, precision, progress, cancel)
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


def _model_detector(model, adapter, device, precision, progress, cancel):
    from .detectors.factory import load_detector

    model_path = resolve_model(model, progress, cancel)
    adapter_path = resolve_model(adapter, progress, cancel) if adapter else None
    key = (str(model), file_key(model_path), adapter_path and file_key(adapter_path), device, precision)
    if key != _loaded["key"]:
        _loaded["key"] = _loaded["detector"] = None  # the old model's memory is freed before the new one loads
        if progress:
            progress(0.0, f"loading {Path(model_path).name}" + (f" + {Path(adapter_path).name}" if adapter else ""))
        detector = load_detector(model, adapter=adapter, device=device, precision=precision, progress=False)
        _loaded.update(key=key, detector=detector)
    return _loaded["detector"]


def finetune(base: str, cases: list[Case], out, *, progress: Progress | None = None, cancel=None,
             device: str | None = None, **settings) -> Path:
    """Train an adapter for the cases' landmarks on `base` (weight file, catalogue name or architecture name)
    and write it atomically to `out`; on Cancelled or any error `out` is left as it was.

    settings: time_budget (s), steps, lr, input_hw (training.Settings), views_per_case, lora_blocks.
    """
    from dataclasses import fields, replace

    from .training.loops import FINETUNE_DEFAULTS, FinetuneSettings, Settings
    from .training.loops import finetune as train_adapter

    train = {k: settings.pop(k) for k in list(settings) if k in {f.name for f in fields(Settings)}}
    if "input_hw" in train:  # a list when it came through JSON
        train["input_hw"] = tuple(train["input_hw"])
    unknown = set(settings) - {f.name for f in fields(FinetuneSettings)}
    if unknown:
        raise InputError(f"unknown fine-tune settings: {', '.join(sorted(unknown))}")

    messages = {"views": "making training views", "features": "caching the frozen blocks"}

    def report(p):
        if progress:
            progress(p.fraction, messages.get(p.phase) or f"step {p.step}, loss {p.loss:.3f}")

    return Path(train_adapter(base, cases, out, settings=FinetuneSettings(replace(FINETUNE_DEFAULTS, **train),
                                                                              **settings),
                              device=device, progress=report, cancel=cancel))


def _check(cancel) -> None:
    if cancel and cancel():
        raise Cancelled("cancelled")
