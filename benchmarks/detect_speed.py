"""Per-image `detect` time of Sapiens 0.3b against the machine's arithmetic bound, measured in one run.

Prints: the fp32 / bf16 matrix-multiply rates (2048 x 2048), then for each (input size, precision) the median
per-image detect time (model load excluded), the bound = multiply-adds x 2 / fastest measured rate, their ratio,
the peak resident memory of a fresh process, and how far bf16 landmarks are from fp32 (input pixels).
Random weights: the time does not depend on them. Usage:
    python benchmarks/detect_speed.py [--reps 3] [--sizes 1024x768 512x384] [--bf16-sizes 512x384]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

IMAGE = "../shared/data/ceph_hamedan/images/001.png"


def matmul_rate(dtype, n=2048, reps=5) -> float:
    """FLOP/s of an n^3 product in nn.Linear's layout (x @ W^T); on CPUs without bf16 units a plain
    bf16 `a @ b` falls back to a much slower kernel, which the model never uses."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def multiply_adds(arch: str, hw, k: int) -> float:
    """Analytic count for SapiensPose (matches the reference's 1.6 T for 0.3b at 1024 x 768, K = 308)."""
    from medsapiens.models.sapiens import ARCHS, grid_size

    a = ARCHS[arch]
    gh, gw = grid_size(hw)
    n, c, hc = gh * gw, a.embed_dim, a.head_channels
    per_layer = n * (4 * c * c + 2 * c * a.mlp_dim) + 2 * n * n * c
    patch = n * c * 3 * 256
    head = gh * gw * c * hc * 16 + 4 * gh * gw * hc * hc * 16 + 2 * 16 * gh * gw * hc * hc + 16 * gh * gw * hc * k
    return a.depth * per_layer + patch + head


def run_one(hw, precision, reps) -> dict:
    """In this (fresh) process: build 0.3b, detect `reps` times on a real radiograph, report times and points."""
    import resource

    from medsapiens.detectors.heatmap import HeatmapDetector
    from medsapiens.io.images import read_image
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    model = SapiensPose("sapiens_0.3b", 19)
    detector = HeatmapDetector(model, [f"L{i}" for i in range(19)], hw, device="cpu", precision=precision)
    case = read_image(IMAGE)
    detector.detect(case)  # warm-up
    times, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = detector.detect(case)
        times.append(time.perf_counter() - t)
    from medsapiens.models.warp import apply_affine, image_box, udp_warp_matrix

    center, scale = image_box(*case.size)
    warp = udp_warp_matrix(center, scale, 0.0, hw[::-1])
    return {"times": times, "points_input_px": apply_affine(warp, result.points).tolist(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", nargs="+", default=["1024x768", "512x384"])
    p.add_argument("--bf16-sizes", nargs="*", default=["512x384"])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        hw = tuple(int(v) for v in args.child[0].split("x"))
        print(json.dumps(run_one(hw, args.child[1], args.reps)))
        return
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    best = max(rates.values())
    print(f"threads {torch.get_num_threads()}  matmul 2048^3 (x @ W^T): fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    runs = [(s, "fp32") for s in args.sizes] + [(s, "bf16") for s in args.bf16_sizes]
    results = {}
    for size, precision in runs:
        out = subprocess.run([sys.executable, __file__, "--child", size, precision, "--reps", str(args.reps)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[(size, precision)] = r
        hw = tuple(int(v) for v in size.split("x"))
        macs = multiply_adds("sapiens_0.3b", hw, 19)
        bound = 2 * macs / best
        median = statistics.median(r["times"])
        print(f"0.3b {size} {precision}: {median:.2f} s/image (median of {len(r['times'])}), "
              f"{macs / 1e12:.2f} T multiply-adds, bound {bound:.2f} s, ratio {median / bound:.2f}, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    for size in args.bf16_sizes:
        if (size, "fp32") in results:
            a = np.array(results[(size, "fp32")]["points_input_px"])
            b = np.array(results[(size, "bf16")]["points_input_px"])
            d = np.linalg.norm(a - b, axis=1)
            print(f"bf16 vs fp32 landmarks at {size}: median {np.median(d):.3f} px, max {d.max():.3f} px "
                  f"(input scale; random weights)")


if __name__ == "__main__":
    main()
