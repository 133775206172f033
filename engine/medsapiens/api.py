"""The one door into the engine: the command line, the worker process and the Slicer module call these functions
for every job (detect, fine-tune, train, evaluate, analyse, models) and reach nothing below them.

Importing it loads no torch (the Slicer module's own process imports it): torch comes in with the first job.
Long jobs take `progress(Progress)` (medsapiens.progress: the fraction of the whole job and a line saying what it
does now) and `cancel() -> bool`; Cancel raises Cancelled and writes nothing. The settings a job takes are
`settings.py`'s dataclasses, changed by name (`time_budget=60`), so flags and JSON requests go the same way.

The last detector stays loaded for the next call: a model or adapter while its files are unchanged on disk (their
device, inode, size and modification time: an adapter re-trained into the same file is loaded again, and a
catalogue name is resolved, and its downloaded file hashed, once per process); an atlas while its cases are the
same (their content), so that its calibration and the choice of its B-spline stage are measured once.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import distributed
from .case import Case, Landmarks, Volume, shared_landmarks
from .errors import InputError
from .io.checksum import case_checksum
from .progress import Callback, Cancel, check, report, within
from .settings import (DEFAULT_ANALYSIS, DEFAULT_ARCH, LORA_DEFAULTS, REFINE_DEFAULTS, TRAIN_DEFAULTS, WEB_DEFAULTS,
                       override)

__all__ = ["DEFAULT_ANALYSIS", "DEFAULT_ARCH", "LORA_DEFAULTS", "REFINE_DEFAULTS", "TRAIN_DEFAULTS", "WEB_DEFAULTS",
           "adapter_info", "adapters_dir", "add_model", "analyses", "analyze", "analyze_files", "architectures",
           "cache_dir", "can_analyze", "case_checksum", "catalogue_rows", "check_images", "check_landmark_names",
           "demo", "detect", "detect_files", "detect_many", "evaluate", "finetune", "landmark_names", "landmark_set",
           "landmark_sets", "load_cases", "load_detector", "models", "needs_download", "phantom_case", "read_image",
           "read_images", "read_volume", "resolve_model", "shared_landmarks", "tracing", "train", "write_evaluation",
           "write_measurements", "write_report"]

_kept: dict = {"key": None, "detector": None}  # the last detector and what it came from (files, or atlas cases)


# ---------------------------------------------------------------------------------------------------- models
def models() -> dict:
    """The models to pick from: name (`NAME` or `NAME:SET`) -> display name, e.g. "MedSapiens head (ISBI 19)"."""
    from .models.catalogue import choices

    return {c.name: c.display for c in choices()}


def catalogue_rows() -> list[dict]:
    """Every catalogue model as `models` lists it: name, display, landmark sets, SHA256 state, where it is."""
    from .models.catalogue import PIN_ON_FIRST_DOWNLOAD, catalogue
    from .models.download import cached_path, pinned_sha256

    rows = []
    for entry in catalogue().values():
        sha = pinned_sha256(entry)
        state = (f"sha256 {sha} (catalogue)" if entry.sha256 != PIN_ON_FIRST_DOWNLOAD else
                 f"sha256 {sha} (pinned at first download)" if sha else
                 "sha256 pinned at first download (not downloaded yet)")
        rows.append({"name": entry.name, "display": entry.display, "state": state,
                     "sets": [s.name for s in entry.landmark_sets] if len(entry.landmark_sets) > 1 else [],
                     "where": "cached" if cached_path(entry).is_file() else entry.source.url})
    return rows


def add_model(path, name: str | None = None) -> list[tuple[str, Path]]:
    """Bring a downloaded model file, or the MedSapiens release zip, into the cache (offline sites): the
    (name, cached file) of each model added."""
    from .models.catalogue import catalogue
    from .models.download import add_local, cached_path

    return [(n, cached_path(catalogue()[n])) for n in add_local(path, name)]


def needs_download(name_or_path: str):
    """The catalogue entries (the model and its base) not on disk yet, to ask the user first; None when none."""
    from .models.download import downloads_needed

    return downloads_needed(str(name_or_path)) or None


def resolve_model(name_or_path: str, progress: Callback = None, cancel: Cancel = None) -> Path:
    """A local file for a weight file or catalogue name; a catalogue model is downloaded once, with progress."""
    from .models.download import resolve

    return resolve(str(name_or_path), progress, cancel)[0]


def cache_dir() -> Path:
    from .models.catalogue import cache_dir as where

    return Path(where())


def adapters_dir() -> Path:
    """Where adapters trained in an application are kept (beside the download cache); created on first use."""
    path = cache_dir().parent / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------- detect
def load_detector(model=None, *, adapter=None, base=None, atlas=None, atlas_cases=None, atlas_deformable=None,
                  device=None, precision="auto", input_size=None, flip_test=None, landmarks=None,
                  progress: Callback = None, cancel: Cancel = None):
    """The one factory for every detector; each has `detect(case, progress=None, cancel=None) -> Landmarks`.

    model: a weight file or catalogue name (`NAME`, or `NAME:SET` for one landmark set of a multi-set model).
    A LoRA file (a MedSapiens checkpoint or an adapter trained with medsapiens) runs on a base, given one of two ways:
    `model=LORA, base=BASE` (catalogue MedSapiens models name their base) or `model=BASE, adapter=LORA`. An
    adapter fine-tuned on the atlas carries its atlas cases: give it alone, as `adapter` (or `model`).
    atlas: the weight-free atlas of annotated cases, a data set (landmarks.csv, or a folder of .mrk.json + images
    or volumes; `atlas_cases`: the case ids to use) or a list of cases; volumes make the 3D atlas.
    atlas_deformable: the 2D atlas's B-spline stage always (True), never (False), or where the atlas's own cases,
    each held out, show it clearly better (None, the default; measured on the first detection). flip_test: None
    for the model's own setting. landmarks: the names the caller expects (another set is refused). precision:
    "auto" (bf16 where the device computes it natively and faster), "fp32" or "bf16".
    """
    from .detectors import factory

    if atlas is not None:
        if model is not None or adapter is not None or base is not None:
            raise InputError("--atlas works without model weights; give either an atlas or a model")
        cases = load_cases(atlas, atlas_cases) if isinstance(atlas, (str, Path)) else list(atlas)
        detector = _kept_atlas(cases, atlas_deformable, atlas if isinstance(atlas, (str, Path)) else "the atlas")
    else:
        detector = _kept_detector(model, adapter, base, distributed.process_device(device), precision, input_size,
                                  flip_test, progress, cancel)
    factory.check_landmarks(detector, landmarks)
    return detector


def _kept_atlas(cases: list, deformable: bool | None, source):
    """The atlas of `cases`, kept for the next call with the same cases (by content)."""
    from .detectors import factory

    key = ("atlas", _cases_digest(cases), deformable)
    if key != _kept["key"]:
        _kept["key"] = _kept["detector"] = None
        _kept.update(detector=factory.atlas_detector(cases, deformable, source), key=key)
    return _kept["detector"]


def _cases_digest(cases: list) -> str:
    """SHA256 of annotated cases' whole content: pixels or voxels, geometry, names and landmarks."""
    import hashlib
    import json

    import numpy as np

    h = hashlib.sha256()
    for c in cases:
        geometry = [c.voxels, c.index_to_lps] if isinstance(c, Volume) else [c.image, np.asarray(c.spacing, float),
                                                                               np.asarray(c.pixel_to_lps, float)]
        marks = [] if c.landmarks is None else [c.landmarks.points, c.landmarks.present]
        for a in map(np.ascontiguousarray, geometry + marks):
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(json.dumps([c.name, c.landmarks and c.landmarks.names]).encode())
    return h.hexdigest()


def _kept_detector(model, adapter, base, device, precision, input_size, flip_test, progress, cancel):
    """A model or adapter detector, resolved once and kept loaded while its files are unchanged on disk."""
    from .detectors import factory
    from .io.checksum import file_identity
    from .models.download import resolve

    if model is None and adapter is None:
        raise InputError("no model given: a weight file, a catalogue name, an atlas adapter, or atlas cases")
    refined = next((p for p in (model, adapter) if p is not None and factory.is_refined_atlas(p)), None)
    if refined is not None:
        if base is not None or (model is not None and adapter is not None):
            raise InputError(f"{refined}: an atlas-refiner adapter carries its own atlas; give it alone")
        files = [(Path(refined), None)]
    else:
        files = _model_files(model, adapter, base, progress, cancel, resolve)
    key = (tuple((str(p), file_identity(p), choice and choice.name) for p, choice in files if p is not None),
           adapter is not None, device, precision, tuple(input_size) if input_size else None, flip_test)
    if key != _kept["key"]:
        _kept["key"] = _kept["detector"] = None  # the old model's memory is freed before the new one loads
        report(progress, 0.0, f"loading {' + '.join(Path(p).name for p, _ in files if p is not None)}")
        if refined is not None:
            detector = factory.refined_atlas_detector(refined)
        else:
            (path, choice), (base_path, _) = files
            detector = factory.heatmap_detector(path, choice, base_path, lora_on_base=adapter is not None,
                                                device=device, precision=precision, input_size=input_size,
                                                flip_test=flip_test)
        _kept.update(key=key, detector=detector)
    return _kept["detector"]


def _model_files(model, adapter, base, progress, cancel, resolve) -> list:
    """[(the model or LoRA file, its catalogue choice), (the base under it or None, None)], each resolved once."""
    if model is None:
        raise InputError(f"{adapter}: a LoRA adapter runs on its base model; choose the model it was trained on")
    if adapter is not None and base is not None:
        raise InputError("give a LoRA file either as MODEL with --base BASE, or as --adapter on the base MODEL; "
                         "not --adapter and --base together")
    path, choice = resolve(str(adapter if adapter is not None else model), progress, cancel)
    base_name = model if adapter is not None else base if base is not None else choice and choice.entry.base
    base_path = resolve(str(base_name), progress, cancel)[0] if base_name else None
    return [(path, choice), (base_path, None)]


def detect(case: Case | Volume, model: str | None = None, *, adapter: str | None = None,
           atlas: list[Case | Volume] | None = None, deformable: bool | None = None, device: str | None = None,
           precision: str = "auto", progress: Callback = None, cancel: Cancel = None) -> Landmarks:
    """Landmarks on `case` by a model (weight file or catalogue name, optionally with a LoRA adapter file), by an
    adapter fine-tuned on the atlas alone (`adapter` without a model), or by the weight-free atlas of annotated
    `atlas` cases (`deformable`: its B-spline stage, as load_detector's atlas_deformable). Volume atlas cases
    make the 3D atlas, which detects on a Volume (points in LPS mm)."""
    from .detectors.factory import check_kind

    check(cancel)
    detector = load_detector(model, adapter=adapter, atlas=atlas, atlas_deformable=deformable, device=device,
                             precision=precision, progress=within(progress, 0.0, 0.1), cancel=cancel)
    check_kind(detector, case)
    return detector.detect(case, within(progress, 0.1, 1.0), cancel)


def detect_files(detector, paths, out, *, spacing: float | None = None, analyze_out=None, on_error=None,
                 warn=None, progress: Callback = None, cancel: Cancel = None, on_image=None):
    """Detect on image or volume files and write `out/<case id>.mrk.json` each and one `out/landmarks.csv`
    (and with `analyze_out` the cephalometric analysis CSV there). A folder stands for its image (or volume)
    files and for every DICOM series in it and its subfolders. An image that cannot be read or detected on is
    reported through on_error(line) and the others go on; on_image(input, its .mrk.json) hears of each image as
    it is written; warn(line) of measures the analysis cannot give. Cancel stops
    between images (the .mrk.json files written stay; no landmarks.csv). Under torchrun each process detects on
    its share of the images and rank 0 writes landmarks.csv. Returns batch.Batch: the files written (all
    processes'), how many images failed (all processes'), how many there were, the analysis report."""
    from . import batch

    return batch.detect_files(detector, paths, Path(out), spacing=spacing,
                              analyze_out=None if analyze_out is None else Path(analyze_out),
                              on_error=on_error or _stderr, warn=warn or _warning, progress=progress, cancel=cancel,
                              on_image=on_image)


def detect_many(detector, cases: list, *, read=None, on_found, on_error, progress: Callback = None,
                cancel: Cancel = None) -> int:
    """Detect on each of `cases` with the loop of detect_files: Cases or Volumes (e.g. an application's open
    images), or anything read(item) makes one of, read one at a time. on_found(n, case, landmarks) hears of each,
    on_error(n, line) of one that fails (the others go on); progress per case, Cancel between cases. Returns how
    many failed."""
    from . import batch

    def found(n, item, case, landmarks):
        on_found(n, case, landmarks)
        return True

    return batch.detect_each(detector, list(enumerate(cases)), lambda item: read(item[1]) if read else item[1],
                             found, lambda item, line: on_error(item[0], line), progress, cancel)


def check_images(paths, spacing: float | None = None, out=None) -> list:
    """The images of a batch (folders expanded as detect_files does), or one line, before anything loads, for a
    batch that cannot work: none of the files is there, a spacing that is not a positive number, two images
    whose outputs would share a name, an output folder where an image's own points would be overwritten
    (detect_files checks it too)."""
    from . import batch

    inputs = batch.batch_inputs(paths)
    batch.check_inputs(inputs, spacing, None if out is None else Path(out))
    return inputs


def _stderr(line: str) -> None:
    print(f"medsapiens: error: {line}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- fine-tune
def finetune(base: str | None, cases: list[Case], out, *, unannotated: list[Case] = (), flip_pairs=(),
             device: str | None = None, precision: str = "fp32", warm_start: bool = True, keep_worse: bool = False,
             progress: Callback = None, cancel: Cancel = None, **settings):
    """Train an adapter for the cases' landmarks and write it atomically to `out` (on Cancelled, NotBetter or
    any error `out` is left as it was); returns training.loops.FinetuneResult (path, steps, seconds, ...).

    base None: learn on top of the weight-free atlas of the cases (training/refine.py): a patch refiner with its
    error estimated on held-out cases, warm-started from an adapter at `out` for the same landmarks (unless
    warm_start is False); `unannotated`: more images of the task for the atlas to label and the refiner to learn
    from. NotBetter (one line) when it was worse than the atlas on the held-out cases, unless keep_worse.
    settings: RefineSettings fields by name (steps, time_budget, lr, deformable, ...).
    base a weight file, catalogue name or architecture name: LoRA fine-tuning (training.loops.finetune);
    settings: LoraSettings fields by name (time_budget, steps, lr, input_hw, augment, views_per_case,
    lora_blocks, ...); flip_pairs: symmetric landmark pairs by name.
    """
    if base is None:
        from .training.refine import finetune_on_atlas

        return finetune_on_atlas(cases, out, unannotated=unannotated, progress=progress, cancel=cancel,
                                 warm_start=warm_start, keep_worse=keep_worse,
                                 settings=override(REFINE_DEFAULTS, "settings for fine-tuning on the atlas",
                                                   **settings))
    if unannotated:
        raise InputError("unannotated images are for fine-tuning on the atlas (no base model)")
    from .training.loops import check_cases
    from .training.loops import finetune as lora_finetune

    names = check_cases(cases)
    return lora_finetune(base, cases, out, flip_pairs=_flip_pairs(flip_pairs, names), device=device,
                         precision=precision, progress=progress, cancel=cancel,
                         settings=override(LORA_DEFAULTS, "fine-tune settings", **settings))


def _review(calibration: dict | None) -> dict | None:
    return None if not calibration else {"review_below": calibration["review_below"], **calibration["held_out"]}


def _flip_pairs(pairs, names: list[str]) -> list[tuple[int, int]]:
    out = []
    for a, b in pairs:
        if a not in names or b not in names:
            raise InputError(f"flip pair {a}:{b}: both names must be landmarks of the cases ({', '.join(names)})")
        out.append((names.index(a), names.index(b)))
    return out


def adapter_info(path) -> dict:
    """What an application shows of an adapter fine-tuned on the atlas, read from the file's header (no torch):

    adapter_mre_mm, atlas_mre_mm: the held-out mean radial error of the refiner (on every landmark) and of the
    atlas, in mm; method ("leave-one-case-out" or "N-fold") and cases_estimated (how many held-out cases);
    per_landmark: name -> {"atlas_mm", "refined_mm"} (None where no held-out case has it); refined_landmarks:
    the names the detector refines (all but those where the held-out cases show the atlas better beyond chance;
    there it keeps the atlas's answer); landmark_names; cases: [{"label", "sha256"}] the atlas cases it holds and was
    trained on (sha256 = case_checksum(case, landmark_names)); unannotated_images (how many atlas-labelled
    images it also learned from); review: None for adapters fine-tuned before confidence was calibrated, else
    {"review_below": P threshold of the `check` flag, and on the held-out cases "flagged" (share of points),
    "gross_errors" (> 3 mm), "gross_caught" (share of them flagged), "auc", "calibration_error", "points"};
    atlas_deformable: whether its atlas has the B-spline stage; atlas_stage: None where the stage was not tried,
    else {"bspline": kept, "cases", "affine_mm", "bspline_mm"} (the held-out errors it was chosen by);
    steps, steps_per_fold, train_seconds, warm_started, schedule_complete, created.
    """
    from .models.weight_files import read_metadata

    meta = read_metadata(path)
    if not meta or meta.get("kind") != "atlas-refiner":
        raise InputError(f"{path}: not an adapter fine-tuned on the atlas")
    est, names = meta["estimate"], meta["landmark_names"]
    return {"path": str(path), "landmark_names": names, "adapter_mre_mm": est["refined_mre_mm"],
            "atlas_mre_mm": est["atlas_mre_mm"], "method": est["method"],
            "cases_estimated": sum(len(h) for h in est["held_out_cases"]), "per_landmark": est["per_landmark"],
            "review": _review(est.get("calibration")),
            "refined_landmarks": [n for n, use in zip(names, meta["use_refined"]) if use],
            "cases": [{"label": c["label"], "sha256": c["sha256"]} for c in meta["cases"]],
            "unannotated_images": meta.get("unannotated_images", 0),
            "atlas_deformable": bool(meta["atlas_settings"].get("deformable")), "atlas_stage": est.get("atlas_stage"),
            **{k: meta.get(k) for k in ("steps", "steps_per_fold", "train_seconds", "warm_started",
                                        "schedule_complete", "created")}}


# ------------------------------------------------------------------------------------------ train and evaluate
def train(data: list, out, *, rows: slice | None = None, arch: str = DEFAULT_ARCH, epochs: float | None = None,
          resume=None, device=None, precision="fp32", progress: Callback = None, cancel: Cancel = None,
          **settings) -> Path:
    """Train a whole model on annotated data sets (one: a specialist; several: a generalist with one head over
    the union of their landmarks) and write it to `out`; under torchrun it runs data-parallel. epochs: passes
    over the images (else the time budget decides); settings: TrainSettings fields by name."""
    from .io.datasets import Dataset
    from .training.loops import train as train_model
    from .training.loops import union_names

    sets = [Dataset(d) for d in data]
    names = union_names([d.names for d in sets])
    cases = [d.case(i) for d in sets for i in _rows(rows, len(d), d.path)]
    s = override(TRAIN_DEFAULTS, "training settings", **settings)
    world = distributed.world_size()
    if epochs is not None:
        s = override(s, steps=max(1, round(epochs * len(cases) / (s.batch * world))))
    return train_model(cases, names, out, arch=arch, settings=s, resume=resume, device=device, precision=precision,
                       progress=progress, cancel=cancel)


def evaluate(detector, data, rows: slice | None = None, radii=None, progress: Callback = None):
    """Detect on an annotated data set's rows and score against its annotations: analysis.evaluation.Evaluation
    (MRE / SDR in mm, per landmark); radii default to the ceph ones for images and the 3D ones for volumes."""
    from .analysis.evaluation import evaluate as run
    from .io.datasets import Dataset
    from .settings import CEPH_RADII, VOLUME_RADII

    ds = Dataset(data)
    radii = radii or (VOLUME_RADII if ds.dim == 3 else CEPH_RADII)
    return run(detector, ds, _rows(rows, len(ds), ds.path), radii, progress), ds


def write_evaluation(evaluation, dataset, out, title: str) -> list[Path]:
    """report.json, report.md and the plots of an evaluation in `out`."""
    from .analysis.evaluation import write_report

    return write_report(evaluation, dataset, Path(out), title)


def _rows(rows: slice | None, n: int, what) -> list[int]:
    chosen = list(range(n))[rows] if rows is not None else list(range(n))
    if not chosen:
        start, stop = ("" if v is None else v for v in (rows.start, rows.stop))
        raise InputError(f"--rows {start}:{stop}: selects no rows of {what} ({n} rows)")
    return chosen


# -------------------------------------------------------------------------------------------------- analysis
def analyses() -> dict:
    """The analyses to choose from: name -> title (DEFAULT_ANALYSIS is isbi2015, the first)."""
    from .analysis.results import choices

    return choices()


def analyze(landmarks: Landmarks, spacing, analysis: str = DEFAULT_ANALYSIS) -> list:
    """One analysis (a name of `analyses()`) of one image: its measurements, each with name, title, value (NaN
    when not computed), missing, landmarks, drawn (the tracing's lines and angles), text(), normal_range and
    reading. `landmarks` in pixels with the ISBI 2015 names, spacing (sx, sy) mm."""
    from .analysis.results import analyze as measure
    from .analysis.results import parse

    return measure(landmarks, spacing, parse(analysis)[0])


def tracing(analysis: str = DEFAULT_ANALYSIS) -> tuple:
    """The lines (2 points) and angles (3, vertex in the middle) a tracing of the analysis draws; a point is a
    landmark name or a tuple of names (their midpoint)."""
    from .analysis.results import parse
    from .analysis.results import tracing as drawn

    return drawn(parse(analysis)[0])


def can_analyze(names) -> bool:
    """Whether a landmark set holds every landmark the ISBI 2015 analysis reads (the ISBI 19 do)."""
    from .analysis.cephalometry import covers

    return covers(names)


def write_measurements(path, label: str, measurements: list) -> Path:
    """The measurements of one image (of any analysis) as a CSV, one row each, written atomically (the panel's
    export)."""
    from .analysis.cephalometry import measurements_csv
    from .io.atomic import atomic_write_text

    return atomic_write_text(path, measurements_csv(label, measurements))


def write_report(path, title: str, image, landmarks: Landmarks, spacing, analysis=DEFAULT_ANALYSIS,
                 source: str = "annotated") -> list[Path]:
    """The report of one image: `path` (HTML, the picture embedded) and the PDF beside it, with the radiograph
    (a 2D array), the tracing and tables of the analyses (comma-separated names or a sequence), the landmark
    source and the points flagged for checking; written atomically. Returns the files."""
    from .analysis.report import write_report as write
    from .analysis.results import analyze as measure
    from .analysis.results import parse

    by_analysis = {a: measure(landmarks, spacing, a) for a in parse(analysis)}
    return write(path, title, image, landmarks, by_analysis, source)


def analyze_files(source, out, *, analysis=DEFAULT_ANALYSIS, report=None, warn=None, on_error=None):
    """The analyses (comma-separated names, or "all") of every image of a landmarks.csv (or a folder with one, or
    with .mrk.json + image pairs) written to the CSV `out`, and with `report` a folder of HTML + PDF reports, one
    per image. warn(line) hears of measures a landmark set or an image cannot give; on_error(line) of an image
    whose report cannot be made. Returns batch.Batch: the files, how many images failed, the text report."""
    from . import batch
    from .analysis.results import parse
    from .io.datasets import landmark_sets

    chosen, source = parse(analysis), Path(source)
    items, warn = landmark_sets(source), warn or _warning
    batch.check_cephalometric(items[0][1].names, source, warn, chosen)
    path, text, rows = batch.write_analysis(items, Path(out), warn, chosen)
    done = batch.Batch([path], 0, text)
    if report is not None:
        files, done.failed = batch.write_reports(source, rows, {i: lm for i, lm, _ in items}, Path(report),
                                                 on_error or _stderr)
        done.written += files
    return done


def _warning(line: str) -> None:
    print(f"medsapiens: warning: {line}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- files
def load_cases(path, ids: list[str] | None = None) -> list[Case | Volume]:
    """Annotated cases from a landmarks.csv (all rows, or those of `ids`) or a folder of `.mrk.json` + images."""
    from .io.datasets import load_cases as load

    return load(path, ids)


def read_image(path, spacing: float | None = None) -> Case:
    """A 2D image file (PNG, JPEG, TIFF, BMP, NRRD, NIfTI, MHA, DICOM) as a Case with the file's geometry;
    `spacing` (mm) supplies or overrides the pixel size."""
    from .io.images import read_image as read

    return read(path, spacing)


def read_volume(path) -> Volume:
    """A 3D volume file (NIfTI, NRRD, MHA, a DICOM file or series folder) as a Volume with its geometry."""
    from .io.images import read_volume as read

    return read(path)


def read_images(paths, what: str = "") -> list[Case]:
    """The images of these files and folders (a folder: the image files in it), as cases without landmarks;
    `what` names them in the error for none at all (e.g. the flag that gave them)."""
    from .io.images import image_files, read_image

    files = image_files(paths)
    if not files:
        raise InputError(f"{what + ' ' if what else ''}{' '.join(map(str, paths))}: no image files there")
    return [read_image(p) for p in files]


def landmark_names(path) -> list[str]:
    """The landmark names of a landmarks.csv, in its order."""
    from .io.datasets import Dataset

    return list(Dataset(path).names)


def landmark_sets() -> dict:
    """The landmark sets shipped with the engine: name -> title (isbi2015, hand37)."""
    from .landmark_sets import shipped

    return {name: s.title for name, s in shipped().items()}


def landmark_set(source, title: str | None = None):
    """A landmark_sets.LandmarkSet (ordered names, a one-line description each, an optional picture) from a
    shipped set's name, a catalogue model's name, a file (CSV name,description; JSON; the names of a .mrk.json,
    of a landmarks.csv or of a .safetensors model or adapter) or a sequence of names (an annotated case's;
    `title` says whose in messages)."""
    from .landmark_sets import load

    return load(source, title)


def check_landmark_names(names, what: str, landmark_set=None) -> None:
    """One line (InputError) about `what` when names repeat, or do not match `landmark_set`: a name it lacks, or
    fewer than its landmarks."""
    from .landmark_sets import check_names

    check_names(names, what, landmark_set)


def architectures() -> list[str]:
    """The model architectures `train` and `finetune --base` can build from scratch (imports torch)."""
    from .models.sapiens import ARCHS

    return list(ARCHS)


def demo(data=None, out="demo_out", n_atlases: int = 3, n_cases: int = 4) -> int:
    """The weight-free atlas on unseen cases from a few annotated ones, end to end, offline (phantom images
    when no data set is given): MRE/SDR on stdout, .mrk.json files and an overlay picture in `out`."""
    from .demo import run_demo

    return run_demo(None if data is None else Path(data), Path(out), n_atlases=n_atlases, n_cases=n_cases)


def phantom_case(seed: int) -> Case:
    """A generated radiograph-like image with landmarks (demos and self-tests; no data needed)."""
    from .phantom import phantom_case as make

    return make(seed)
