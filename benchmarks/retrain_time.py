"""Correct, add, re-adapt: the time of a warm re-fine-tune after one more case, against the first fine-tune.

    python benchmarks/retrain_time.py ../shared/data/ceph_hamedan [--cases 3] [--unannotated 47]

As the Slicer panel runs it (api.finetune without a base, default settings, the other open images as
unannotated ones): fine-tune on the atlas of the first N cases and the next rows without their landmarks into a
fresh file, then add case N+1 (one of those images, now annotated) and fine-tune again into the same file, which
warm-starts from it (at most half the steps and half the time of the first run; the atlas votes on the images
are reused, only the new case's are run). Prints, for both runs in the same process: wall and CPU
seconds, the steps, the held-out estimate, and the ratios second / first; the load average before and after
each run.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from medsapiens import NotBetter, api
from medsapiens.io.datasets import Dataset


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(cases, unannotated, out, label):
    load, t, c = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
    try:
        api.finetune(None, cases, out, unannotated=unannotated)
        info = api.adapter_info(out)
        estimate = (f"held-out: adapter {info['adapter_mre_mm']:.2f} mm, atlas {info['atlas_mre_mm']:.2f} mm "
                    f"({info['method']}, {info['cases_estimated']} cases), refined {len(info['refined_landmarks'])} "
                    f"of {len(info['landmark_names'])}; {info['steps']} steps, warm start {info['warm_started']}, "
                    f"{info['unannotated_images']} unannotated images")
    except NotBetter as e:
        estimate = f"not written: {e}"
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    print(f"{label}: {', '.join(x.label for x in cases)}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; {estimate}", flush=True)
    return wall, cpu


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a data set folder (with landmarks.csv)")
    p.add_argument("--cases", type=int, default=3, help="cases of the first fine-tune: the first rows (default 3)")
    p.add_argument("--unannotated", type=int, default=47, help="rows after the cases taken as unannotated images "
                                                               "(default 47; the first of them becomes the new case)")
    args = p.parse_args()
    ds = Dataset(args.data / "landmarks.csv")
    cases = [ds.case(i) for i in range(args.cases + 1)]
    unannotated = [replace(ds.case(i), landmarks=None) for i in range(args.cases, args.cases + args.unannotated)]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "task.safetensors"
        first = run(cases[:-1], unannotated, out, "first fine-tune")
        if not out.exists():
            print("the first adapter was not better than the atlas, so there is nothing to warm-start from")
            return
        second = run(cases, unannotated, out, "after one more case")  # its image is dropped from the unannotated
    print(f"second / first: {second[0] / first[0]:.2f} wall, {second[1] / first[1]:.2f} CPU")


if __name__ == "__main__":
    main()
