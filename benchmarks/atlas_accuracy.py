"""Accuracy and speed of the weight-free atlas detector: atlases from the first cases, scored on the second half.

    python benchmarks/atlas_accuracy.py ../shared/data/ceph_hamedan --atlases 1 3 5
    python benchmarks/atlas_accuracy.py ../shared/data/hand_dha --atlases 3 --radii 2 4 10
    python benchmarks/atlas_accuracy.py ../shared/data/ceph_hamedan --upsample 2.5 --limit 20

Prints, per atlas count, MRE and SDR in mm over the scored images and the median seconds per image (the first
image includes the atlas's calibration on its cases and, with --stage auto as Detect runs it, the trial of its
B-spline stage, whose outcome is printed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from medsapiens import Case, Landmarks
from medsapiens.analysis.metrics import format_summary, radial_errors, summary
from medsapiens.detectors.atlas import AtlasDetector, stage_line
from medsapiens.settings import AtlasSettings, override
from medsapiens.io.datasets import Dataset


def upsampled(case: Case, f: float) -> Case:
    """The case resampled by f (pixel centres kept: x' = (x + 0.5) f - 0.5), spacing divided by f."""
    if f == 1:
        return case
    h, w = case.image.shape[:2]
    image = sitk.GetImageFromArray(case.image.astype(np.float32), isVector=case.image.ndim == 3)
    size = [round(w * f), round(h * f)]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, [(0.5 / f) - 0.5] * 2, [1 / f] * 2)
    lm = case.landmarks
    pixels = np.clip(sitk.GetArrayFromImage(out), 0, 255).astype(np.uint8)
    return Case(pixels, (case.spacing[0] / f, case.spacing[1] / f),
                Landmarks(lm.names, (lm.points + 0.5) * f - 0.5, present=lm.present), name=case.name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="data set folder (with landmarks.csv)")
    p.add_argument("--atlases", type=int, nargs="+", default=[3], help="atlas counts (first rows)")
    p.add_argument("--first-scored", type=int, default=51, help="1-based row where scoring starts (default 51)")
    p.add_argument("--limit", type=int, help="score only this many images")
    p.add_argument("--radii", type=float, nargs="+", default=[2, 2.5, 3, 4])
    p.add_argument("--stage", choices=("auto", "affine", "bspline"), default="auto",
                   help="the B-spline stage: tried on the cases and kept where clearly better (auto, as Detect), "
                        "never, or always")
    p.add_argument("--upsample", type=float, default=1.0, metavar="F",
                   help="resample every image by F, as a finer-sampled detector would give (default 1)")
    p.add_argument("--level-side", type=int, default=AtlasSettings().local.level_side,
                   help="AtlasSettings.local.level_side (a huge value keeps the local steps unscaled)")
    args = p.parse_args()
    ds = Dataset(args.data / "landmarks.csv")
    scored = list(range(args.first_scored - 1, len(ds)))[: args.limit]
    cases = [upsampled(ds.case(i), args.upsample) for i in scored]
    settings = override(AtlasSettings(), deformable=args.stage == "bspline", level_side=args.level_side)
    for n in args.atlases:
        detector = AtlasDetector([upsampled(ds.case(i), args.upsample) for i in range(n)], settings,
                                 choose_stage=args.stage == "auto")
        errors, times = [], []
        for case in cases:
            t = time.perf_counter()
            found = detector.detect(case)
            times.append(time.perf_counter() - t)
            errors.append(radial_errors(found, case.landmarks, case.spacing))
        print(f"{args.data.name}: {n} atlas(es) ({ds.rows[0].id}..{ds.rows[n - 1].id}), {len(cases)} images "
              f"({ds.rows[scored[0]].id}..{ds.rows[scored[-1]].id}): "
              f"{format_summary(summary(np.array(errors), args.radii))}; "
              f"{statistics.median(times):.2f} s/image (median)", flush=True)
        if detector.stage is not None:
            print(f"  {stage_line(detector.stage)}", flush=True)


if __name__ == "__main__":
    main()
