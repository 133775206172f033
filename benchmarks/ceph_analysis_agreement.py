"""Cephalometric classes from detected landmarks against annotator 1, next to annotator 2 against annotator 1.

    python benchmarks/ceph_analysis_agreement.py ../shared/data/ceph_hamedan --atlases 3
    python benchmarks/ceph_analysis_agreement.py ../shared/data/ceph_hamedan --humans-only

The named analyses (Steiner, Downs, Björk-Jarabak, McNamara, Tweed; medsapiens.analysis.analyses) follow in a
second table: per computable measure, the share of images whose reading (within the norm, below, above) agrees
with annotator 1's and the median absolute difference. --humans-only: annotator 2 against annotator 1 alone, on
every image (no detection).

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
from medsapiens.analysis.results import ALL, ISBI, label
from medsapiens.analysis.results import analyze as analyze_named
from medsapiens.detectors.atlas import AtlasDetector
from medsapiens.io.datasets import Dataset


def measurements(landmarks, spacing) -> dict:
    return {m.name: m for m in analyze(landmarks, spacing)}


def named(landmarks, spacing) -> dict:
    """label -> Result of every named analysis's measures that the ISBI 19 give."""
    return {label(a, r.name): r for a in ALL if a != ISBI for r in analyze_named(landmarks, spacing, a)
            if set(r.landmarks) <= set(landmarks.names)}


def compare_named(results, reference) -> dict:
    """Per named measure: (images whose reading agrees (None without a norm), compared images, median |value
    difference| with its unit)."""
    out = {}
    for name in reference[0]:
        pairs = [(r[name], f[name]) for r, f in zip(reference, results) if not r[name].missing and
                 not f[name].missing]
        agree = sum(a.reading == b.reading for a, b in pairs) if reference[0][name].measure.norm else None
        diff = statistics.median(abs(a.value - b.value) for a, b in pairs)
        out[name] = (agree, len(pairs), f"{diff:.2f}{reference[0][name].measure.symbol}")
    return out


def print_named(tables: list, headers: list) -> None:
    print("\n| measure | " + " | ".join(f"{h}: reading agreement | median abs. difference" for h in headers) + " |")
    print("| --- |" + " --- | --- |" * len(headers))
    for name in tables[0]:
        cells = [c for agree, n, diff in (t[name] for t in tables)
                 for c in ("no norm" if agree is None else f"{100 * agree / n:.1f} % ({agree}/{n})", diff)]
        print(f"| {name} | {' | '.join(cells)} |")


def humans_only(first, second) -> None:
    """Annotator 2 against annotator 1 on every image, the named analyses only."""
    rows = range(len(first))
    reference = [named(first.rows[i].landmarks, first.rows[i].spacing) for i in rows]
    human = [named(second.rows[i].landmarks, first.rows[i].spacing) for i in rows]
    print(f"{first.path.parent.name}: annotator 2 against annotator 1, {len(first)} images")
    print_named([compare_named(human, reference)], ["annotator 2 vs annotator 1"])


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
    p.add_argument("--humans-only", action="store_true", help="annotator 2 against annotator 1 on every image, the "
                                                               "named analyses only (no detection)")
    args = p.parse_args()
    first = Dataset(args.data / "landmarks.csv")
    second = Dataset(args.data / "landmarks_annotator2.csv")
    if [r.image for r in first.rows] != [r.image for r in second.rows]:
        raise SystemExit("the two annotators' CSVs list different images")
    if args.humans_only:
        return humans_only(first, second)
    scored = list(range(args.first_scored - 1, len(first)))[: args.limit]
    detector = AtlasDetector([first.case(i) for i in range(args.atlases)])

    reference, human, detected, times, named_sets = [], [], [], [], ([], [], [])
    for i in scored:
        case = first.case(i)
        t = time.perf_counter()
        found = detector.detect(case)
        times.append(time.perf_counter() - t)
        reference.append(measurements(first.rows[i].landmarks, case.spacing))
        human.append(measurements(second.rows[i].landmarks, case.spacing))
        detected.append(measurements(found, case.spacing))
        for out, lm in zip(named_sets, (first.rows[i].landmarks, second.rows[i].landmarks, found)):
            out.append(named(lm, case.spacing))

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
    first_named, second_named, detected_named = named_sets
    print_named([compare_named(detected_named, first_named), compare_named(second_named, first_named)],
                ["detected vs annotator 1", "annotator 2 vs annotator 1"])


if __name__ == "__main__":
    main()
