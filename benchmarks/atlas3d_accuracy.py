"""Accuracy, speed and memory of the 3D atlas detector, leave-cases-out on a volume set.

    python benchmarks/atlas3d_accuracy.py ../shared/data/mouse_ct --atlases 1 3 5
    # or in shards (processes) that each save their volumes, then the figures over all of them:
    python benchmarks/atlas3d_accuracy.py ../shared/data/mouse_ct --shard 0/4 --save s0.npz   # ... 3/4
    python benchmarks/atlas3d_accuracy.py ../shared/data/mouse_ct --merge s0.npz s1.npz s2.npz s3.npz

Every volume is scored in turn with atlases taken from the other volumes (the next ones in the CSV's order,
cyclically: volume i gets i+1, i+2, ...); an atlas never sees its own volume. Each (atlas, volume) pair is
registered once and its votes are fused for each atlas count (the first 1, 3, 5 of the same list), so the
counts are compared on the same registrations. Per count: MRE, SDR at 0.5 / 1 / 2 mm, gross failures
(landmarks more than 2 mm off or missing), the worst volume's MRE; seconds per volume, wall and CPU (target
preparation + that many atlas registrations + fusion; the atlases' own preparation is done once per run and
reported apart). Peak memory: a separate `medsapiens detect` process with 3 atlases on one volume
(--memory-run). The CPU load (1-minute load average) is printed next to the timings.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from medsapiens.analysis.metrics import format_summary, radial_errors, summary
from medsapiens.detectors.atlas3d import Atlas3DDetector, fuse
from medsapiens.settings import Atlas3DSettings
from medsapiens.io.datasets import Dataset

GROSS_MM = 2.0


class Clock:
    """Wall and CPU (this process, all threads) seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def memory_run(data: Path, ds: Dataset, atlases: list[str], target: int) -> str:
    """Peak RSS and times of one `medsapiens detect` process (its own interpreter, so nothing else counts)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "medsapiens.cli", "detect", "--atlas", str(ds.path), "--atlas-cases",
               ",".join(atlases), str(ds.root / ds.rows[target].image), "--out", out]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (f"`medsapiens detect` with {len(atlases)} atlases on {ds.rows[target].id}: {wall:.1f} s wall, "
            f"{usage.ru_utime + usage.ru_stime:.1f} s CPU (atlas loading included), peak RSS "
            f"{usage.ru_maxrss / 2**20:.2f} GB")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="volume set folder (with a 3D landmarks.csv)")
    p.add_argument("--atlases", type=int, nargs="+", default=[1, 3, 5], help="atlas counts")
    p.add_argument("--limit", type=int, help="score only the first this many volumes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--memory-run", action="store_true",
                   help="first run one detect process (3 atlases, on the first volume) to measure its peak memory; "
                        "--limit 0 for only that")
    p.add_argument("--shard", metavar="K/N", help="score only volumes i with i %% N == K")
    p.add_argument("--save", type=Path, help="save the scored volumes' errors and times here (after each volume)")
    p.add_argument("--merge", type=Path, nargs="+", help="print the figures over these saved shards and stop")
    return p.parse_args()


def main():
    args = parse_args()
    ds = Dataset(args.data / "landmarks.csv")
    if args.merge:
        merge(ds, args.merge)
        return
    torch.set_num_threads(args.threads)
    if args.memory_run:
        k = 3 if 3 in args.atlases else max(args.atlases)
        print(memory_run(args.data, ds, [ds.rows[j].id for j in range(1, k + 1)], 0), flush=True)
    n, pool = len(ds), max(args.atlases)
    if pool >= n:
        sys.exit(f"{pool} atlases need at least {pool + 1} volumes; the set has {n}")
    scored = list(range(n))[: args.limit]
    if args.shard:
        k, of = (int(v) for v in args.shard.split("/"))
        scored = [i for i in scored if i % of == k]
    score(ds, scored, args.atlases, args.save)


def merge(ds: Dataset, files: list[Path]) -> None:
    """The report over shards that --save wrote."""
    parts = [np.load(f, allow_pickle=False) for f in files]
    rows = [int(i) for part in parts for i in part["rows"]]
    counts = [int(k) for k in parts[0]["counts"]]
    report(ds, rows, counts, *({k: [row for part in parts for row in part[f"{name}_{k}"]] for k in counts}
                               for name in ("errors", "wall", "cpu")),
           [float(v) for part in parts for v in part["prep"]])


def score(ds: Dataset, scored: list[int], counts: list[int], save: Path | None) -> None:
    """Each scored volume detected by the next max(counts) volumes as atlases; the fewer-atlas figures fuse the
    first of the same registrations."""
    n, pool, settings = len(ds), max(counts), Atlas3DSettings()
    cache, prep_times = {}, []

    def atlas(i):  # each volume is prepared as an atlas once
        if i not in cache:
            with Clock() as c:
                cache[i] = Atlas3DDetector([ds.case(i)], settings)
            prep_times.append(c.wall)
        return cache[i]

    errors, wall, cpu = ({k: [] for k in counts} for _ in range(3))
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for i in scored:
        target = ds.case(i)
        pool_ids = [(i + j) % n for j in range(1, pool + 1)]
        detectors = [atlas(j) for j in pool_ids]
        with Clock() as prep:
            prepared = detectors[0].prepare(target)
        votes, pair_wall, pair_cpu = [], [], []
        for d in detectors:
            with Clock() as c:
                votes += d.votes(target, prepared)
            pair_wall.append(c.wall)
            pair_cpu.append(c.cpu)
        line = []
        for k in counts:
            with Clock() as c:
                found = fuse(votes[:k], target, detectors[0].names, settings)
            errors[k].append(radial_errors(found, target.landmarks))
            wall[k].append(prep.wall + sum(pair_wall[:k]) + c.wall)
            cpu[k].append(prep.cpu + sum(pair_cpu[:k]) + c.cpu)
            e = errors[k][-1]
            line.append(f"{k}: {np.nanmean(np.where(np.isinf(e), np.nan, e)):.3f} mm "
                        f"({int(np.isinf(e).sum())} missing)")
        print(f"{ds.rows[i].id} (atlases {','.join(ds.rows[j].id for j in pool_ids)}): {'; '.join(line)}; "
              f"{wall[pool][-1]:.1f} s wall, {cpu[pool][-1]:.1f} s CPU for {pool}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if save:
            done = scored[: scored.index(i) + 1]
            np.savez(save, rows=done, counts=counts, prep=prep_times, **{f"errors_{k}": errors[k] for k in counts},
                     **{f"wall_{k}": wall[k] for k in counts}, **{f"cpu_{k}": cpu[k] for k in counts})
    if scored:
        report(ds, scored, counts, errors, wall, cpu, prep_times)


def report(ds: Dataset, scored: list[int], counts: list[int], errors: dict, wall: dict, cpu: dict, prep_times):
    print(f"\n{ds.path}: {len(scored)} volumes, leave-cases-out; atlas preparation "
          f"{statistics.median(prep_times):.1f} s wall (median, once per atlas per run)")
    for k in counts:
        e = np.array(errors[k])
        s = summary(e, (0.5, 1.0, 2.0))
        per_volume = np.array([r[np.isfinite(r)].mean() for r in e])
        gross = int(((e > GROSS_MM) & ~np.isnan(e)).sum())
        print(f"{k} atlas(es): {format_summary(s)}; gross (> {GROSS_MM:g} mm or missing) {gross}; volumes with "
              f"MRE > 1 mm: {int((per_volume > 1).sum())}, worst {per_volume.max():.3f} mm "
              f"({ds.rows[scored[int(per_volume.argmax())]].id}); s/volume median {statistics.median(wall[k]):.1f} "
              f"wall, {statistics.median(cpu[k]):.1f} CPU (max {max(wall[k]):.1f} / {max(cpu[k]):.1f})")
    print(f"load average now: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
