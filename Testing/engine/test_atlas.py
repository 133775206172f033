"""The weight-free atlas detector on real radiographs and the offline demo."""
import json

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
from medsapiens import Case, InputError, Landmarks, load_detector
from medsapiens.cli import main
from medsapiens import api
from medsapiens.detectors.atlas import BSPLINE_GAIN, STAGE_TRIAL_CASES, AtlasDetector
from medsapiens.io.datasets import Dataset
from medsapiens.settings import AtlasSettings
from medsapiens.io.markups import write_markups


def warped_copy(case: Case, seed=0):
    """The case's image under a known smooth warp (affine + sinusoidal), with its landmarks moved exactly."""
    rng = np.random.default_rng(seed)
    h, w = case.image.shape[:2]
    angle, scale, shift = np.deg2rad(4.0), 1.04, np.array([12.0, -9.0])
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([w, h]) / 2.0
    amp = rng.uniform(3, 5, 2)

    def forward(p):  # original -> warped
        return (p - centre) @ a.T + centre + shift + amp * np.sin(p[..., ::-1] / [90.0, 110.0])

    def inverse(x):
        p = (x - centre - shift) @ np.linalg.inv(a).T + centre
        for _ in range(10):
            p = (x - centre - shift - amp * np.sin(p[..., ::-1] / [90.0, 110.0])) @ np.linalg.inv(a).T + centre
        return p

    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    src = inverse(np.stack([xs, ys], -1))
    image = sitk.GetImageFromArray(case.image.astype(np.float32))
    coords = sitk.GetImageFromArray(src, isVector=True)
    field = sitk.DisplacementFieldTransform(sitk.Cast(coords - sitk.Compose(
        sitk.GetImageFromArray(xs), sitk.GetImageFromArray(ys)), sitk.sitkVectorFloat64))
    warped = sitk.GetArrayFromImage(sitk.Resample(image, image, field, sitk.sitkLinear, 0.0))
    moved = Landmarks(case.landmarks.names, forward(case.landmarks.points), present=case.landmarks.present)
    return Case(warped.astype(np.uint8), case.spacing, moved, name=case.name + "_warped")


@pytest.mark.slow
@pytest.mark.parametrize("deformable", [False, True], ids=["affine+local", "bspline+local"])
def test_registration_recovers_a_known_warp_of_a_real_radiograph(ceph, deformable):
    case = ceph.case(0)
    target = warped_copy(case)
    found = AtlasDetector([case], AtlasSettings(deformable=deformable)).detect(target)
    err = np.linalg.norm(found.points - target.landmarks.points, axis=1)
    assert np.median(err) < 1.0 and np.percentile(err, 90) < 2.0, err


@pytest.mark.slow
def test_an_atlas_that_does_not_match_is_outvoted(ceph):
    """Votes are weighted by how well each landmark's neighbourhood matched: an atlas of noise with the same
    landmark positions must not pull the answer (a plain average would move it by tens of pixels)."""
    case = ceph.case(0)
    target = warped_copy(case, seed=1)
    noise = np.random.default_rng(0).integers(0, 256, case.image.shape, dtype=np.uint8)
    decoy = Case(noise, case.spacing, case.landmarks, name="noise")
    alone = AtlasDetector([case]).detect(target)
    both = AtlasDetector([case, decoy]).detect(target)
    err = np.linalg.norm(both.points - target.landmarks.points, axis=1)
    assert np.median(err) < 1.0 and np.percentile(err, 90) < 2.0, err
    assert np.median(np.linalg.norm(both.points - alone.points, axis=1)) < 0.5


@pytest.mark.slow
def test_one_atlas_on_the_identical_image_returns_its_points(ceph):
    case = ceph.case(1)
    found = AtlasDetector([case]).detect(case)
    ok = case.landmarks.present
    assert (found.present == ok).all()
    err = np.linalg.norm(found.points[ok] - case.landmarks.points[ok], axis=1)
    assert np.median(err) < 0.5 and err.max() < 2.0, err  # stochastic MI sampling: sub-pixel, not exact


@pytest.mark.slow
def test_local_windows_keep_their_size_on_finely_sampled_atlases(ceph):
    """A 2.5x finer radiograph gets 2.5x the local steps (same anatomy per window) and its own points back."""
    case = ceph.case(1)
    fine = cv2.resize(case.image, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_CUBIC)
    lm = case.landmarks
    big = Case(fine, case.spacing[0] / 2.5, Landmarks(lm.names, (lm.points + 0.5) * 2.5 - 0.5, present=lm.present))
    detector = AtlasDetector([big])
    scale = max(fine.shape) / detector.settings.local.level_side
    assert [step for step, _ in detector.levels] == pytest.approx([s * scale for s, _ in detector.settings.local.levels])
    found = detector.detect(big)
    err = np.linalg.norm(found.points[lm.present] - big.landmarks.points[lm.present], axis=1)
    assert np.median(err) < 1.0 and err.max() < 5.0, err


def test_refused_atlases(ceph):
    a, b = ceph.case(0), ceph.case(1)
    b.landmarks = b.landmarks.subset(ceph.names[:-1])
    with pytest.raises(InputError, match="same set"):
        AtlasDetector([a, b])
    with pytest.raises(InputError, match="empty"):
        AtlasDetector([])
    bare = Case(a.image, a.spacing, name="bare")
    with pytest.raises(InputError, match="bare has no landmarks"):
        AtlasDetector([bare])


@pytest.mark.slow
@pytest.mark.parametrize("data", ["hand_dha", "ceph_hamedan"])
def test_the_atlas_alone_keeps_its_bspline_stage_where_its_cases_show_it_better(data_dir, data):
    """Detect with the atlas of three real cases (no fine-tune): on the first detection each case is detected by
    the other two with and without the B-spline stage; kept on hands, not on cephalograms, and the detection and
    its calibration then use the chosen stage."""
    ds = Dataset(data_dir / data / "landmarks.csv")
    detector = load_detector(atlas=[ds.case(i) for i in range(3)])
    messages = []
    found = detector.detect(ds.case(60), progress=lambda p: messages.append(p.message))
    stage, kept = detector.stage, data == "hand_dha"
    assert stage["bspline"] is kept and stage["cases"] == min(3, STAGE_TRIAL_CASES)
    assert (stage["bspline_mm"] <= BSPLINE_GAIN * stage["affine_mm"]) is kept
    assert detector.settings.deformable is kept
    assert sum(m.startswith("trying the B-spline stage on the cases") for m in messages) == 3
    assert found.present.all() and ((found.confidence > 0) & (found.confidence < 1)).all()
    assert load_detector(atlas=[ds.case(i) for i in range(3)]) is detector, "the same cases: the same atlas"
    assert load_detector(atlas=[ds.case(i) for i in range(3)], atlas_deformable=False).stage is None


def test_an_atlas_is_kept_for_the_same_cases_and_made_again_for_changed_ones():
    """The last atlas stays loaded while its cases are the same by content (its calibration is measured once); a
    moved point, another image or another stage makes a new one."""
    cases = [api.phantom_case(seed) for seed in range(3)]
    detector = load_detector(atlas=cases)
    assert load_detector(atlas=[api.phantom_case(seed) for seed in range(3)]) is detector
    moved = cases[1].landmarks.points.copy()
    moved[0] += 0.5
    changed = [cases[0], Case(cases[1].image, cases[1].spacing, Landmarks(cases[1].landmarks.names, moved),
                              name=cases[1].name), cases[2]]
    other = load_detector(atlas=changed)
    assert other is not detector and load_detector(atlas=changed) is other
    assert load_detector(atlas=[cases[0], api.phantom_case(7), cases[2]]) is not other
    forced = load_detector(atlas=cases, atlas_deformable=True)
    assert forced.settings.deformable and forced.stage is None and load_detector(atlas=cases) is not forced


@pytest.mark.slow
def test_atlas_from_markups_folder_and_cli(tmp_path, ceph, capsys):
    folder = tmp_path / "atlas"
    folder.mkdir()
    for i in (0, 1):
        case = ceph.case(i)
        sitk.WriteImage(sitk.GetImageFromArray(case.image), str(folder / f"{case.name}.png"))
        write_markups(folder / f"{case.name}.mrk.json", case.landmarks, Case(case.image, 1.0))
    detector = load_detector(atlas=folder, atlas_deformable=True)
    assert detector.names == ceph.names and len(detector.atlases) == 2 and detector.settings.deformable
    image = ceph.root / ceph.rows[60].image
    assert main(["detect", "--atlas", str(ceph.path), "--atlas-cases", "001,002", "--atlas-deformable", str(image),
                 "--out", str(tmp_path / "out"), "--spacing", "0.254"]) == 0
    doc = json.loads((tmp_path / "out" / "061.mrk.json").read_text())
    assert [p["label"] for p in doc["markups"][0]["controlPoints"]] == ceph.names


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_phantom(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--cases", "2"]) == 0
    out = capsys.readouterr().out
    assert "MRE" in out
    mre = float(out.split("MRE ")[1].split(" mm")[0])
    assert mre < 2.0
    assert (tmp_path / "overlay.png").is_file() and len(list(tmp_path.glob("*.mrk.json"))) == 2
