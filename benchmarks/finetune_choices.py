"""What each few-shot speed choice buys: `finetune` variants on the same base, cases, time budget and scoring.

    python benchmarks/finetune_choices.py --base benchmarks/results/training/hand_dha_tiny.safetensors \\
        --data ../shared/data/ceph_hamedan --budget 300 --variants all-blocks last4 last2

Each variant is `finetune` on cases 1-3 with extra options, then `evaluate` on rows 51-; prints steps done,
wall time and MRE / SDR per variant, all from this one run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from medsapiens.analysis.metrics import format_sdr
from medsapiens.io.datasets import Dataset
from medsapiens.models.weight_files import load_weights

VARIANTS = {
    "all-blocks": ["--augment", "reference"],  # LoRA on every block: whole backbone forward + backward per step
    "last4": ["--lora-blocks", "4", "--augment", "reference"],  # the 8 blocks below run once per view, cached
    "mild": ["--augment", "mild"],             # 15 degrees / scale 0.8-1.25 instead of 80 / 0.5-1.5 (the default)
    "last4-mild": ["--lora-blocks", "4", "--augment", "mild"],
    "views16": ["--views", "16"],              # fewer fixed views per case
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", type=Path, required=True, help="data set folder")
    p.add_argument("--budget", type=float, default=300)
    p.add_argument("--variants", nargs="+", default=["all-blocks", "last4"], choices=list(VARIANTS))
    p.add_argument("--radii", nargs="+", default=["2", "2.5", "3", "4"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_choices"))
    args = p.parse_args()
    exe = str(Path(sys.executable).with_name("medsapiens"))
    csv = args.data / "landmarks.csv"
    cases = ",".join(Dataset(csv).ids()[:3])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        adapter = args.out / f"{name}.safetensors"
        t = time.perf_counter()
        subprocess.run([exe, "finetune", "--base", args.base, "--data", str(csv), "--cases", cases, "--time-budget",
                        str(args.budget), "--out", str(adapter), *VARIANTS[name]], check=True,
                       stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        steps = load_weights(adapter)[1]["steps"]
        subprocess.run([exe, "evaluate", args.base, "--adapter", str(adapter), "--data", str(csv), "--rows", "50:",
                        "--out", str(args.out / name), "--radii", *args.radii], check=True,
                       stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        s = json.loads((args.out / name / "report.json").read_text())["summary"]
        rows.append((name, steps, wall, s))
        print(f"{name}: {steps} steps, {wall:.0f} s, MRE {s['mre_mm']:.2f} mm", file=sys.stderr, flush=True)
    print("| variant | steps in budget | wall s | MRE mm | SDR |")
    print("| --- | --- | --- | --- | --- |")
    for name, steps, wall, s in rows:
        print(f"| {name} ({' '.join(VARIANTS[name])}) | {steps} | {wall:.0f} | {s['mre_mm']:.2f} | "
              f"{format_sdr(s['sdr'])} |")


if __name__ == "__main__":
    main()
