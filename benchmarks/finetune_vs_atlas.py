"""Fine-tuned adapter (atlas + refiner) against the atlas alone, from the same cases, scored in the same run.

    python benchmarks/finetune_vs_atlas.py ../shared/data/ceph_hamedan ../shared/data/hand_dha

Per data set: `finetune` with its defaults on the first cases (default 3), with the rows between them and the
scored ones as unannotated images (their landmarks dropped; `--unannotated 0` for none), timed (wall and CPU
seconds, load average); then every scored image (rows 51- by default) is detected once by the adapter's atlas, and the
adapter refines that same atlas answer, so both figures come from identical atlas runs. Prints MRE, SDR,
the ratio adapter / atlas, and the held-out estimate the adapter recorded.
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from medsapiens.analysis.metrics import format_summary, radial_errors, summary
from medsapiens import load_detector
from medsapiens.io.datasets import Dataset
from medsapiens.settings import HAND_RADII, REFINE_DEFAULTS
from medsapiens.training.refine import finetune_on_atlas

RADII = {"hand_dha": HAND_RADII}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, nargs="+", help="data set folders (with landmarks.csv)")
    p.add_argument("--cases", type=int, default=3, help="annotated cases: the first rows (default 3)")
    p.add_argument("--first-scored", type=int, default=51, help="1-based row where scoring starts (default 51)")
    p.add_argument("--unannotated", type=int, help="unannotated images: this many rows after the cases (default: "
                                                   "all rows up to the first scored one; finetune takes at most "
                                                   f"{REFINE_DEFAULTS.max_unannotated})")
    p.add_argument("--limit", type=int, help="score only this many images")
    p.add_argument("--steps", type=int, default=REFINE_DEFAULTS.steps, help="steps per fold (default: finetune's)")
    p.add_argument("--time-budget", type=float, default=REFINE_DEFAULTS.time_budget,
                   help="finetune's wall-clock cap (default: finetune's); raise it on a loaded machine so that the "
                        "step schedule, not the load, decides")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_vs_atlas"))
    args = p.parse_args()
    for folder in args.data:
        ds = Dataset(folder / "landmarks.csv")
        radii = RADII.get(folder.name, (2, 2.5, 3, 4))
        cases = [ds.case(i) for i in range(args.cases)]
        last = args.first_scored - 1 if args.unannotated is None else min(args.cases + args.unannotated,
                                                                           args.first_scored - 1)
        unannotated = [replace(ds.case(i), landmarks=None) for i in range(args.cases, last)]
        out = args.out / f"{folder.name}.safetensors"
        out.unlink(missing_ok=True)  # a fresh run, no warm start
        t, c, load = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
        result = finetune_on_atlas(cases, out, unannotated=unannotated, settings=replace(REFINE_DEFAULTS, steps=args.steps,
                                                                time_budget=args.time_budget), keep_worse=True)
        if not result.better:
            print(f"{folder.name}: the adapter was worse than the atlas on held-out cases (finetune would have "
                  "said so and written nothing; kept here to score it)")
        print(f"{folder.name}: finetune on {', '.join(c.label for c in cases)} + {len(unannotated)} unannotated "
              f"(rows {args.cases + 1}-{last}): {result.line()}; "
              f"{time.perf_counter() - t:.0f} s wall, {cpu_seconds() - c:.0f} s CPU, load {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        est = result.estimate
        print(f"  held-out estimate ({est['method']}): atlas {est['atlas_mre_mm']:.2f} mm, refined "
              f"{est['refined_mre_mm']:.2f} mm; refines {sum(est['use_refined'])} of {len(est['use_refined'])} "
              f"landmarks; prior {est['prior_scale']:g} x the atlas's error", flush=True)
        detector = load_detector(adapter=out)
        scored = list(range(args.first_scored - 1, len(ds)))[: args.limit]
        adapter_err, atlas_err, seconds = [], [], []
        for i in scored:
            case = ds.case(i)
            t = time.perf_counter()
            refined, atlas = detector.detect_both(case)
            seconds.append(time.perf_counter() - t)
            adapter_err.append(radial_errors(refined, case.landmarks, case.spacing))
            atlas_err.append(radial_errors(atlas, case.landmarks, case.spacing))
        s_adapter, s_atlas = summary(np.array(adapter_err), radii), summary(np.array(atlas_err), radii)
        rows = f"{ds.rows[scored[0]].id}..{ds.rows[scored[-1]].id}"
        print(f"  atlas   ({len(scored)} images {rows}): {format_summary(s_atlas)}")
        print(f"  adapter ({len(scored)} images {rows}): {format_summary(s_adapter)}; "
              f"{np.median(seconds):.2f} s/image (median, atlas included)")
        print(f"  ratio adapter / atlas MRE: {s_adapter['mre_mm'] / s_atlas['mre_mm']:.3f}", flush=True)


if __name__ == "__main__":
    main()
