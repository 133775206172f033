"""Radiograph-like phantom cases with exactly known landmarks, for the offline demo and tests.

A head-like scene (skull ring, jaw, spine, teeth, sella) is drawn analytically in a canonical frame and seen
through a random similarity transform plus a smooth warp; the landmarks follow the same mapping, so their
true positions are exact. Blur, film-grain noise and a density gradient make it look like an X-ray.
"""
from __future__ import annotations

import numpy as np

from .case import Case, Landmarks

SIZE = (320, 400)  # width, height in pixels
SPACING = 0.5  # mm per pixel
LANDMARKS = {  # canonical positions (x, y)
    "Sella": (120.0, 150.0), "Nasion": (250.0, 120.0), "Vertex": (160.0, 40.0), "Occiput": (40.0, 190.0),
    "Incisor": (236.0, 292.0), "Molar": (182.0, 298.0), "Menton": (170.0, 352.0), "Gonion": (112.0, 312.0),
    "C2": (80.0, 300.0),
}


def _soft(d, width=1.5):
    """1 inside (d < 0), 0 outside, with a smooth edge."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -50, 50)))


def _ellipse(x, y, cx, cy, rx, ry):
    return np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0


def _scene(x, y):
    """Canonical density at (x, y)."""
    skull = _ellipse(x, y, 160, 190, 120, 150)
    density = 0.55 * _soft(skull * 60) - 0.35 * _soft((skull + 0.08) * 60)  # bony ring
    density += 0.10 * _soft(_ellipse(x, y, 160, 200, 105, 130) * 40)  # brain
    density += 0.45 * _soft(_ellipse(x, y, 120, 150, 14, 9) * 12) - 0.3 * _soft(_ellipse(x, y, 120, 147, 8, 5) * 8)
    jaw = _ellipse(x, y, 170, 290, 62, 62)
    density += 0.5 * _soft(jaw * 40) * (y > 285) - 0.35 * _soft((jaw + 0.15) * 40) * (y > 290)
    for tx in (236, 222, 208, 195, 182):
        density += 0.35 * _soft(_ellipse(x, y, tx, 292, 5, 12) * 6)
    for vy in (300, 332, 364):
        density += 0.4 * _soft(np.maximum(np.abs(x - 80) - 14, np.abs(y - vy) - 12))
    density += 0.25 * _soft(_ellipse(x, y, 250, 120, 10, 10) * 10)
    return density


def _mapping(rng):
    """Random canonical -> image mapping (similarity + smooth warp) and its numeric inverse."""
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.9, 1.1)
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array(SIZE) / 2
    shift = rng.uniform(-15, 15, size=2)
    amp, phase = rng.uniform(2, 6, size=2), rng.uniform(0, 2 * np.pi, size=2)

    def warp(p):
        return np.stack([amp[0] * np.sin(p[..., 1] / 60 + phase[0]), amp[1] * np.sin(p[..., 0] / 50 + phase[1])], -1)

    def forward(p):
        return (p - centre) @ a.T + centre + shift + warp(p)

    inv_a = np.linalg.inv(a)

    def inverse(x):
        p = (x - centre - shift) @ inv_a.T + centre
        for _ in range(8):  # fixed point: the warp is small and smooth
            p = (x - centre - shift - warp(p)) @ inv_a.T + centre
        return p

    return forward, inverse


def phantom_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    forward, inverse = _mapping(rng)
    w, h = SIZE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    canon = inverse(np.stack([xs, ys], -1))
    density = _scene(canon[..., 0], canon[..., 1])
    density *= 1.0 + 0.25 * (ys / h - 0.5) * rng.uniform(-1, 1)  # exposure gradient
    kernel = np.exp(-0.5 * (np.arange(-3, 4) / 1.2) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        density = np.apply_along_axis(np.convolve, axis, density, kernel, mode="same")
    density += rng.normal(0, 0.02, density.shape)
    image = np.clip(30 + 200 * density, 0, 255).astype(np.uint8)
    points = forward(np.array(list(LANDMARKS.values())))
    return Case(image, SPACING, Landmarks(list(LANDMARKS), points), name=f"phantom{seed:03d}")
