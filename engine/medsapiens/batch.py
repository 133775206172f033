"""Jobs over many files: detect on a batch of images or volumes, analyse a set of landmark files.

One image that cannot be read or detected on is reported in one line and the others go on; the outputs are
written atomically, one `.mrk.json` per image and one `landmarks.csv` (and analysis) at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .detectors.factory import check_kind
from .errors import InputError, short_list
from .io.datasets import square_pixels, write_landmarks_csv, write_volume_landmarks_csv
from .io.images import case_id, read_image, read_volume
from .io.markups import write_markups
from .progress import Callback, report
from .settings import DEFAULT_ANALYSIS


@dataclass
class Batch:
    """What a batch wrote: the files (stdout lists them), how many images failed, the analysis report if any."""

    written: list[Path] = field(default_factory=list)
    failed: int = 0
    report: str | None = None


def detect_files(detector, paths: list[Path], out: Path, *, spacing=None, analyze_out=None, on_error, warn,
                 progress: Callback = None) -> Batch:
    """`out/<case id>.mrk.json` per image and `out/landmarks.csv` (see api.detect_files)."""
    check_inputs(paths, spacing)
    if analyze_out is not None:
        check_cephalometric(detector.names, "the model", warn)
    volumes = detector.dim == 3
    if volumes and spacing is not None:
        raise InputError("--spacing is for 2D images without one; volumes keep their files' spacing")
    _make_folder(out)
    batch, rows = Batch(), []
    for n, path in enumerate(paths):
        report(progress, n / len(paths), f"detecting on {path.name}: {n + 1} of {len(paths)}", step=n,
               total=len(paths))
        case = None
        try:
            case = read_volume(path) if volumes else read_image(path, spacing=spacing)
            check_kind(detector, case)
            found = detector.detect(case)
        except (InputError, RuntimeError) as e:  # RuntimeError: ITK or torch failing on this image's content
            on_error(_naming(path, case, e) if isinstance(e, InputError) else
                     f"{path}: detection failed ({_first_line(e)})")
            batch.failed += 1
            continue
        batch.written.append(write_markups(out / f"{case_id(path)}.mrk.json", found, case))
        row = _csv_row(path, out, case, found, volumes, on_error)
        if row is None:
            batch.failed += 1
        else:
            rows.append(row)
    report(progress, 1.0, f"detected on {len(paths) - batch.failed} of {len(paths)}")
    _tables(batch, rows, out, volumes, analyze_out, warn)
    return batch


def check_inputs(paths: list[Path], spacing) -> None:
    """Refuse, before any model loads, a batch that cannot work: no file there at all, a bad spacing, two
    images whose outputs would have the same name."""
    if spacing is not None and not (spacing == spacing and 0 < spacing < float("inf")):
        raise InputError(f"--spacing {spacing:g}: must be a positive number of mm")
    if not any(p.exists() for p in paths):  # a DICOM series is a folder
        more = f" (nor the {len(paths) - 1} others)" if len(paths) > 1 else ""
        raise InputError(f"{paths[0]}: no such image file{more}")
    ids = [case_id(p) for p in paths]
    clash = {s for s in ids if ids.count(s) > 1}
    if clash:
        raise InputError(f"several images share the name {sorted(clash)[0]}; their outputs would overwrite each other")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot make the output folder ({e.strerror or e})") from None


def _csv_row(path: Path, out: Path, case, found, volumes: bool, on_error):
    """The image's landmarks.csv row, or None (said in one line) where its pixels cannot be written there."""
    image = os.path.relpath(path.resolve(), out.resolve())
    if volumes:
        return image, found
    if not square_pixels(case.spacing):  # the .mrk.json holds the result; the CSV's one spacing_mm cannot
        on_error(f"{path}: its pixels are {case.spacing[0]:g} x {case.spacing[1]:g} mm, which the one spacing_mm "
                 "of landmarks.csv cannot describe; left out of it")
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


def _naming(path: Path, case, error: InputError) -> str:
    """The error's line naming the file (a detector names the case it was given, by its id)."""
    text, label = str(error), f"{case.label}: " if case is not None else None
    if label and text.startswith(label):
        return f"{path}: {text[len(label):]}"
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
