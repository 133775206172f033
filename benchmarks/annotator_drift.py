"""How the two annotators' conventions move across a data set: per block of rows, the mean offset (x, y, mm) of
annotator 2's points from annotator 1's, per landmark.

    python benchmarks/annotator_drift.py ../shared/data/ceph_hamedan

A detector learns annotator 1's convention from the first annotated cases. Where the two annotators' mean offset
on a landmark changes between blocks of rows, at least one of them placed it differently there, and what the first
cases teach about that landmark need not hold for the later rows. Prints one line per block (its rows, the MRE of
annotator 2 against 1 there) and one per landmark (its offset in each block, and the largest distance between two
blocks' offsets).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import medsapiens  # noqa: F401  (before torch: the OpenMP wait policy)
import numpy as np
from medsapiens.io.datasets import Dataset


def offsets(folder: Path) -> tuple[list[str], np.ndarray]:
    """Landmark names and rows x K x 2 offsets (mm) of annotator 2 from annotator 1 (NaN where either is missing)."""
    first, second = Dataset(folder / "landmarks.csv"), Dataset(folder / "landmarks_annotator2.csv")
    by_id = {r.id: r for r in second.rows}
    out = []
    for row in first.rows:
        other = by_id[row.id].landmarks.subset(first.names)
        off = (other.points - row.landmarks.points) * np.array(row.spacing)
        out.append(np.where((other.present & row.landmarks.present)[:, None], off, np.nan))
    return list(first.names), np.array(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="data set folder with landmarks.csv and landmarks_annotator2.csv")
    p.add_argument("--blocks", default="1-10,11-25,26-50,51-75,76-100", help="1-based row ranges")
    args = p.parse_args()
    if not (args.data / "landmarks_annotator2.csv").is_file():
        p.exit(2, f"annotator_drift.py: error: {args.data}: no landmarks_annotator2.csv\n")
    names, off = offsets(args.data)
    blocks = [tuple(int(v) for v in b.split("-")) for b in args.blocks.split(",")]
    means = []
    for lo, hi in blocks:
        part = off[lo - 1: hi]
        means.append(np.nanmean(part, axis=0))
        print(f"rows {lo}-{hi}: annotator 2 against 1, MRE {np.nanmean(np.linalg.norm(part, axis=2)):.2f} mm")
    means = np.array(means)  # blocks x K x 2
    print("landmark: mean offset (x, y) mm per block; largest distance between two blocks' offsets")
    for k, name in enumerate(names):
        cells = " ".join(f"{m[k, 0]:+.1f},{m[k, 1]:+.1f}" for m in means)
        spread = max(np.linalg.norm(a[k] - b[k]) for a in means for b in means)
        print(f"  {name:>6} {cells}  {spread:.1f}")


if __name__ == "__main__":
    main()
