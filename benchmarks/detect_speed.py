"""Per-image `detect` time of Sapiens 0.3b against the machine's arithmetic bound, and bf16 vs fp32 landmarks.

1. Attention kernels at the 0.3b's 1024 x 768 shape (16 heads x 3072 tokens x 64): PyTorch's SDPA and the blocked
   kernel (models/attention.py), fp32 and bf16, interleaved; prints GFLOP/s and whether the rule picks the faster.
2. Detect: for each (precision, kernel) a fresh process builds 0.3b (random weights: the time does not depend on
   them) and alternates `--reps` times a 2048^3 product in nn.Linear's layout in that precision (the rate that sets
   the bound) with one detect on a real radiograph. Prints the median detect time, the bound = 2 x multiply-adds /
   median rate, their ratio and the peak RSS. `--threads 1 --clock cpu` times with the process's CPU time, which
   other processes on a shared machine inflate much less than wall time.
3. bf16 vs fp32 landmarks (input pixels) where the heatmaps have trained peaks: a micro Sapiens fitted to one real
   cephalogram (the test suite's recipe), on that image and unseen ones; and the 0.3b architecture whose final 1x1
   layer is fitted by least squares to `--big-images` cephalograms on fp32 features of the random-weight network (random
   backbone and deconvolutions: a fitted read-out, not a trained 0.3b).
Usage:
    python benchmarks/detect_speed.py [--reps 3] [--threads 1 --clock cpu] [--sizes 1024x768] [--big-images 3]
                                      [--skip kernels detect landmarks]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DATA = "../shared/data/ceph_hamedan/landmarks.csv"
ARCH = "sapiens_0.3b"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def clock(kind):
    return time.process_time if kind == "cpu" else time.perf_counter


def matmul_rate(dtype, timer, n=2048, reps=3) -> float:
    """FLOP/s of an n^3 product in nn.Linear's layout (x @ W^T), the layout of the model's linear layers."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, b)
    times = []
    for _ in range(reps):
        t = timer()
        F.linear(a, b)
        times.append(timer() - t)
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


def use_kernel(kernel: str) -> None:
    """"sdpa": the ViT blocks call F.scaled_dot_product_attention, as the engine did before; "rule": the engine's."""
    import medsapiens.models.attention as attention
    import medsapiens.models.sapiens as sapiens

    sapiens.scaled_dot_product_attention = {"sdpa": F.scaled_dot_product_attention,
                                            "rule": attention.scaled_dot_product_attention}[kernel]


def attention_kernels(reps, timer) -> None:
    from medsapiens.models.attention import blocked_attention, use_blocked

    heads, n, d = 16, 3072, 64
    x = torch.randn(1, n, 3, heads, d)
    flops = 4 * heads * n * n * d
    for name, dtype in DTYPES.items():
        q, k, v = x.to(dtype).permute(2, 0, 3, 1, 4)  # strided views, as the fused qkv gives them
        kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                   "blocked": lambda: blocked_attention(q, k, v)}
        times = {kernel: [] for kernel in kernels}
        with torch.inference_mode():
            for f in kernels.values():
                f()
            for _ in range(reps):
                for kernel, f in kernels.items():
                    t = timer()
                    f()
                    times[kernel].append(timer() - t)
            rule = "blocked" if use_blocked(q) else "sdpa"
        rates = {kernel: flops / statistics.median(t) / 1e9 for kernel, t in times.items()}
        fastest = max(rates, key=rates.get)
        print(f"attention {name} ({heads} x {n} x {d}): " + ", ".join(f"{k} {r:.0f} GFLOP/s" for k, r in rates.items())
              + f"; rule picks {rule}{' (the faster)' if rule == fastest else ', NOT the faster'}", flush=True)


def run_detect(hw, precision, kernel, reps, timer) -> dict:
    """In this (fresh) process: build 0.3b, alternate matmul rate and detect `reps` times on a real radiograph."""
    from medsapiens.detectors.heatmap import HeatmapDetector
    from medsapiens.io.datasets import Dataset
    from medsapiens.models.sapiens import SapiensPose

    use_kernel(kernel)
    torch.manual_seed(0)
    case = Dataset(DATA).case(0)
    detector = HeatmapDetector(SapiensPose(ARCH, 19), [f"L{i}" for i in range(19)], hw, device="cpu",
                               precision=precision)
    HeatmapDetector(copy.deepcopy(detector.model), detector.names, (256, 192), device="cpu",
                    precision=precision).detect(case)  # warm-up: libraries, thread pool
    times, rates = [], []
    for _ in range(reps):
        rates.append(matmul_rate(DTYPES[precision], timer))
        t = timer()
        detector.detect(case)
        times.append(timer() - t)
    return {"times": times, "rates": rates, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def fitted_micro(ds):
    """The test suite's fitted model (Testing/conftest.py): micro Sapiens, 500 Adam steps on case 001 at 256 x 192."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "Testing"))
    from conftest import overfit
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    return overfit(SapiensPose("micro", len(ds.names), (16, 12)), ds.case(0), (256, 192), steps=500, lr=2e-3)


def fitted_final_layer(ds, hw, rows):
    """0.3b with random weights whose final 1x1 layer is refitted (ridge least squares, fp64) so that, on fp32
    features of `rows`, it outputs the training heatmaps (sigma 2 heatmap px) of their annotated landmarks."""
    from medsapiens.detectors.heatmap import image_tensor, normalise
    from medsapiens.models.codec import UDPCodec
    from medsapiens.models.sapiens import SapiensPose
    from medsapiens.models.warp import apply_affine, image_box, udp_warp_matrix, warp_image

    torch.manual_seed(0)
    model = SapiensPose(ARCH, len(ds.names)).eval()
    wh = hw[::-1]
    codec = UDPCodec(wh, (wh[0] // 4, wh[1] // 4), sigma=2.0)
    gram, rhs = 0.0, 0.0
    for i in rows:
        case = ds.case(i)
        center, scale = image_box(*case.size)
        m = udp_warp_matrix(center, scale, 0.0, wh)
        with torch.inference_mode():
            x = normalise(warp_image(image_tensor(case, "cpu"), m, wh))
            f = model.head.conv_layers(model.head.deconv_layers(model.backbone(x)))[0].flatten(1).T
        a = torch.cat([f, torch.ones(len(f), 1)], 1).double()
        target, _ = codec.encode(apply_affine(m, case.landmarks.points), case.landmarks.present)
        gram, rhs = gram + a.T @ a, rhs + a.T @ torch.from_numpy(target).flatten(1).T.double()
    w = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64), rhs)
    with torch.no_grad():
        model.head.final_layer.weight.copy_(w[:-1].T.reshape(model.head.final_layer.weight.shape).float())
        model.head.final_layer.bias.copy_(w[-1].float())
    return model


def landmark_difference(model, ds, rows, hw, kernel="rule") -> dict:
    """Detect in fp32 and in bf16; distance of bf16 from fp32 landmarks and of fp32 from the annotation."""
    from medsapiens.detectors.heatmap import HeatmapDetector
    from medsapiens.models.warp import image_box

    use_kernel(kernel)
    d_bf16, d_truth = [], []
    for i in rows:
        case = ds.case(i)
        points = {p: HeatmapDetector(copy.deepcopy(model), ds.names, hw, 2.0 if max(hw) > 256 else 3.0, device="cpu",
                                     precision=p).detect(case).points for p in DTYPES}
        input_px = image_box(*case.size)[1][0] / (hw[1] - 1)  # image pixels per input pixel
        d_bf16.append(np.linalg.norm(points["bf16"] - points["fp32"], axis=1) / input_px)
        d_truth.append(np.linalg.norm(points["fp32"] - case.landmarks.points, axis=1) / input_px)
    d_bf16, d_truth = np.concatenate(d_bf16), np.concatenate(d_truth)
    return {"median": float(np.nanmedian(d_bf16)), "max": float(np.nanmax(d_bf16)),
            "fp32_to_truth": float(np.nanmedian(d_truth))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", nargs="+", default=["1024x768"])
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's, one per core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--configs", nargs="+", default=["fp32:rule", "bf16:sdpa", "bf16:rule"],
                   help="detect runs as precision:kernel (kernel sdpa = the engine before models/attention.py)")
    p.add_argument("--big-images", type=int, default=3, help="cephalograms the 0.3b final layer is fitted on")
    p.add_argument("--skip", nargs="*", default=[], choices=("kernels", "detect", "landmarks"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = clock(args.clock)
    if args.child:
        hw = tuple(int(v) for v in args.child[0].split("x"))
        print(json.dumps(run_detect(hw, args.child[1], args.child[2], args.reps, timer)))
        return
    print(f"threads {torch.get_num_threads()}, clock {args.clock}, load average {os.getloadavg()[0]:.1f}", flush=True)
    if "kernels" not in args.skip:
        attention_kernels(args.reps, timer)
    if "detect" not in args.skip:
        for size in args.sizes:
            hw = tuple(int(v) for v in size.split("x"))
            macs = multiply_adds(ARCH, hw, 19)
            for precision, kernel in (c.split(":") for c in args.configs):
                cmd = [sys.executable, __file__, "--child", size, precision, kernel, "--reps", str(args.reps),
                       "--clock", args.clock] + (["--threads", str(args.threads)] if args.threads else [])
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                rate, median = statistics.median(r["rates"]), statistics.median(r["times"])
                bound = 2 * macs / rate
                print(f"0.3b {size} {precision} attention={kernel}: {median:.2f} s/image (median of {args.reps}), "
                      f"{macs / 1e12:.2f} T multiply-adds, {precision} matmul {rate / 1e9:.0f} GFLOP/s -> bound "
                      f"{bound:.2f} s, ratio {median / bound:.2f}, peak RSS {r['peak_rss_gb']:.2f} GB, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if "landmarks" not in args.skip:
        from medsapiens.io.datasets import Dataset

        ds = Dataset(DATA)
        micro = fitted_micro(ds)
        for kernel in ("sdpa", "rule"):
            r = landmark_difference(micro, ds, range(5), (256, 192), kernel)
            print(f"bf16 vs fp32, micro fitted on 001, images 001-005, 256 x 192, attention={kernel}: median "
                  f"{r['median']:.3f}, max {r['max']:.3f} input px "
                  f"(fp32 to annotation: median {r['fp32_to_truth']:.1f})")
        hw = tuple(int(v) for v in args.sizes[0].split("x"))
        rows = range(args.big_images)
        big = fitted_final_layer(ds, hw, rows)
        r = landmark_difference(big, ds, rows, hw)
        print(f"bf16 vs fp32, 0.3b (random weights, final layer fitted on the first {len(rows)} images), same images, "
              f"{args.sizes[0]}: median {r['median']:.3f}, max {r['max']:.3f} input px "
              f"(fp32 to annotation: median {r['fp32_to_truth']:.1f})", flush=True)


if __name__ == "__main__":
    main()
