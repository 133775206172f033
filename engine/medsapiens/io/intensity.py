"""Image intensities as the models expect them: RGB on a 0-255 scale.

8-bit images enter unchanged (grey copied to the three channels), as in the reference pipeline. 16-bit and
float images are windowed robustly first: the 0.5th percentile maps to 0 and the 99.5th to 255, clipped, so
that a few hot or dead pixels (burnt-in text, collimator edges) do not squash the contrast.
"""
from __future__ import annotations

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def to_rgb255(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) of any dtype -> float32 (H, W, 3) in [0, 255]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        out = image.astype(np.float32)
    else:
        values = image.astype(np.float32)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
            if hi <= lo:
                lo, hi = float(finite.min()), float(finite.max())
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
        out = np.clip((values - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255).astype(np.float32)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return out
