"""The training figures of docs/benchmarks.md, through the `medsapiens` command line, on ceph_hamedan and hand_dha.

    python benchmarks/training_figures.py --data ../shared/data --out benchmarks/results/training \\
        --train-budget 1200 --finetune-budget 300

1. supervised: `train` on rows 1-50 of each set, `evaluate` on the rest;
2. few-shot cross-task: `finetune` on cases 1-3 of one set, on the base trained on the *other* set;
3. the same few-shot run from the untrained architecture (every weight trained).
Runs whose outputs exist are reused (delete the folder to start over). Prints one table: MRE, SDR, wall time.
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

SETS = {"ceph_hamedan": [2, 2.5, 3, 4], "hand_dha": [2, 4, 10]}
OTHER = {"ceph_hamedan": "hand_dha", "hand_dha": "ceph_hamedan"}


def run(cmd: list[str], log: Path) -> float:
    """Run a medsapiens command, its stderr to `log`; the wall time in seconds."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/training"))
    p.add_argument("--arch", default="tiny")
    p.add_argument("--train-budget", type=float, default=1200, help="seconds per supervised training")
    p.add_argument("--finetune-budget", type=float, default=300, help="seconds per few-shot fine-tune")
    p.add_argument("--lora-blocks", type=int, help="passed to finetune")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = p.parse_args()
    exe = str(Path(sys.executable).with_name("medsapiens"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    rows = []

    def timed(key, cmd, target: Path):
        if not target.exists():
            times[key] = run(cmd, out / f"{key}.log")
            (out / "times.json").write_text(json.dumps(times, indent=1))
        return times.get(key)

    def score(key, model_args, name):
        report = out / key
        if not (report / "report.json").is_file():
            run([exe, "evaluate", *model_args, "--data", str(args.data / name / "landmarks.csv"), "--rows", "50:",
                 "--out", str(report), "--radii", *map(str, SETS[name])], out / f"{key}.eval.log")
        return json.loads((report / "report.json").read_text())["summary"]

    needed = set(args.sets) | {OTHER[s] for s in args.sets}
    for name in sorted(needed):
        model = out / f"{name}_{args.arch}.safetensors"
        timed(f"train_{name}", [exe, "train", "--arch", args.arch, "--data", str(args.data / name / "landmarks.csv"),
                                "--rows", "0:50", "--time-budget", str(args.train_budget), "--out", str(model)], model)
    for name in args.sets:
        model = out / f"{name}_{args.arch}.safetensors"
        rows.append(("supervised, 50 images", name, score(f"eval_supervised_{name}", [str(model)], name),
                     times.get(f"train_{name}")))
        cases = ",".join(Dataset(args.data / name / "landmarks.csv").ids()[:3])
        extra = ["--lora-blocks", str(args.lora_blocks)] if args.lora_blocks else []
        for label, base in (("few-shot, base trained on " + OTHER[name], out / f"{OTHER[name]}_{args.arch}.safetensors"),
                            ("few-shot, untrained " + args.arch, None)):
            key = f"finetune_{name}_{'scratch' if base is None else 'base'}"
            adapter = out / f"{key}.safetensors"
            wall = timed(key, [exe, "finetune", "--base", str(base or args.arch), "--data",
                               str(args.data / name / "landmarks.csv"), "--cases", cases, "--time-budget",
                               str(args.finetune_budget), "--out", str(adapter), *extra], adapter)
            model_args = [str(base), "--adapter", str(adapter)] if base else [str(adapter)]
            rows.append((label, name, score(f"eval_{key}", model_args, name), wall))
    print("| set | run | MRE mm | SDR | wall time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for label, name, s, wall in rows:
        print(f"| {name} | {label} | {s['mre_mm']:.2f} | {format_sdr(s['sdr'])} | {wall:.0f} |")


if __name__ == "__main__":
    main()
