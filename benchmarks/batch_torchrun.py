"""`medsapiens detect` on a folder: one process against `torchrun --nproc_per_node N` (each process its share of
the images, one landmarks.csv), with the weight-free atlas of 3 annotated cases.

Each rep runs, interleaved: the plain command (torch and ITK use every core), the plain command on one thread
(OMP_NUM_THREADS=1, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1: what each torchrun process gets), and torchrun with
N processes, as a user runs it. Prints per configuration the median wall time, images per second, the median CPU time of the
processes, and the wall-time ratio to the plain command; checks that every run wrote the same landmarks.csv rows.
Phantom radiographs by default; `--data` takes a data set folder (cases 1-3 annotate, the next `--images` are
detected).

Usage:
    python benchmarks/batch_torchrun.py [--images 16] [--reps 3] [--nproc 2] [--data ../shared/data/ceph_hamedan]
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def write_cases(folder: Path, cases, annotated: bool) -> None:
    import numpy as np
    import SimpleITK as sitk
    from medsapiens.io.markups import write_markups

    folder.mkdir(parents=True)
    for case in cases:
        image = sitk.GetImageFromArray(np.asarray(case.image))
        image.SetSpacing(tuple(float(s) for s in case.spacing))
        sitk.WriteImage(image, str(folder / f"{case.name}.nrrd"))
        if annotated:
            write_markups(folder / f"{case.name}.mrk.json", case.landmarks, case)


def run(command: list, env: dict, out: Path) -> tuple[float, float, list]:
    """(wall s, CPU s of the processes, the rows of landmarks.csv without the image column)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, encoding="utf-8")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-1500:]}")
    with open(out / "landmarks.csv", newline="") as f:
        rows = [row[1:] for row in csv.reader(f)]
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", type=Path, help="a data set folder with landmarks.csv (default: phantoms)")
    args = parser.parse_args()
    from medsapiens import api

    if args.data:
        cases = api.load_cases(args.data / "landmarks.csv")[:3 + args.images]
    else:
        cases = [api.phantom_case(seed) for seed in range(3 + args.images)]
    root = Path(tempfile.mkdtemp(prefix="medsapiens-batch-"))
    write_cases(root / "atlas", cases[:3], annotated=True)
    write_cases(root / "images", cases[3:], annotated=False)
    detect = ["detect", "--atlas", str(root / "atlas"), str(root / "images")]
    one = {"OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    configs = {"plain (all cores)": ([str(BIN / "medsapiens"), *detect], {}),
               "1 process, 1 thread": ([str(BIN / "medsapiens"), *detect], one),
               f"torchrun {args.nproc} processes": ([str(BIN / "torchrun"), "--standalone", "--nproc_per_node",
                                                     str(args.nproc), "--no-python", str(BIN / "medsapiens"),
                                                     *detect], {})}
    times: dict = {name: [] for name in configs}
    reference = None
    for rep in range(args.reps):
        for name, (command, extra) in configs.items():
            wall, cpu, rows = run(command, {**os.environ, **extra}, root / f"out-{rep}-{len(times[name])}")
            times[name].append((wall, cpu))
            reference = reference or rows
            if len(rows) != len(reference) or rows[0] != reference[0]:
                sys.exit(f"{name}: landmarks.csv differs in its rows or columns")
    print(f"{len(cases) - 3} {'phantom ' if not args.data else ''}images, atlas of 3 cases, {os.cpu_count()} cores "
          f"(load average over the last 15 min {os.getloadavg()[2]:.1f}: other work shares them), median of "
          f"{args.reps}")
    base = statistics.median(w for w, _ in times["plain (all cores)"])
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"{name:24s} wall {wall:6.1f} s  {(len(cases) - 3) / wall:5.2f} images/s  CPU {cpu:6.1f} s  "
              f"wall / plain {wall / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
