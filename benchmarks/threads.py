"""How torch's CPU threads wait, measured: the atlas's detection and the refiner's training under OpenMP's active
(spinning) and passive wait policies, 1 and 2 threads, on an idle machine and with the other core kept busy.

    python benchmarks/threads.py ../shared/data/ceph_hamedan

Each configuration runs in its own process (the policy is read when torch loads): a 3-atlas detection on 3
images and 30 refiner training steps per fold on 3 cases (3 folds); medians of wall and CPU seconds. "busy" runs
one spinning Python process beside it (what Slicer drawing or another job does to the second core). The engine
sets OMP_WAIT_POLICY=PASSIVE when it is imported first (medsapiens/__init__.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

JOB = r"""
import json, os, resource, sys, tempfile, time
from dataclasses import replace
import torch
torch.set_num_threads(int(os.environ["THREADS"]))
from medsapiens import api
from medsapiens.detectors.atlas import AtlasDetector
from medsapiens.settings import REFINE_DEFAULTS
from medsapiens.training.refine import finetune_on_atlas

def clock():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime

cases = api.load_cases(sys.argv[1], ["001", "002", "003"])
images = [c for c in api.load_cases(sys.argv[1], ["051", "052", "053"])]
atlas = AtlasDetector(cases)
atlas.detect(images[0])  # warm-up
detect = []
for image in images:
    w, c = clock()
    atlas.detect(image)
    w2, c2 = clock()
    detect.append((w2 - w, c2 - c))
w, c = clock()
result = finetune_on_atlas(cases, tempfile.mkdtemp() + "/a.safetensors", keep_worse=True,
                           settings=replace(REFINE_DEFAULTS, steps=30, time_budget=3600))
w2, c2 = clock()
print(json.dumps({"detect": detect, "train": result.phase_seconds["train"], "finetune": [w2 - w, c2 - c]}))
"""


def run(data: Path, policy: str, threads: int, busy: bool) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "THREADS": str(threads)}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", JOB, str(data / "landmarks.csv")], env=env, check=True,
                             capture_output=True, text=True).stdout
    finally:
        if spinner:
            spinner.kill()
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="the cephalogram set's folder (landmarks.csv)")
    args = p.parse_args()
    print("| machine | wait policy | threads | atlas detect, 3 atlases: wall / CPU s (median of 3) | refiner training, "
          "3 x 30 steps: s | whole fine-tune: wall / CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for busy in (False, True):
        for policy in ("ACTIVE", "PASSIVE"):
            for threads in (1, 2):
                r = run(args.data, policy, threads, busy)
                wall, cpu = sorted(r["detect"])[1]
                print(f"| {'other core busy' if busy else 'idle'} | {policy.lower()} | {threads} | {wall:.2f} / "
                      f"{cpu:.2f} | {r['train']:.1f} | {r['finetune'][0]:.1f} / {r['finetune'][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
