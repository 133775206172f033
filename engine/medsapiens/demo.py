"""`medsapiens demo`: the weight-free atlas detector on unseen cases from 3 annotated ones, end to end, offline."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .analysis.metrics import format_summary, radial_errors, summary
from .case import Case, Landmarks
from .detectors.atlas import stage_line
from .detectors.factory import atlas_detector
from .errors import InputError
from .io.atomic import atomic_write
from .io.datasets import Dataset, write_landmarks_csv
from .io.markups import write_markups
from .phantom import phantom_case
from .settings import CEPH_RADII


def _cases(data: Path | None, n_atlases: int, n_cases: int) -> tuple[list[Case], list[Case], str]:
    if data is None:
        return ([phantom_case(s) for s in range(n_atlases)],
                [phantom_case(100 + s) for s in range(n_cases)], "generated phantom radiographs")
    ds = Dataset(data)
    if len(ds) < n_atlases + n_cases:
        raise InputError(f"{ds.path}: {len(ds)} cases, the demo needs {n_atlases + n_cases}")
    first_unseen = max(n_atlases, len(ds) // 2)  # score on the second half, as the benchmarks do
    atlas_rows = range(n_atlases)
    case_rows = range(first_unseen, min(first_unseen + n_cases, len(ds)))
    return [ds.case(i) for i in atlas_rows], [ds.case(i) for i in case_rows], str(ds.path)


def overlay(case: Case, truth: Landmarks, found: Landmarks) -> np.ndarray:
    """RGB uint8 image with truth as green and detections as red crosses."""
    grey = case.image if case.image.ndim == 2 else case.image.mean(axis=2)
    lo, hi = np.percentile(grey, [0.5, 99.5])
    rgb = np.repeat(np.clip((grey - lo) * 255.0 / max(hi - lo, 1e-6), 0, 255).astype(np.uint8)[..., None], 3, 2)
    h, w = grey.shape
    arm = max(3, min(h, w) // 80)
    for points, present, colour in ((truth.points, truth.present, (0, 220, 0)),
                                    (found.points, found.present, (255, 40, 40))):
        for (x, y), ok in zip(points, present):
            if not ok:
                continue
            x, y = int(round(x)), int(round(y))
            if 0 <= x < w and 0 <= y < h:
                rgb[max(y - arm, 0): y + arm + 1, x] = colour
                rgb[y, max(x - arm, 0): x + arm + 1] = colour
    return rgb


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), tmp,
                                                   imageIO="PNGImageIO"))


def run_demo(data: Path | None, out: Path, n_atlases: int = 3, n_cases: int = 4) -> int:
    if n_atlases < 1 or n_cases < 1:
        raise InputError("--atlases and --cases must be at least 1")
    start = time.perf_counter()
    atlases, cases, source = _cases(data, n_atlases, n_cases)
    print(f"demo: {len(atlases)} annotated cases -> {len(cases)} unseen cases ({source})", file=sys.stderr)
    detector = atlas_detector(atlases)  # as Detect makes it: the B-spline stage chosen on the cases
    out.mkdir(parents=True, exist_ok=True)
    errors, mean_found, rows, results = [], [], [], []
    for case in cases:
        t = time.perf_counter()
        found = detector.detect(case)
        results.append(found)
        errors.append(radial_errors(found, case.landmarks, case.spacing))
        mean_found.append(errors[-1][np.isfinite(errors[-1])].mean())
        image_path = out / f"{case.name}.png"
        _write_png(image_path, case.image)
        write_markups(out / f"{case.name}.mrk.json", found, case)
        rows.append((image_path.name, *case.size, case.spacing, found))
        print(f"  {case.name}: {mean_found[-1]:.2f} mm mean error, {time.perf_counter() - t:.1f} s", file=sys.stderr)
    write_landmarks_csv(out / "landmarks.csv", rows, review=True)
    worst = int(np.argmax(mean_found))
    _write_png(out / "overlay.png", overlay(cases[worst], cases[worst].landmarks, results[worst]))
    print(f"atlas detector, {len(atlases)} atlases: {format_summary(summary(np.array(errors), CEPH_RADII))}")
    if detector.stage is not None:
        print(stage_line(detector.stage), file=sys.stderr)
    print(f"wrote {out}/*.mrk.json, landmarks.csv and overlay.png (green truth, red detected: "
          f"{cases[worst].name}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
