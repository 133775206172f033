"""Local window alignment on a real radiograph: known sub-pixel shifts and small affine maps are recovered."""
import numpy as np
import SimpleITK as sitk
import torch
from medsapiens.detectors.atlas import pyramid
from medsapiens.settings import AtlasSettings
from medsapiens.detectors.ncc_align import align_windows, ncc, sample

SETTINGS = AtlasSettings()


def levels_of(image: np.ndarray) -> dict:
    return pyramid(sitk.GetImageFromArray(image.astype(np.float32) / 255.0), SETTINGS.local.levels)


def test_sample_is_bilinear_in_pixel_coordinates():
    image = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # value = 4 y + x
    xy = torch.tensor([[0.0, 0.0], [3.0, 2.0], [1.5, 0.5], [2.25, 1.0]])
    assert torch.allclose(sample(image, xy), 4 * xy[:, 1] + xy[:, 0])
    field = torch.stack([image, -image], -1)  # channels come along
    assert torch.allclose(sample(field, xy), torch.stack([4 * xy[:, 1] + xy[:, 0]] * 2, -1) * torch.tensor([1, -1]))


def test_ncc_ignores_brightness_and_contrast():
    a = torch.rand(5, 9, 9)
    assert torch.allclose(ncc(a, 3 * a + 7), torch.ones(5), atol=1e-5)
    assert torch.allclose(ncc(a, -a), -torch.ones(5), atol=1e-5)


def test_known_local_affine_maps_of_a_real_radiograph_are_recovered(ceph):
    case = ceph.case(0)
    grey = case.image if case.image.ndim == 2 else case.image.mean(axis=2)
    h, w = grey.shape
    # moving(x) = fixed(A (x - c) + c): content at fixed point p appears at c + A^-1 (p - c) in moving
    angle, scale, shift = np.deg2rad(2.0), 1.02, np.array([2.6, -1.7])  # residuals a global stage leaves
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    c = np.array([w, h]) / 2.0
    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    src = (np.stack([xs, ys], -1) - c) @ a.T + c - shift @ a.T
    moving = sample(torch.from_numpy(grey.astype(np.float32)), torch.from_numpy(src).float()).numpy()
    points = case.landmarks.points[case.landmarks.present]
    points = points[(points > 80).all(axis=1) & (points < [w - 80, h - 80]).all(axis=1)]
    truth = (points - c + shift @ a.T) @ np.linalg.inv(a).T + c
    found, score = align_windows(levels_of(grey), levels_of(moving), torch.from_numpy(points).float(), SETTINGS.local.levels,
                                 SETTINGS.local.iterations, SETTINGS.local.rate)
    err = np.linalg.norm(found.numpy() - truth, axis=1)
    moved = np.linalg.norm(points - truth, axis=1)
    assert moved.min() > 2.0  # the windows really had to move
    assert np.median(err) < 0.3 and err.max() < 2.0, err  # sub-pixel, a few low-texture windows within 2 px
    assert score.min() > 0.8
