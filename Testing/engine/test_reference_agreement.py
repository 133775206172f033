"""Landmarks agree with the reference top-down pipeline (mmpose as Sapiens uses it) to a fraction of a pixel.

The reference chain is re-stated here independently with OpenCV, as mmpose runs it: whole-image box
[0, 0, w, h] -> centre/scale padded 1.25 and widened to aspect 0.75 -> UDP warp matrix -> cv2.warpAffine
(bilinear, border 0) -> heatmaps -> argmax -> DARK-UDP on cv2.GaussianBlur'd log heatmaps -> keypoints /
(heatmap - 1) * input size -> keypoints / input size * scale + centre - scale / 2.
"""
import math

import cv2
import numpy as np
import pytest
import torch
from medsapiens.detectors.heatmap import HeatmapDetector, normalise


def reference_warp(center, scale, out_w, out_h):
    sx, sy = (out_w - 1) / scale[0], (out_h - 1) / scale[1]
    return np.array([[sx, 0.0, sx * (-center[0] + 0.5 * scale[0])],
                     [0.0, sy, sy * (-center[1] + 0.5 * scale[1])]], dtype=np.float32)


def reference_decode(heatmaps, input_w, input_h):
    k, h, w = heatmaps.shape
    flat = heatmaps.reshape(k, -1)
    idx = flat.argmax(axis=1)
    pts = np.stack([idx % w, idx // w], axis=1).astype(np.float32)
    blurred = np.empty_like(heatmaps)
    for i in range(k):  # cv2 blur on a zero-padded copy, rescaled to the original maximum
        padded = np.zeros((h + 10, w + 10), np.float32)
        padded[5:-5, 5:-5] = heatmaps[i]
        b = cv2.GaussianBlur(padded, (11, 11), 0)[5:-5, 5:-5]
        blurred[i] = b * heatmaps[i].max() / b.max()
    logh = np.log(np.clip(blurred, 1e-3, 50.0))
    for i in range(k):
        x, y = int(pts[i, 0]), int(pts[i, 1])
        p = np.pad(logh[i], 1, mode="edge")
        x, y = x + 1, y + 1
        dx = 0.5 * (p[y, x + 1] - p[y, x - 1])
        dy = 0.5 * (p[y + 1, x] - p[y - 1, x])
        dxx = p[y, x + 1] - 2 * p[y, x] + p[y, x - 1]
        dyy = p[y + 1, x] - 2 * p[y, x] + p[y - 1, x]
        dxy = 0.5 * (p[y + 1, x + 1] - p[y, x + 1] - p[y + 1, x] + 2 * p[y, x] - p[y, x - 1] - p[y - 1, x]
                     + p[y - 1, x - 1])
        hess = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
        pts[i] -= np.linalg.inv(hess) @ np.array([dx, dy])
    return pts / [w - 1, h - 1] * [input_w, input_h]


@pytest.mark.slow
def test_landmarks_match_the_reference_pipeline(fitted_micro, ceph):
    case = ceph.case(0)
    in_h, in_w = 256, 192
    detector = HeatmapDetector(fitted_micro, ceph.names, (in_h, in_w), 3.0, device="cpu", precision="fp32")
    ours = detector.detect(case).points

    h, w = case.image.shape[:2]
    center = np.array([w / 2, h / 2])
    bw, bh = w * 1.25, h * 1.25
    scale = np.array([bw, bw / 0.75]) if bw > bh * 0.75 else np.array([bh * 0.75, bh])
    image = np.repeat(case.image[:, :, None], 3, axis=2).astype(np.uint8)
    warped = cv2.warpAffine(image, reference_warp(center, scale, in_w, in_h), (in_w, in_h),
                            flags=cv2.INTER_LINEAR)
    x = normalise(torch.from_numpy(warped.astype(np.float32)).permute(2, 0, 1)[None])
    with torch.no_grad():
        heatmaps = fitted_micro(x)[0].numpy()
    kp = reference_decode(heatmaps, in_w, in_h)
    reference = kp / [in_w, in_h] * scale + center - 0.5 * scale

    diff = np.linalg.norm(ours - reference, axis=1)
    px_per_input_px = scale[0] / (in_w - 1)
    assert math.isclose(px_per_input_px, 4.36, rel_tol=0.01)
    assert np.median(diff) < 0.1 * px_per_input_px and diff.max() < 0.5 * px_per_input_px, diff
