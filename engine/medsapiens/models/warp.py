"""The top-down crop: the whole-image box, the UDP affine warp to the network input, and its inverse.

Matches mmpose's `bbox_xyxy2cs`, `fix_aspect_ratio`, `get_udp_warp_matrix` and cv2.warpAffine (bilinear,
constant border 0), so that landmarks agree with the reference pipeline.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BOX_PADDING = 1.25
ASPECT = 0.75  # width / height of the network input


def image_box(width: int, height: int, padding: float = BOX_PADDING, aspect: float = ASPECT):
    """Centre and size of the box [0, 0, w, h] padded by `padding`, widened to the input aspect (mmpose)."""
    center = np.array([width * 0.5, height * 0.5])
    w, h = width * padding, height * padding
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return center, scale


def udp_warp_matrix(center, scale, rot_deg: float, output_wh) -> np.ndarray:
    """2 x 3 matrix taking image pixels to input pixels: the box spans 0 .. output-1 (UDP)."""
    rot = math.radians(rot_deg)
    cs, sn = math.cos(rot), math.sin(rot)
    sx = (output_wh[0] - 1) / scale[0]
    sy = (output_wh[1] - 1) / scale[1]
    cx, cy = center
    return np.array([
        [cs * sx, -sn * sx, sx * (-cx * cs + cy * sn + 0.5 * scale[0])],
        [sn * sy, cs * sy, sy * (-cx * sn - cy * cs + 0.5 * scale[1])],
    ])


def invert_affine(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def warp_image(image: torch.Tensor, m: np.ndarray, output_wh) -> torch.Tensor:
    """Warp (B, C, H, W) float images by the 2 x 3 matrix `m` (source -> destination), bilinear, border 0.

    Pixel centres sit at integer coordinates, as in cv2.warpAffine; runs on the tensor's device.
    """
    h, w = image.shape[-2:]
    out_w, out_h = output_wh
    inv = invert_affine(np.asarray(m, dtype=np.float64))
    # normalised source coordinate (align_corners=True) as an affine function of destination pixels
    to_norm = np.diag([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    a = to_norm @ inv[:, :2]
    b = to_norm @ inv[:, 2] - 1.0
    dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64),
                            indexing="ij")
    gx = a[0, 0] * xs + a[0, 1] * ys + b[0]
    gy = a[1, 0] * xs + a[1, 1] * ys + b[1]
    grid = torch.stack([gx, gy], dim=-1).to(image.device, dtype)[None].expand(image.shape[0], -1, -1, -1)
    return F.grid_sample(image.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
