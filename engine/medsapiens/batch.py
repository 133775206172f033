"""Jobs over many files: detect on a batch of images or volumes, analyse a set of landmark files.

One image that cannot be read or detected on is reported in one line and the others go on; the outputs are
written atomically, one `.mrk.json` per image and one `landmarks.csv` (and analysis) at the end. A folder stands
for its image files and every DICOM series in it and its subfolders. Under `torchrun` each process detects on
its share of the images (rank::world) and rank 0 writes the one `landmarks.csv` of them all.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from . import distributed
from .detectors.factory import check_kind
from .errors import InputError, short_list
from .io.datasets import square_pixels, write_landmarks_csv, write_volume_landmarks_csv
from .io.images import FORMAT_SUFFIXES, case_id, dicom_series, read_dicom_volume, read_image, read_volume
from .io.markups import write_markups
from .progress import Callback, Cancel, check, report
from .settings import DEFAULT_ANALYSIS

# how long the processes of a torchrun batch wait for the slowest one to finish its share (torchrun ends them
# all at once if one fails, so a long wait cannot hang)
GATHER_TIMEOUT = timedelta(hours=24)
# the image and volume files of a folder, by name (not its .mrk.json files); its DICOM files go by their content
_NOT_DICOM = tuple(s for s in FORMAT_SUFFIXES if s not in (".dcm", ".dicom", ".mrk.json"))


@dataclass
class Batch:
    """What a batch wrote: the files (stdout lists them), how many images failed, the analysis report if any."""

    written: list[Path] = field(default_factory=list)
    failed: int = 0
    report: str | None = None
    images: int = 0


@dataclass(frozen=True)
class Input:
    """One image or volume of a batch: a file as given, or one DICOM series found in a folder."""

    path: Path                    # the file, or the folder that holds the series
    id: str                       # its case id: `<id>.mrk.json`
    files: tuple[Path, ...] = ()  # a DICOM series: its files in slice order
    series: str = ""              # its Series Instance UID where its folder holds several series

    @property
    def label(self) -> str:
        """How its lines name it: the file, or the series' folder (and UID)."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.path} (series {self.series})" if self.series else str(self.path)

    @property
    def source(self) -> Path:
        """What its landmarks.csv row points to: the file, or the series' folder."""
        return self.files[0] if len(self.files) == 1 else self.path


def batch_inputs(paths) -> list[Input]:
    """The images of files and folders (given Inputs stay as they are): a file is itself (a missing one too: its
    line comes when it is read); a folder stands for its image and volume files (sorted by name; not its
    .mrk.json files) and for every DICOM series in it and its subfolders, named by their path below it; a
    folder without any is refused in one line."""
    inputs = []
    for path in paths:
        if isinstance(path, Input):
            inputs.append(path)
        elif Path(path).is_dir():
            found = _folder_inputs(Path(path))
            if not found:
                raise InputError(f"{path}: no image files there")
            inputs += found
        else:
            inputs.append(Input(Path(path), case_id(path)))
    return inputs


def _folder_inputs(folder: Path) -> list[Input]:
    """A folder's image and volume files, then its DICOM series: a series of one file (a radiograph) named by
    the file's path below the folder, a series of slices by its folder's (the folder's own name at the top),
    with its UID where that folder holds several series."""
    inputs = [Input(p, case_id(p)) for p in sorted(folder.iterdir())
              if p.is_file() and p.name.lower().endswith(_NOT_DICOM)]
    series = dicom_series(folder)
    per_folder = Counter(where for where, _, _ in series)
    for where, uid, files in series:
        below = where.relative_to(folder).parts
        if len(files) == 1:
            inputs.append(Input(where, "_".join((*below, case_id(files[0]))), tuple(files)))
            continue
        name, several = "_".join(below) or folder.name, per_folder[where] > 1
        inputs.append(Input(where, f"{name}_{uid}" if several else name, tuple(files), uid if several else ""))
    return inputs


def detect_files(detector, paths, out: Path, *, spacing=None, analyze_out=None, on_error, warn,
                 progress: Callback = None, cancel: Cancel = None, on_image=None) -> Batch:
    """`out/<case id>.mrk.json` per image and `out/landmarks.csv` (see api.detect_files)."""
    inputs = batch_inputs(paths)
    check_inputs(inputs, spacing, out)
    if analyze_out is not None:
        check_cephalometric(detector.names, "the model", warn)
    volumes = detector.dim == 3
    if volumes and spacing is not None:
        raise InputError("--spacing is for 2D images without one; volumes keep their files' spacing")
    _make_folder(out)
    rank, world = distributed.setup("cpu", GATHER_TIMEOUT)  # gloo: only the rows travel
    written, rows = {}, {}  # by the input's place in the batch

    def found(n, item, case, landmarks):
        n = rank + n * world
        written[n] = write_markups(out / f"{item.id}.mrk.json", landmarks, case)
        rows[n] = _csv_row(item, out, case, landmarks, volumes, on_error)
        if on_image:
            on_image(item, written[n])
        return rows[n] is not None

    errors = detect_each(detector, inputs[rank::world], lambda item: read_input(item, volumes, spacing), found,
                         lambda item, line: on_error(line), progress, cancel)
    if world > 1:  # every process hears of every other's files and rows; rank 0 writes the table of them all
        parts = distributed.gather((written, rows, errors))
        written = {n: path for part in parts for n, path in part[0].items()}
        rows = {n: row for part in parts for n, row in part[1].items()}
        errors = sum(part[2] for part in parts)
    batch = Batch([written[n] for n in sorted(written)], errors, images=len(inputs))
    report(progress, 1.0, f"detected on {len(inputs) - errors} of {len(inputs)}")
    if rank == 0:
        _tables(batch, [rows[n] for n in sorted(rows) if rows[n] is not None], out, volumes, analyze_out, warn)
    if world > 1:
        distributed.leave()  # the processes end together, with the table written
    return batch


def detect_each(detector, items: list, read, on_found, on_error, progress: Callback = None,
                cancel: Cancel = None) -> int:
    """Detect on each item in turn, the one loop of every batch (files, the images an application sends):
    read(item) makes its Case or Volume, on_found(n, item, case, landmarks) takes the result (False: it failed
    after all); an item that cannot be read or detected on goes to on_error(item, line) and the others go on.
    Progress per item, Cancel between items and between the detector's stages. Returns how many failed."""
    failures = 0
    for n, item in enumerate(items):
        check(cancel)
        case = None
        try:
            case = read(item)  # one at a time: a batch of thousands is never all in memory
            report(progress, n / len(items), f"detecting on {case.label}: {n + 1} of {len(items)}", step=n,
                   total=len(items))
            check_kind(detector, case)
            landmarks = detector.detect(case, cancel=cancel)
        except (InputError, RuntimeError) as e:  # RuntimeError: ITK or torch failing on this image's content
            label = getattr(item, "label", case.label if case is not None else str(item))
            on_error(item, _naming(label, case, e) if isinstance(e, InputError) else
                     f"{label}: detection failed ({_first_line(e)})")
            failures += 1
            continue
        failures += not on_found(n, item, case, landmarks)
    return failures


def read_input(item: Input, volumes: bool, spacing=None):
    """The Case (or, for a 3D detector, the Volume) of a batch's input, named by its case id."""
    if volumes:
        return read_dicom_volume(item.path, list(item.files), item.id) if item.files else read_volume(item.path)
    if len(item.files) > 1:
        raise InputError(f"{item.label}: a DICOM series of {len(item.files)} slices (a volume); this detector "
                         "works on 2D images")
    return replace(read_image(item.source, spacing=spacing), name=item.id)


def check_inputs(inputs: list[Input], spacing, out: Path | None = None) -> None:
    """Refuse, before any model loads, a batch that cannot work: nothing there at all, a bad spacing, two
    images whose outputs would have the same name, an output that would overwrite an image's annotation."""
    if spacing is not None and not (spacing == spacing and 0 < spacing < float("inf")):
        raise InputError(f"--spacing {spacing:g}: must be a positive number of mm")
    if not any(i.files or i.path.exists() for i in inputs):
        more = f" (nor the {len(inputs) - 1} others)" if len(inputs) > 1 else ""
        raise InputError(f"{inputs[0].path}: no such image file{more}")
    ids = [i.id for i in inputs]
    clash = {s for s in ids if ids.count(s) > 1}
    if clash:
        raise InputError(f"several images share the name {sorted(clash)[0]}; their outputs would overwrite each other")
    for item in inputs if out is not None else ():
        beside = item.source.parent / f"{item.id}.mrk.json"
        if beside.is_file() and beside.parent.resolve() == Path(out).resolve():
            raise InputError(f"{beside}: the points beside the image {item.source.name}; detecting into this folder "
                             "would overwrite them: choose another output folder")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot make the output folder ({e.strerror or e})") from None


def _csv_row(item: Input, out: Path, case, found, volumes: bool, on_error):
    """The image's landmarks.csv row, or None (said in one line) where its pixels cannot be written there."""
    image = os.path.relpath(item.source.resolve(), out.resolve())
    if volumes:
        return image, found
    if not square_pixels(case.spacing):  # the .mrk.json holds the result; the CSV's one spacing_mm cannot
        on_error(f"{item.label}: its pixels are {case.spacing[0]:g} x {case.spacing[1]:g} mm, which the one "
                 "spacing_mm of landmarks.csv cannot describe; left out of it")
        return None
    return image, *case.size, case.spacing, found


def _tables(batch: Batch, rows: list, out: Path, volumes: bool, analyze_out, warn) -> None:
    if not rows:
        return
    if volumes:
        batch.written.append(write_volume_landmarks_csv(out / "landmarks.csv", rows, review=True))
        return
    batch.written.append(write_landmarks_csv(out / "landmarks.csv", rows, review=True))
    if analyze_out is not None:
        path, batch.report, _ = write_analysis([(image, lm, spacing) for image, _, _, spacing, lm in rows],
                                               analyze_out, warn)
        batch.written.append(path)


def _naming(label: str, case, error: InputError) -> str:
    """The error's line naming the file (a detector names the case it was given, by its id)."""
    text, prefix = str(error), f"{case.label}: " if case is not None else None
    if prefix and text.startswith(prefix):
        return f"{label}: {text[len(prefix):]}"
    return text


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def check_cephalometric(names, source, warn, analyses=(DEFAULT_ANALYSIS,)) -> None:
    """Refuse a landmark set from which no measure of the analyses can be computed; warn(line) once of the
    measures it cannot give."""
    from .analysis.results import label, measures

    chosen = [(a, m) for a in analyses for m in measures(a)]
    used = tuple(dict.fromkeys(n for _, m in chosen for n in m.landmarks))
    absent = [n for n in used if n not in names]
    if all(set(m.landmarks) & set(absent) for _, m in chosen):
        raise InputError(f"{source}: no cephalometric measure can be computed from landmarks {short_list(names)}: "
                         f"the analysis needs {', '.join(used)} (ISBI 2015 names)")
    lost = [label(a, m.name) for a, m in chosen if set(m.landmarks) & set(absent)]
    if lost:
        warn(f"{source}: no {', '.join(absent)} in the landmark set, so {', '.join(lost)} stay empty")


def write_analysis(items, out: Path, warn, analyses=(DEFAULT_ANALYSIS,)) -> tuple[Path, str, list]:
    """Analyse (image, landmarks, spacing) items into the CSV `out`; (its path, the report: legend + images, the
    rows: (image, {analysis: measurements})). warn(line) hears of each image's missing landmarks (not of the set's
    own gaps: check_cephalometric)."""
    from .analysis.cephalometry import class_legend, format_report
    from .analysis.results import ISBI, analyze, format_results, image_gaps, results_csv
    from .io.atomic import atomic_write_text

    rows = [(image, {a: analyze(lm, spacing, a) for a in analyses}) for image, lm, spacing in items]
    blocks = [class_legend()] if ISBI in analyses else []
    for (image, by_analysis), (_, lm, _) in zip(rows, items):
        for line in image_gaps(image, by_analysis, lm.names):
            warn(line)
        blocks += [format_report(image, m) if a == ISBI else format_results(image, a, m)
                   for a, m in by_analysis.items()]
    path = atomic_write_text(out, results_csv(rows, analyses))
    return path, "\n".join(blocks), rows


def write_reports(source: Path, rows: list, landmarks: dict, out: Path, on_error) -> tuple[list[Path], int]:
    """`out/<case id>.html` and `.pdf` per analysed image (rows as write_analysis returns them; landmarks: image
    -> Landmarks); an image that cannot be read is said in one line and the others go on. (files, failures)"""
    from .analysis.report import write_report

    _make_folder(out)
    written, failed = [], 0
    for image, by_analysis in rows:
        try:
            pixels, origin = _report_image(source, image, landmarks[image])
        except InputError as e:
            on_error(str(e))
            failed += 1
            continue
        written += write_report(out / f"{case_id(Path(image))}.html", image, pixels, landmarks[image], by_analysis,
                                origin)
    return written, failed


def _report_image(source: Path, image: str, found) -> tuple:
    """The pixels of an analysed image, and where its landmarks came from (the report's source line)."""
    import numpy as np

    from .io.datasets import Dataset

    if source.is_dir() and not (source / "landmarks.csv").is_file():  # .mrk.json + image pairs
        path = next((p for p in sorted(source.iterdir()) if case_id(p) == image and not p.name.endswith(".mrk.json")),
                    source / image)
        detected = np.any((found.confidence > 0) & (found.confidence < 1))
        origin = f"{'detected, confidences' if detected else 'annotated'} in {image}.mrk.json"
    else:
        path, origin = Dataset(source).root / image, f"annotated in {source}"
    return read_image(path).image, origin
