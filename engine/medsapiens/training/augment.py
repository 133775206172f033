"""Training views: a random affine crop of the whole-image box plus photometric noise, as the MedSapiens recipe.

Geometry goes through the same UDP warp as inference (warp.py), so a view's landmarks are the case's landmarks
mapped by the view's own 2 x 3 matrix. Horizontal flip only where symmetric landmark pairs are declared.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models.warp import apply_affine, image_box, udp_warp_matrix, warp_image
from ..settings import Augment


def flip_index(n: int, pairs) -> np.ndarray:
    index = np.arange(n)
    for a, b in pairs:
        index[a], index[b] = b, a
    return index


def random_view(image: torch.Tensor, points: np.ndarray, present: np.ndarray, input_wh, aug: Augment,
                rng: np.random.Generator, flip_pairs=()):
    """One augmented view of a (1, 3, H, W) float 0-255 image.

    Returns the (3, h, w) view (0-255), its (K, 2) landmarks in input pixels and the (K,) present mask.
    """
    h, w = image.shape[-2:]
    center, scale = image_box(w, h)
    if rng.random() < aug.shift_p:
        center = center + rng.uniform(-aug.shift, aug.shift, 2) * scale
    scale = scale * rng.uniform(*aug.scale)
    rot = rng.uniform(-aug.rotation, aug.rotation) if rng.random() < aug.rotation_p else 0.0
    m = udp_warp_matrix(center, scale, rot, input_wh)
    view = warp_image(image, m, input_wh)[0]
    pts = apply_affine(m, points)
    present = present.copy()
    if flip_pairs and rng.random() < aug.flip:
        view = view.flip(-1)
        pts[:, 0] = input_wh[0] - 1 - pts[:, 0]
        index = flip_index(len(pts), flip_pairs)
        pts, present = pts[index], present[index]
    return _photometric(view, aug, rng), pts, present


def _photometric(view: torch.Tensor, aug: Augment, rng: np.random.Generator) -> torch.Tensor:
    if rng.random() < aug.photometric_p:
        view = view + rng.uniform(-32, 32)
    if rng.random() < aug.photometric_p:
        view = (view - 127.5) * rng.uniform(0.5, 1.5) + 127.5
    if rng.random() < aug.blur_p:
        view = _gaussian_blur(view, rng.uniform(0.5, 1.5))
    if rng.random() < aug.median_blur_p:
        view = F.pad(view[None], (1, 1, 1, 1), mode="replicate")[0].unfold(1, 3, 1).unfold(2, 3, 1)
        view = view.reshape(*view.shape[:3], 9).median(dim=-1).values
    if rng.random() < aug.dropout_p:
        h, w = view.shape[-2:]
        hh, hw = (int(s * rng.uniform(*aug.dropout_size)) for s in (h, w))
        y, x = rng.integers(0, h - hh + 1), rng.integers(0, w - hw + 1)
        view = view.clone()
        view[:, y:y + hh, x:x + hw] = 0
    return view.clamp(0, 255)


def _gaussian_blur(view: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=view.dtype)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(view.device)
    c = view.shape[0]
    x = F.pad(view[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]
