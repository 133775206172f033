"""UDP Gaussian heatmaps: encode points to targets, decode heatmaps with DARK-UDP sub-pixel refinement.

Coordinates here are network-input pixels; the heatmap grid is the input grid scaled by
(heatmap - 1) / (input - 1) (unbiased data processing), as in mmpose's UDPHeatmap.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..settings import HEATMAP_SIGMA

BLUR_KERNEL = 11


class UDPCodec:
    def __init__(self, input_wh, heatmap_wh, sigma: float = HEATMAP_SIGMA):
        self.input_wh = tuple(int(v) for v in input_wh)
        self.heatmap_wh = tuple(int(v) for v in heatmap_wh)
        self.sigma = float(sigma)
        self.scale = (np.array(self.input_wh) - 1.0) / (np.array(self.heatmap_wh) - 1.0)

    def encode(self, points: np.ndarray, visible: np.ndarray):
        """(K, 2) input-pixel points -> (K, H, W) float32 heatmaps and (K,) weights (0 = missing or off-grid)."""
        w, h = self.heatmap_wh
        mu = np.asarray(points, dtype=np.float64) / self.scale
        weights = np.asarray(visible, dtype=np.float32).copy()
        radius = 3 * self.sigma
        centre = np.floor(np.nan_to_num(mu) + 0.5)
        inside = ((centre - radius < [w, h]) & (centre + radius + 1 >= 0)).all(axis=1)
        weights[~inside] = 0.0
        xs = np.arange(w, dtype=np.float64)
        ys = np.arange(h, dtype=np.float64)
        heatmaps = np.zeros((len(mu), h, w), dtype=np.float32)
        for k in np.flatnonzero(weights > 0.5):
            gx = np.exp(-((xs - mu[k, 0]) ** 2) / (2 * self.sigma ** 2)) * (np.abs(xs - centre[k, 0]) <= radius)
            gy = np.exp(-((ys - mu[k, 1]) ** 2) / (2 * self.sigma ** 2)) * (np.abs(ys - centre[k, 1]) <= radius)
            heatmaps[k] = np.outer(gy, gx)
        return heatmaps, weights

    def decode(self, heatmaps) -> tuple[np.ndarray, np.ndarray]:
        """(K, H, W) heatmaps -> (K, 2) input-pixel points and (K,) scores (the heatmap maxima).

        A heatmap whose maximum is not positive gives a NaN point.
        """
        hm = torch.as_tensor(heatmaps).detach().float().cpu()
        k, h, w = hm.shape
        flat = hm.reshape(k, -1)
        scores, idx = flat.max(dim=1)
        x = (idx % w).numpy().astype(np.float64)
        y = (idx // w).numpy().astype(np.float64)
        offset = _dark_udp_offset(hm, x.astype(int), y.astype(int))
        points = np.stack([x, y], axis=1) + offset
        points[scores.numpy() <= 0] = np.nan
        return points * self.scale, scores.numpy().astype(np.float64)


def _gaussian_blur(hm: torch.Tensor, kernel: int = BLUR_KERNEL) -> torch.Tensor:
    """cv2.GaussianBlur(kernel, sigma 0) on zero-padded maps, rescaled to keep each map's maximum (mmpose)."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    t = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    x = hm[:, None]
    x = F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, kernel // 2))
    x = F.conv2d(x, g.view(1, 1, -1, 1), padding=(kernel // 2, 0))[:, 0]
    peak = hm.flatten(1).max(dim=1).values / x.flatten(1).max(dim=1).values
    return x * peak[:, None, None]


def _dark_udp_offset(hm: torch.Tensor, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One Newton step on the log of the blurred heatmap at (x, y), with finite differences (DARK-UDP)."""
    logh = torch.log(_gaussian_blur(hm).clamp(1e-3, 50.0)).double()
    pad = F.pad(logh[:, None], (1, 1, 1, 1), mode="replicate")[:, 0].numpy()
    k = np.arange(len(x))
    px, py = x + 1, y + 1

    def at(dx, dy):
        return pad[k, py + dy, px + dx]

    i = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = at(1, 0) - 2 * i + at(-1, 0)
    dyy = at(0, 1) - 2 * i + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * i - at(-1, 0) - at(0, -1) + at(-1, -1))
    hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
    hessian = hessian + np.finfo(np.float32).eps * np.eye(2)
    return -np.einsum("kij,kj->ki", np.linalg.inv(hessian), np.stack([dx, dy], -1))
