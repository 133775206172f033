"""The default few-shot fine-tune on a Sapiens base on this machine: the planned schedule and its phase times.

    python benchmarks/finetune_schedule.py ../shared/data/ceph_hamedan/landmarks.csv

Writes a base in the official pretrain layout (`sapiens_0.3b_epoch_1600_clean.pth`: flat backbone keys, cls
token, a 1 + 64 x 64 position embedding) with random weights, since time does not depend on them; runs
`medsapiens finetune --base BASE` with its defaults on the first 3 cases as a user would (a subprocess) and
reads the schedule and phase times the adapter records; then times 2 steps of the MedSapiens recipe (LoRA on
every block, the 768-channel head) in the same run, for the ratio. Prints a table, the load average and threads.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from medsapiens.models.sapiens import SapiensPose
from medsapiens.models.weight_files import load_weights
from medsapiens.training.schedule import Plan


def pretrain_file(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    backbone = SapiensPose(arch, 1, (64, 64)).backbone
    state = dict(backbone.state_dict())
    width = state["pos_embed"].shape[-1]
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, width), state["pos_embed"]], dim=1)
    state["cls_token"] = torch.zeros(1, 1, width)
    path = folder / f"{arch}_epoch_1600_clean.pth"
    torch.save(state, path)
    return path


def finetune(base: Path, data: Path, cases: str, out: Path, *extra: str) -> tuple[float, str]:
    command = [str(Path(sys.executable).with_name("medsapiens")), "finetune", "--base", str(base), "--data", str(data),
               "--cases", cases, "--out", str(out), "--device", "cpu", *extra]
    t = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"finetune failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return time.perf_counter() - t, run.stdout.strip().splitlines()[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="landmarks.csv")
    p.add_argument("--arch", default="sapiens_0.3b")
    p.add_argument("--cases", default="001,002,003")
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = pretrain_file(args.arch, tmp)
        base_gb = base.stat().st_size / 2 ** 30
        print(f"{base.name}: {base.stat().st_size / 2 ** 30:.2f} GB; {torch.get_num_threads()} threads, "
              f"load {load:.1f}", file=sys.stderr)
        wall, line = finetune(base, args.data, args.cases, tmp / "planned.safetensors")
        meta = load_weights(tmp / "planned.safetensors")[1]
        plan = Plan(**meta["schedule"])
        depth = meta["architecture"]["depth"]
        recipe_wall, _ = finetune(base, args.data, args.cases, tmp / "recipe.safetensors", "--lora-blocks",
                                  str(depth), "--views", "1", "--steps", "2")
        recipe = load_weights(tmp / "recipe.safetensors")[1]
    recipe_step = recipe["phase_seconds"]["train"] / recipe["steps"]
    phases = meta["phase_seconds"]
    n_views = len(args.cases.split(",")) * plan.views_per_case
    print(f"stdout of finetune: {line}")
    print(f"schedule: {plan.describe(depth)}")
    print()
    print("| phase | what | seconds |")
    print("| --- | --- | --- |")
    print(f"| base | read the {base_gb:.2f} GB base | {phases['base']:.1f} |")
    print(f"| plan | time one block and the head steps | {phases.get('plan', 0):.1f} |")
    print(f"| views | {n_views} augmented views ({plan.views_per_case} per case) | {phases['views']:.1f} |")
    print(f"| caching | {depth - plan.lora_blocks} frozen blocks once per view | {phases.get('features', 0):.1f} |")
    print(f"| steps | {meta['steps']} optimiser steps, batch 8, {meta['steps'] / phases['train']:.2f} steps/s | "
          f"{phases['train']:.1f} |")
    print(f"| total | `finetune` wall clock, loading included | {wall:.1f} |")
    print()
    print(f"recipe (LoRA on all {depth} blocks, {recipe['architecture']['head_channels']}-channel head): "
          f"{recipe_step:.1f} s per step -> {300 / recipe_step:.0f} steps in 300 s; planned: "
          f"{phases['train'] / meta['steps']:.2f} s per step, {recipe_step / (phases['train'] / meta['steps']):.0f}x "
          f"faster; load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
