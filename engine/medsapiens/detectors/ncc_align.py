"""Local affine alignment of many small image windows at once, by normalised cross-correlation (torch).

The atlas detectors' last stage: after a global registration, each landmark's neighbourhood in the atlas is
aligned to the new image by its own affine map, coarse to fine, all landmarks in one batch. A window's final
correlation says how well its landmark matched, which weights the atlases' votes. Works on images (points
(x, y)) and volumes (points (x, y, z)) alike.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Linearly interpolated values of `image` at voxel coordinates `xy`, 0 outside.

    2D: image H x W (or H x W x C), xy (..., 2) as (x, y). 3D: image D x H x W, xy (..., 3) as (x, y, z)."""
    if xy.shape[-1] == 3:
        d, h, w = image.shape
        grid = xy * torch.tensor([2 / (w - 1), 2 / (h - 1), 2 / (d - 1)], dtype=xy.dtype) - 1
        out = F.grid_sample(image[None, None], grid.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.reshape(xy.shape[:-1])
    h, w = image.shape[:2]
    grid = torch.stack([xy[..., 0] * (2 / (w - 1)) - 1, xy[..., 1] * (2 / (h - 1)) - 1], -1)
    planes = image.reshape(h, w, -1).permute(2, 0, 1)[None]
    out = F.grid_sample(planes, grid.reshape(1, 1, -1, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0].T.reshape(*xy.shape[:-1], *image.shape[2:])


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of windows (batch, ...), over all but the first axis; in [-1, 1], 0 where
    either is flat."""
    dims = tuple(range(1, a.ndim))
    a = a - a.mean(dims, keepdim=True)
    b = b - b.mean(dims, keepdim=True)
    return (a * b).sum(dims) / ((a * a).sum(dims) * (b * b).sum(dims) + 1e-8).sqrt()


def window_offsets(step: float, half: int, dim: int) -> torch.Tensor:
    """The (2 half + 1)^dim sample offsets of a window, `step` apart, flattened: m x dim."""
    ticks = torch.arange(-half, half + 1, dtype=torch.float32) * step
    return torch.stack(torch.meshgrid(*[ticks] * dim, indexing="xy"), -1).reshape(-1, dim)


@contextmanager
def one_thread():
    """Run torch on one thread: these tensors are small, so a second thread gains nothing, and when the other core
    is busy the idle thread's wait at every small operation costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def align_windows(fixed: dict, moving: dict, points: torch.Tensor, levels, iterations: int, rate: float,
                  to_moving=None):
    """Where each of `points` (B x dim, voxels of `fixed`) lies in `moving`.

    fixed / moving: voxel step -> image smoothed for that step; levels: (voxel step, half window in steps),
    coarse to fine. to_moving: differentiable map from `fixed` voxel coordinates to `moving`'s (default: the
    same grid, `moving` already warped onto `fixed`). Each point's window gets an affine map (centred on the
    point), fitted by Adam on -NCC; each level starts from the last. Returns the moved points (B x dim, in
    `fixed` voxels) and their final NCC (B)."""
    with one_thread():
        return _align(fixed, moving, points, levels, iterations, rate, to_moving)


def _align(fixed, moving, points, levels, iterations, rate, to_moving):
    n, dim = points.shape
    to_moving = to_moving or (lambda xy: xy)
    shift = torch.zeros(n, dim, requires_grad=True)  # voxels
    linear = torch.zeros(n, dim, dim, requires_grad=True)  # matrix - identity

    def score(step, offsets, template):
        where = points[:, None] + offsets + torch.einsum("bij,mj->bmi", linear, offsets) + shift[:, None]
        return ncc(template, sample(moving[step], to_moving(where)))

    for step, half in levels:
        offsets = window_offsets(step, half, dim)
        template = sample(fixed[step], points[:, None] + offsets)
        # rates such that one Adam step moves the window's edge by about `rate` steps either way
        opt = torch.optim.Adam([{"params": [shift], "lr": rate * step}, {"params": [linear], "lr": rate / half}])
        for _ in range(iterations):
            opt.zero_grad()
            (-score(step, offsets, template).sum()).backward()
            opt.step()
    with torch.no_grad():
        return points + shift, score(step, offsets, template)
