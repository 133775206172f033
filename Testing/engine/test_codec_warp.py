"""UDP codec and the crop warp: exact round trips and agreement between image and point mappings."""
import numpy as np
import torch
from medsapiens.models.codec import UDPCodec
from medsapiens.models.warp import (
    apply_affine,
    image_box,
    invert_affine,
    udp_warp_matrix,
    warp_image,
)


def test_encode_decode_recovers_subpixel_points():
    rng = np.random.default_rng(0)
    codec = UDPCodec((768, 1024), (192, 256), sigma=3.0)
    points = rng.uniform([40, 40], [728, 984], size=(50, 2))
    heatmaps, weights = codec.encode(points, np.ones(50, bool))
    assert heatmaps.shape == (50, 256, 192) and weights.all()
    decoded, scores = codec.decode(heatmaps)
    assert np.abs(decoded - points).max() < 0.05
    assert (scores > 0.9).all()


def test_encode_masks_missing_and_off_grid_points():
    codec = UDPCodec((192, 256), (48, 64), sigma=2.0)
    points = np.array([[50.0, 60.0], [np.nan, np.nan], [5000.0, 10.0]])
    heatmaps, weights = codec.encode(points, np.array([True, False, True]))
    assert weights.tolist() == [1.0, 0.0, 0.0]
    assert heatmaps[1].max() == 0 and heatmaps[2].max() == 0
    decoded, _ = codec.decode(heatmaps)
    assert np.isnan(decoded[1]).all()


def test_box_is_padded_whole_image_with_input_aspect():
    center, scale = image_box(670, 836)
    assert np.allclose(center, [335, 418])
    assert np.isclose(scale[0] / scale[1], 0.75)
    assert scale[0] >= 670 * 1.25 - 1e-9 and scale[1] >= 836 * 1.25 - 1e-9


def test_warp_matrix_maps_box_edges_to_first_and_last_input_pixel():
    center, scale = np.array([300.0, 400.0]), np.array([600.0, 800.0])
    m = udp_warp_matrix(center, scale, 0.0, (192, 256))
    corners = apply_affine(m, [[0, 0], [600, 800]])
    assert np.allclose(corners, [[0, 0], [191, 255]])


def test_points_round_trip_through_rotated_warp():
    rng = np.random.default_rng(1)
    m = udp_warp_matrix(np.array([320.0, 410.0]), np.array([700.0, 933.3]), 37.0, (768, 1024))
    pts = rng.uniform(0, 800, size=(20, 2))
    assert np.allclose(apply_affine(invert_affine(m), apply_affine(m, pts)), pts, atol=1e-9)


def test_image_warp_moves_a_bright_pixel_where_the_point_mapping_says():
    image = torch.zeros(1, 1, 200, 150)
    image[0, 0, 120, 40] = 1.0  # row 120, column 40
    m = udp_warp_matrix(np.array([75.0, 100.0]), np.array([150.0, 200.0]), 20.0, (300, 400))
    out = warp_image(image, m, (300, 400))[0, 0]
    expected = apply_affine(m, [[40.0, 120.0]])[0]
    ys, xs = torch.nonzero(out > 0, as_tuple=True)
    w = out[ys, xs]
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    assert np.abs(centroid - expected).max() < 0.1
    # outside the source: border value 0
    assert out[0, 0] == 0
