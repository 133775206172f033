"""`medsapiens detect` end to end on real radiographs, and one-line errors for bad input."""
import numpy as np
import pytest
from medsapiens.cli import main
from medsapiens.io.datasets import Dataset
from medsapiens.io.markups import landmarks_from_markups, read_markups


@pytest.mark.slow
def test_detect_writes_markups_and_csv_that_slicer_reads(tmp_path, fitted_file, ceph, capsys, scene):
    images = [ceph.root / ceph.rows[i].image for i in (0, 1)]
    sx = ceph.rows[0].spacing
    assert main(["detect", str(fitted_file), *map(str, images), "--out", str(tmp_path), "--device", "cpu",
                 "--spacing", str(sx)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["001.mrk.json", "002.mrk.json", "landmarks.csv"]

    table = Dataset(tmp_path / "landmarks.csv")
    assert table.names == ceph.names and table.ids() == ["001", "002"]
    case = table.case(0)  # the image path in the CSV is relative to the output folder and resolves
    truth = ceph.rows[0].landmarks
    found = table.rows[0].landmarks
    assert found.present.all()
    assert ((found.points >= 0) & (found.points <= [670, 836])).all(), "points inside the image"
    # the model was fitted on this very case: it must find its landmarks (an untrained one is ~300 px off)
    assert np.median(np.linalg.norm(found.points - truth.points, axis=1)) < 10.0

    names, lps, confidence, present, check = read_markups(tmp_path / "001.mrk.json")
    assert names == ceph.names and present.all() and ((confidence > 0) & (confidence <= 1)).all()
    # the CSV carries each point's confidence and review flag, as the .mrk.json does
    header = (tmp_path / "landmarks.csv").read_text().splitlines()[0].split(",")
    assert header[4:8] == ["S_x", "S_y", "S_p", "S_check"]
    assert np.allclose(found.confidence, confidence, atol=1e-3) and np.array_equal(found.check, check)
    assert np.allclose(lps, np.column_stack([found.points * sx, np.zeros(19)]), atol=2e-3)
    assert np.allclose(landmarks_from_markups(tmp_path / "001.mrk.json", case).points, found.points, atol=1e-2)

    # Slicer's own markups logic reads the file: RAS = (-x sx, -y sy, 0)
    node = scene.GetNodeByID(scene.logics["Markups"].LoadMarkups(str(tmp_path / "001.mrk.json")))
    assert node.GetNumberOfControlPoints() == 19
    for i in (0, 7, 18):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, ras)
        assert node.GetNthControlPointLabel(i) == ceph.names[i]
        assert np.allclose(ras, [-found.points[i, 0] * sx, -found.points[i, 1] * sx, 0], atol=2e-3)
        assert node.GetNthControlPointDescription(i).startswith("confidence ")


@pytest.mark.slow
def test_flip_test_mirrors_landmarks_and_swaps_pairs(fitted_micro, ceph):
    """With the flip test, a mirrored input gives exactly the mirrored heatmaps with each symmetric pair swapped,
    whatever the weights (the mirrored pass of one input is the plain pass of the other), so the landmarks mirror
    too; without it this model, fitted to one unmirrored case, is far from symmetric."""
    import copy

    from medsapiens.detectors.heatmap import HeatmapDetector, image_tensor, normalise
    from medsapiens.models.warp import image_box, udp_warp_matrix, warp_image

    case = ceph.case(0)
    center, scale = image_box(*case.size)
    x = normalise(warp_image(image_tensor(case, "cpu"), udp_warp_matrix(center, scale, 0.0, (192, 256)), (192, 256)))
    pairs = [(0, 1), (4, 5), (10, 11)]
    swap = np.arange(19)
    for a, b in pairs:
        swap[a], swap[b] = b, a

    def run(flip_test):
        detector = HeatmapDetector(copy.deepcopy(fitted_micro), ceph.names, (256, 192), 3.0, pairs, flip_test,
                                   device="cpu")
        plain, mirrored = detector.predict(x), detector.predict(x.flip(-1))
        p, q = detector.codec.decode(plain[0])[0], detector.codec.decode(mirrored[0])[0]
        expected = np.column_stack([191 - p[:, 0], p[:, 1]])[swap]  # input pixels
        return (mirrored - plain.flip(-1)[:, swap]).abs().max().item(), np.abs(q - expected).max(), plain

    heatmap_error, point_error, with_flip = run(True)
    assert heatmap_error < 1e-5 and point_error < 0.25, (heatmap_error, point_error)
    heatmap_error, point_error, plain = run(False)
    assert heatmap_error > 0.1 and point_error > 5, (heatmap_error, point_error)
    assert (with_flip - plain).abs().max() > 0.1, "the flip test averages in the mirrored pass"


@pytest.mark.slow
def test_flip_test_option_reaches_the_detector(tmp_path, fitted_file, ceph):
    image = ceph.root / ceph.rows[0].image
    found = {}
    for flag in ("--flip-test", "--no-flip-test"):
        out = tmp_path / flag
        assert main(["detect", str(fitted_file), str(image), "--out", str(out), flag,
                     "--input-size", "256", "192"]) == 0
        found[flag] = Dataset(out / "landmarks.csv").rows[0].landmarks.points
    assert not np.allclose(found["--flip-test"], found["--no-flip-test"])


def test_help_everywhere(capsys):
    for args in (["--help"], *([command, "--help"] for command in ("detect", "analyze", "finetune", "train",
                                                                   "evaluate", "models", "demo"))):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out, args


@pytest.mark.slow
def test_bf16_landmarks_agree_with_fp32_on_a_fitted_model(fitted_micro, ceph):
    import copy

    from medsapiens.detectors.heatmap import HeatmapDetector
    from medsapiens.models.warp import image_box

    case = ceph.case(0)
    runs = {p: HeatmapDetector(copy.deepcopy(fitted_micro), ceph.names, (256, 192), 3.0, device="cpu",
                               precision=p).detect(case).points for p in ("fp32", "bf16")}
    input_px = image_box(*case.size)[1][0] / 191  # image pixels per input pixel
    d = np.linalg.norm(runs["fp32"] - runs["bf16"], axis=1) / input_px
    assert d.max() < 0.5, d
