"""Local affine alignment of many small image windows at once, by normalised cross-correlation (torch).

The atlas detector's last stage: after a global registration, each landmark's neighbourhood in the atlas is
aligned to the (globally warped) new image by its own affine map, coarse to fine, all landmarks in one batch.
A window's final correlation says how well its landmark matched, which weights the atlases' votes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `image` (H x W, or H x W x C) at pixel coordinates `xy` (..., 2) as (x, y); 0 outside."""
    h, w = image.shape[:2]
    grid = torch.stack([xy[..., 0] * (2 / (w - 1)) - 1, xy[..., 1] * (2 / (h - 1)) - 1], -1)
    planes = image.reshape(h, w, -1).permute(2, 0, 1)[None]
    out = F.grid_sample(planes, grid.reshape(1, 1, -1, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0].T.reshape(*xy.shape[:-1], *image.shape[2:])


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of windows (..., n, n), in [-1, 1]; 0 where either is flat."""
    a = a - a.mean((-1, -2), keepdim=True)
    b = b - b.mean((-1, -2), keepdim=True)
    return (a * b).sum((-1, -2)) / ((a * a).sum((-1, -2)) * (b * b).sum((-1, -2)) + 1e-8).sqrt()


def align_windows(fixed: dict, moving: dict, points: torch.Tensor, levels, iterations: int, rate: float):
    """Where each of `points` (B x 2, px of `fixed`) lies in `moving` (same pixel grid, roughly aligned).

    fixed / moving: px step -> image (H x W) smoothed for that step; levels: (px step, half window in steps),
    coarse to fine. Each point's window gets an affine map (centred on the point), fitted by Adam on -NCC;
    each level starts from the last. Returns the moved points (B x 2) and their final NCC (B)."""
    n = len(points)
    shift = torch.zeros(n, 2, requires_grad=True)  # px
    linear = torch.zeros(n, 2, 2, requires_grad=True)  # matrix - identity

    def score(step, offsets, template):
        where = points[:, None, None] + offsets + torch.einsum("bij,hwj->bhwi", linear, offsets) + shift[:, None, None]
        return ncc(template, sample(moving[step], where))

    for step, half in levels:
        ticks = torch.arange(-half, half + 1, dtype=torch.float32) * step
        offsets = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1)  # n x n x 2
        template = sample(fixed[step], points[:, None, None] + offsets)
        # rates such that one Adam step moves the window's edge by about `rate` steps either way
        opt = torch.optim.Adam([{"params": [shift], "lr": rate * step}, {"params": [linear], "lr": rate / half}])
        for _ in range(iterations):
            opt.zero_grad()
            (-score(step, offsets, template).sum()).backward()
            opt.step()
    with torch.no_grad():
        return points + shift, score(step, offsets, template)
