"""The MedSapiens detector: whole-image box -> UDP warp -> ViT + heatmap head -> DARK-UDP decode -> image pixels."""
from __future__ import annotations

import time
from functools import cache

import numpy as np
import torch

from ..case import Case, Landmarks, require_detectable
from ..errors import InputError
from ..io.intensity import to_rgb255
from ..models.codec import UDPCodec
from ..models.sapiens import MEAN, STD, SapiensPose
from ..models.warp import (
    apply_affine,
    image_box,
    invert_affine,
    udp_warp_matrix,
    warp_image,
)
from ..progress import Callback, Cancel, check, report
from ..settings import HEATMAP_SIGMA, SAPIENS_INPUT_HW

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def pick_device(device: str | None) -> torch.device:
    """cpu, cuda, cuda:N, or auto (CUDA when present); a device this machine lacks is an InputError (one line)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this PyTorch sees no CUDA GPU (a CPU build, or no NVIDIA driver); "
                         "use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def pick_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device has native bf16 arithmetic (and, on CPUs, it measures faster than fp32),
    else "fp32"; "fp32" and "bf16" are kept as given."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_native_bf16() and bf16_matmul_is_faster():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """x86 bf16 instructions (AVX512-BF16: AMD Zen 4/5, Intel Cooper Lake; AMX-BF16: Intel Sapphire Rapids on).
    Other CPUs (and PyTorch before torch.cpu.get_capabilities) count as without."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


@cache
def bf16_matmul_is_faster(n: int = 1024, reps: int = 3) -> bool:
    """Times an n^3 product in nn.Linear's layout in both precisions (a fraction of a second, once per process)."""

    def fastest(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.nn.functional.linear(a, b)  # warm-up (oneDNN primitive creation)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times.append(time.perf_counter() - t)
        return min(times)

    return fastest(torch.bfloat16) < fastest(torch.float32)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB 0-255 -> the model's input (ImageNet mean / std)."""
    mean = torch.tensor(MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def image_tensor(case: Case, device) -> torch.Tensor:
    return torch.from_numpy(to_rgb255(case.image)).permute(2, 0, 1)[None].to(device)


class HeatmapDetector:
    """Detects a fixed, named landmark set with a SapiensPose model; `detect(case) -> Landmarks`."""

    dim = 2

    def __init__(self, model: SapiensPose, names: list[str], input_hw=SAPIENS_INPUT_HW, sigma=HEATMAP_SIGMA,
                 flip_pairs=(), flip_test=False, device=None, precision="auto"):
        if len(names) != model.num_keypoints:
            raise ValueError(f"{len(names)} landmark names for a head with {model.num_keypoints} outputs")
        self.names = list(names)
        self.input_hw = tuple(int(v) for v in input_hw)
        if any(v < 32 or v % 16 for v in self.input_hw):
            raise ValueError(f"input size must be multiples of 16, at least 32; got {self.input_hw}")
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.model = model.to(self.device, self.dtype).eval()
        self.codec = UDPCodec(self.input_hw[::-1], (self.input_hw[1] // 4, self.input_hw[0] // 4), sigma)
        self.flip_index = np.arange(len(names))
        for a, b in flip_pairs:
            self.flip_index[a], self.flip_index[b] = b, a
        self.flip_test = flip_test

    @torch.inference_mode()
    def heatmaps(self, case: Case) -> tuple[torch.Tensor, np.ndarray]:
        """(K, h, w) float32 heatmaps of the case and the 2 x 3 image -> input warp they refer to."""
        center, scale = image_box(*case.size)
        warp = udp_warp_matrix(center, scale, 0.0, self.input_hw[::-1])
        x = warp_image(image_tensor(case, self.device), warp, self.input_hw[::-1])
        return self.predict(normalise(x))[0], warp

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) model input -> (B, K, H/4, W/4) float32 heatmaps; with the flip test, the mirrored input's
        heatmaps, mirrored back with symmetric channels swapped, are averaged in (mmpose's flip_mode 'heatmap')."""
        x = x.to(self.dtype)
        if not self.flip_test:
            return self.model(x).float()
        out = self.model(torch.cat([x, x.flip(-1)])).float()
        return 0.5 * (out[:len(x)] + out[len(x):].flip(-1)[:, self.flip_index])

    def detect(self, case: Case, progress: Callback = None, cancel: Cancel = None) -> Landmarks:
        check(cancel)
        require_detectable(case)
        report(progress, 0.0, "running the model")
        hm, warp = self.heatmaps(case)
        points, scores = self.codec.decode(hm)
        points = apply_affine(invert_affine(warp), points)
        confidence = np.clip(np.nan_to_num(scores), 0.0, 1.0)
        present = np.isfinite(points).all(axis=1) & (scores > 0)  # a heatmap with no positive peak: not found
        points[~present] = np.nan
        return Landmarks(self.names, points, confidence, present)
