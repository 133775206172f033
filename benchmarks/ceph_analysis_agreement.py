"""Cephalometric classes from detected landmarks against annotator 1, next to annotator 2 against annotator 1.

    python benchmarks/ceph_analysis_agreement.py ../shared/data/ceph_hamedan --atlases 3

Detections come from the weight-free atlas detector (atlases = the first rows, scored on the second half, as
atlas_accuracy.py does). Per measure of the ISBI 2015 analysis (medsapiens.analysis.cephalometry): the share of
scored images whose class agrees with annotator 1's, and the median absolute difference of the value; the mean
agreement over the eight measures. Annotator 2 against annotator 1 on the same images is the human reference.
An image where either side lacks a measure's landmarks is left out of that measure.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from medsapiens.analysis.cephalometry import MEASURE_NAMES, analyze
from medsapiens.detectors.atlas import AtlasDetector
from medsapiens.io.datasets import Dataset


def measurements(landmarks, spacing) -> dict:
    return {m.name: m for m in analyze(landmarks, spacing)}


def compare(results, reference) -> dict:
    """Per measure: (agreeing images, compared images, median |value difference|)."""
    out = {}
    for name in MEASURE_NAMES:
        pairs = [(r[name], f[name]) for r, f in zip(reference, results)
                 if r[name].band is not None and f[name].band is not None]
        agree = sum(a.band.number == b.band.number for a, b in pairs)
        diff = statistics.median(abs(a.value - b.value) for a, b in pairs) if pairs else float("nan")
        out[name] = (agree, len(pairs), diff)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="ceph data set folder (landmarks.csv, landmarks_annotator2.csv)")
    p.add_argument("--atlases", type=int, default=3, help="atlas count (first rows; default 3)")
    p.add_argument("--first-scored", type=int, default=51, help="1-based row where scoring starts (default 51)")
    p.add_argument("--limit", type=int, help="score only this many images")
    args = p.parse_args()
    first = Dataset(args.data / "landmarks.csv")
    second = Dataset(args.data / "landmarks_annotator2.csv")
    if [r.image for r in first.rows] != [r.image for r in second.rows]:
        raise SystemExit("the two annotators' CSVs list different images")
    scored = list(range(args.first_scored - 1, len(first)))[: args.limit]
    detector = AtlasDetector([first.case(i) for i in range(args.atlases)])

    reference, human, detected, times = [], [], [], []
    for i in scored:
        case = first.case(i)
        t = time.perf_counter()
        found = detector.detect(case)
        times.append(time.perf_counter() - t)
        reference.append(measurements(first.rows[i].landmarks, case.spacing))
        human.append(measurements(second.rows[i].landmarks, case.spacing))
        detected.append(measurements(found, case.spacing))

    auto, inter = compare(detected, reference), compare(human, reference)
    print(f"{args.data.name}: atlas detector with {args.atlases} atlases ({first.rows[0].id}.."
          f"{first.rows[args.atlases - 1].id}), {len(scored)} images ({first.rows[scored[0]].id}.."
          f"{first.rows[scored[-1]].id}), {statistics.median(times):.2f} s/image (median)\n")
    print("| measure | detected vs annotator 1: class agreement | median abs. difference "
          "| annotator 2 vs annotator 1: class agreement | median abs. difference |")
    print("| --- | --- | --- | --- | --- |")
    for name in MEASURE_NAMES:
        unit = {"FHI": "", "MW": " mm"}.get(name, "°")
        cells = []
        for agree, n, diff in (auto[name], inter[name]):
            cells += [f"{100 * agree / n:.1f} % ({agree}/{n})", f"{diff:.3f}" if unit == "" else f"{diff:.2f}{unit}"]
        print(f"| {name} | {' | '.join(cells)} |")
    means = [np.mean([a / n for a, n, _ in table.values()]) for table in (auto, inter)]
    print(f"| mean of 8 | {100 * means[0]:.1f} % | | {100 * means[1]:.1f} % | |")


if __name__ == "__main__":
    main()
