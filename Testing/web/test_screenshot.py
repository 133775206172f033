"""The Extensions Index screenshot (Screenshots/make_screenshot.py): Slicer's own slice view draws the detected
landmarks where the view's matrices put them, the points to check in the display node's other colour."""
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Slicer's libraries, the engine worker and a detection: about 20 s

SCREENSHOTS = Path(__file__).resolve().parents[2] / "Screenshots"


def test_the_screenshot_shows_each_point_where_it_is_in_its_colour(tmp_path, occluded):
    pytest.importorskip("trame_slicer", reason="the web extra (pip install 'medsapiens[web]') is not installed")
    from medsapiens import api
    from PIL import Image

    sys.path.insert(0, str(SCREENSHOTS))
    from make_screenshot import render

    target = occluded(api.phantom_case(7), 4)  # a point hidden under noise: one to check
    truth = target.landmarks
    target.landmarks = None
    drawn = render(tmp_path / "shot.png", [api.phantom_case(s) for s in (0, 1, 2)], target, size=(800, 600))
    image = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
    assert image.shape == (600, 800, 3)
    found = np.array([p["ras"][:2] for p in drawn["points"]]) * -1  # LPS mm of the image plane
    assert np.median(np.linalg.norm(found - truth.points * target.spacing, axis=1)) < 3.0
    assert drawn["points"][4]["check"], "the hidden point"
    colours = {False: (255, 127, 127), True: (102, 255, 255)}  # Slicer's selected and unselected point colours
    assert {p["check"] for p in drawn["points"]} == {False, True}, "some points to check, drawn differently"
    for p in drawn["points"]:
        x, y = (round(v) for v in p["pixel"])
        patch = image[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3)
        distance = np.abs(patch - colours[p["check"]]).max(axis=1)
        assert distance.min() < 40, (p["label"], p["check"], patch)
