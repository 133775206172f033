"""Learning curve of the default fine-tune (atlas + refiner) and the trust in its points, on one data set.

    python benchmarks/learning_curve.py ../shared/data/ceph_hamedan
    python benchmarks/learning_curve.py ../shared/data/hand_dha

For each number of annotated cases (the first rows; default 1, 3, 5, 10, 20): `finetune` with its defaults, the
rows between the cases and the scored ones as unannotated images (landmarks dropped; finetune takes at most 50),
timed (wall and CPU seconds, load average); then every scored image (rows 51- by default) is detected once: the
adapter and the atlas of the same cases from the same registrations (with one case only the atlas: fine-tuning
needs two). Prints per row MRE, SDR 2 mm, fine-tune time, detect time per image (median), and for each detector's
calibrated confidence P(within 2 mm) on the scored images: share of points flagged for checking, share of the
> 3 mm errors among them, AUC of P for telling those apart, calibration error (|mean P - observed rate|, 10 bins,
weighted by points). At --report-at cases (default 3) also: per-landmark errors beside the second annotator's
(where the data set has landmarks_annotator2.csv), agreement of the ISBI 2015 classes with annotator 1, and a
reliability plot (PNG in --out).
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import medsapiens  # noqa: F401  (before torch: the OpenMP wait policy)
import numpy as np
from medsapiens.analysis.cephalometry import MEASURE_NAMES, analyze
from medsapiens.analysis.metrics import radial_errors, summary
from medsapiens.detectors.atlas import AtlasDetector
from medsapiens.detectors.calibration import GROSS_MM, WITHIN_MM, reliability, review_figures
from medsapiens.detectors.refiner import load_refined_atlas
from medsapiens.io.datasets import Dataset
from medsapiens.settings import CEPH_RADII, HAND_RADII, REFINE_DEFAULTS
from medsapiens.training.refine import finetune_on_atlas

RADII = {"hand_dha": HAND_RADII}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def finetune(ds: Dataset, n: int, first_scored: int, budget: float, out: Path):
    """The adapter of the first n rows (None for one case), with the rows up to the scored ones unannotated."""
    cases = [ds.case(i) for i in range(n)]
    if n < 2:
        return AtlasDetector(cases, REFINE_DEFAULTS.atlas), "-"
    unannotated = [replace(ds.case(i), landmarks=None) for i in range(n, first_scored - 1)]
    out.unlink(missing_ok=True)  # a fresh run, no warm start
    t, c, load = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    result = finetune_on_atlas(cases, out, unannotated=unannotated, keep_worse=True,
                               settings=replace(REFINE_DEFAULTS, time_budget=budget))
    took = (f"{time.perf_counter() - t:.0f} s wall, {cpu_seconds() - c:.0f} s CPU, load {load:.1f}->"
            f"{os.getloadavg()[0]:.1f}")
    print(f"  {n} cases + {min(len(unannotated), REFINE_DEFAULTS.max_unannotated)} unannotated: {result.line()}; "
          f"{took}", flush=True)
    for line in result.notes():
        print(f"    {line}", flush=True)
    return load_refined_atlas(out), took


def detect_scored(detector, ds: Dataset, scored: list[int]) -> dict:
    """Per detector ('adapter', 'atlas'): errors (images x K, mm), P and check (images x K); detect seconds."""
    found = {"adapter": [], "atlas": []}
    seconds = []
    for i in scored:
        case = ds.case(i)
        t = time.perf_counter()
        both = detector.detect_both(case) if hasattr(detector, "detect_both") else (None, detector.detect(case))
        seconds.append(time.perf_counter() - t)
        for key, lm in zip(("adapter", "atlas"), both):
            if lm is not None:
                found[key].append((radial_errors(lm, case.landmarks, case.spacing), lm.confidence, lm.check, lm))
    out = {"seconds": float(np.median(seconds))}
    for key, rows in found.items():
        if rows:
            out[key] = {"error": np.array([r[0] for r in rows]), "p": np.array([r[1] for r in rows]),
                        "check": np.array([r[2] for r in rows]), "landmarks": [r[3] for r in rows]}
    return out


def trust(d: dict) -> dict:
    ok = np.isfinite(d["error"])
    return review_figures(d["p"][ok], d["error"][ok], d["check"][ok])


def row_line(n: int, took: str, res: dict, radii) -> str:
    parts = [f"{n:>2} cases"]
    for key in ("atlas", "adapter"):
        if key in res:
            s, t = summary(res[key]["error"], radii), trust(res[key])
            parts.append(f"{key} MRE {s['mre_mm']:.2f} mm, SDR 2 mm {100 * s['sdr'][2.0]:.1f} %, flagged "
                         f"{_pct(t['flagged'])}, > {GROSS_MM:g} mm caught {_pct(t['gross_caught'])} of "
                         f"{t['gross_errors']}, AUC {_num(t['auc'])}, cal. error {_num(t['calibration_error'])}")
    parts.append(f"detect {res['seconds']:.2f} s/image; fine-tune {took}")
    return " | ".join(parts)


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.0f} %"


def _num(v):
    return "n/a" if v is None else f"{v:.3f}"


def per_landmark(ds: Dataset, folder: Path, scored: list[int], res: dict) -> None:
    """Mean error per landmark: atlas, adapter, and annotator 2 against annotator 1 on the same images."""
    second = folder / "landmarks_annotator2.csv"
    human = None
    if second.is_file():
        other = Dataset(second)
        by_id = {r.id: r for r in other.rows}
        human = np.array([radial_errors(by_id[ds.rows[i].id].landmarks, ds.case(i).landmarks, ds.rows[i].spacing)
                          for i in scored])
        s = summary(human, RADII.get(folder.name, CEPH_RADII))
        print(f"  annotator 2 against 1: MRE {s['mre_mm']:.2f} mm, SDR 2 mm {100 * s['sdr'][2.0]:.1f} %")
    print("  per landmark (mean mm): " + "name atlas adapter" + (" annotator2" if human is not None else ""))
    for k, name in enumerate(ds.names):
        cells = [f"{np.nanmean(res[key]['error'][:, k]):.2f}" for key in ("atlas", "adapter") if key in res]
        if human is not None:
            cells.append(f"{np.nanmean(human[:, k]):.2f}")
        print(f"    {name:>6} " + " ".join(cells))
    if human is not None and "S" in ds.names:
        classes(ds, scored, res, Dataset(second))


def classes(ds: Dataset, scored: list[int], res: dict, second: Dataset) -> None:
    """Share of (image, measure) pairs of the ISBI 2015 analysis whose class agrees with annotator 1's."""
    by_id = {r.id: r for r in second.rows}

    def bands(lm, spacing):
        return {m.name: m.band.number if m.band is not None else None for m in analyze(lm, spacing)}

    sources = {key: res[key]["landmarks"] for key in ("atlas", "adapter") if key in res}
    sources["annotator 2"] = [by_id[ds.rows[i].id].landmarks for i in scored]
    for key, marks in sources.items():
        agree = total = 0
        for i, lm in zip(scored, marks):
            spacing = ds.rows[i].spacing
            truth, mine = bands(ds.case(i).landmarks, spacing), bands(lm, spacing)
            pairs = [(truth[m], mine[m]) for m in MEASURE_NAMES if truth[m] is not None and mine[m] is not None]
            agree += sum(a == b for a, b in pairs)
            total += len(pairs)
        print(f"  ISBI 2015 classes agreeing with annotator 1, {key}: {100 * agree / max(total, 1):.1f} % of "
              f"{total}")


def reliability_plot(res: dict, path: Path, title: str) -> None:
    """Left: observed share within 2 mm against P, per bin of P (calibration.reliability), for each detector.
    Right: the share of the points flagged against the share of the > 3 mm errors among them as the threshold on
    P moves, with the review rule's own point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, roc) = plt.subplots(1, 2, figsize=(8.4, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    for key in ("atlas", "adapter"):
        if key not in res:
            continue
        ok = np.isfinite(res[key]["error"])
        p, error, check = res[key]["p"][ok], res[key]["error"][ok], res[key]["check"][ok]
        xs, ys, _ = zip(*reliability(p, error <= WITHIN_MM))
        line, = ax.plot(xs, ys, marker="o", label=key)
        order = np.argsort(p)  # flag the least probable first
        gross = error[order] > GROSS_MM
        flagged = np.arange(1, len(p) + 1) / len(p)
        roc.plot(flagged, np.cumsum(gross) / max(gross.sum(), 1), color=line.get_color(), label=key)
        roc.plot(check.mean(), check[error > GROSS_MM].mean(), marker="o", color=line.get_color())
    ax.set_xlabel("P (within 2 mm), binned")
    ax.set_ylabel("observed share within 2 mm")
    ax.set_title(title, fontsize=9)
    ax.legend()
    roc.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    roc.set_xlabel("share of the points flagged (least P first)")
    roc.set_ylabel(f"share of the > {GROSS_MM:g} mm errors flagged")
    roc.set_title("dots: the review rule's flags", fontsize=9)
    roc.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"  reliability plot: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="data set folder (with landmarks.csv)")
    p.add_argument("--cases", default="1,3,5,10,20", help="annotated cases per point of the curve")
    p.add_argument("--first-scored", type=int, default=51, help="1-based row where scoring starts (default 51)")
    p.add_argument("--limit", type=int, help="score only this many images")
    p.add_argument("--report-at", type=int, default=3, help="cases at which to print the per-landmark report")
    p.add_argument("--time-budget", type=float, default=REFINE_DEFAULTS.time_budget,
                   help="finetune's wall-clock cap (default: finetune's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/learning_curve"))
    args = p.parse_args()
    ds = Dataset(args.data / "landmarks.csv")
    radii = RADII.get(args.data.name, CEPH_RADII)
    scored = list(range(args.first_scored - 1, len(ds)))[: args.limit]
    print(f"{args.data.name}: scored on {len(scored)} images ({ds.rows[scored[0]].id}..{ds.rows[scored[-1]].id})",
          flush=True)
    for n in (int(v) for v in args.cases.split(",")):
        detector, took = finetune(ds, n, args.first_scored, args.time_budget,
                                  args.out / f"{args.data.name}_{n}.safetensors")
        res = detect_scored(detector, ds, scored)
        print(row_line(n, took, res, radii), flush=True)
        if n == args.report_at:
            per_landmark(ds, args.data, scored, res)
            reliability_plot(res, args.out / f"reliability_{args.data.name}_{n}.png",
                             f"{args.data.name}, {n} cases, {len(scored)} scored images")


if __name__ == "__main__":
    main()
