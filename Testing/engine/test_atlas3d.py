"""The 3D atlas detector on real micro-CT volumes (halved to 0.28 mm for speed): orientation, geometry, I/O, CLI."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from medsapiens import InputError, Landmarks, Volume, load_detector
from medsapiens.cli import main
from medsapiens.detectors.atlas3d import Atlas3DDetector, index_to_lps
from medsapiens.io.datasets import Dataset, load_cases, volume_landmarks_csv
from medsapiens.io.images import read_volume
from medsapiens.io.markups import read_markups, write_markups

KEPT = 12  # landmarks used here (every fourth of the 45): the local stage's cost grows with them


def halved(ds: Dataset, i: int) -> Volume:
    """Volume i of the set at half resolution (2 x 2 x 2 voxels averaged; geometry kept exact by ITK), with a
    subset of its landmarks."""
    image = sitk.BinShrink(sitk.ReadImage(str(ds.root / ds.rows[i].image)), [2, 2, 2])
    lm = ds.rows[i].landmarks.subset(ds.names[::4][:KEPT])
    return Volume(sitk.GetArrayFromImage(image), index_to_lps(image), lm, name=ds.rows[i].id)


def to_image(volume: Volume) -> sitk.Image:
    """A SimpleITK image of the volume with its geometry (to write it in any format)."""
    image = sitk.GetImageFromArray(volume.voxels)
    image.SetSpacing(volume.spacing.tolist())
    image.SetDirection((volume.index_to_lps[:3, :3] / volume.spacing).ravel().tolist())
    image.SetOrigin(volume.index_to_lps[:3, 3].tolist())
    return image


def relaid(volume: Volume, rotation_voxels: np.ndarray) -> Volume:
    """The same physical volume with its voxels laid out differently: index' = R index + offset (R a signed
    permutation) and the direction compensating, so every voxel keeps its LPS position."""
    r = rotation_voxels
    shape_xyz = np.array(volume.size)
    offset = np.where(r.sum(axis=1) < 0, np.abs(r) @ (shape_xyz - 1), 0)  # flipped axes count from the far end
    new_to_old = np.linalg.inv(np.block([[r, offset[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]))
    new_shape = np.abs(r) @ shape_xyz
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape[::-1]], indexing="ij"), -1)
    old = np.rint(zyx[..., ::-1] @ new_to_old[:3, :3].T + new_to_old[:3, 3]).astype(int)
    voxels = volume.voxels[old[..., 2], old[..., 1], old[..., 0]]
    return Volume(voxels, volume.index_to_lps @ new_to_old, volume.landmarks, name=volume.name + "_relaid")


def rotated(volume: Volume, axis: int, quarter_turns: int) -> Volume:
    """The skull physically turned by 90 degrees x quarter_turns about an LPS axis through its centre (the voxels
    turned, the geometry kept); its landmarks turned with it."""
    axes = [(1, 0), (2, 0), (2, 1)][axis]  # numpy axes (z, y, x) of the plane turned about x, y or z
    voxels = np.rot90(volume.voxels, quarter_turns, axes=axes).copy()
    turned = Volume(voxels, volume.index_to_lps, name=f"{volume.name}_rot{axis}_{quarter_turns}")
    # where each landmark's voxel went: track its continuous index through the same np.rot90
    index = volume.to_index(volume.landmarks.points)  # (x, y, z)
    zyx = index[:, ::-1].copy()
    shape = np.array(volume.voxels.shape)
    a, b = axes
    for _ in range(quarter_turns % 4):  # np.rot90 on axes (a, b): new[a] = n_b - 1 - old[b], new[b] = old[a]
        zyx[:, a], zyx[:, b] = shape[b] - 1 - zyx[:, b], zyx[:, a].copy()
        shape[a], shape[b] = shape[b], shape[a]
    turned.landmarks = Landmarks(volume.landmarks.names, turned.to_lps(zyx[:, ::-1]), present=volume.landmarks.present)
    return turned


def mre(found: Landmarks, truth: Landmarks) -> float:
    ok = truth.present & found.present
    return float(np.linalg.norm(found.points[ok] - truth.points[ok], axis=1).mean())


@pytest.fixture(scope="module")
def atlas(mouse):
    return Atlas3DDetector([halved(mouse, 0)])


@pytest.fixture(scope="module")
def target(mouse):
    return halved(mouse, 2)


def test_relaid_and_rotated_volumes_keep_their_physical_landmarks(target):
    """The test helpers themselves: a relaid volume is the same physical image; a turned one moves its points."""
    flip = relaid(target, np.diag([-1, 1, 1]))
    assert np.allclose(flip.to_lps([[0, 0, 0]]), target.to_lps([[target.size[0] - 1, 0, 0]]))
    assert flip.voxels[0, 0, 0] == target.voxels[0, 0, -1]
    turned = rotated(target, 2, 1)
    i = np.rint(turned.to_index(turned.landmarks.points[:1])).astype(int)[0]
    j = np.rint(target.to_index(target.landmarks.points[:1])).astype(int)[0]
    assert turned.voxels[i[2], i[1], i[0]] == target.voxels[j[2], j[1], j[0]]


@pytest.mark.parametrize("axis,turns", [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)],
                         ids=["x90", "y90", "z90", "x180", "y180", "z180"])
@pytest.mark.slow
def test_a_turned_skull_still_gets_its_landmarks_from_another_specimen(atlas, target, axis, turns):
    volume = rotated(target, axis, turns)
    found = atlas.detect(volume)
    assert found.present.all()
    assert mre(found, volume.landmarks) < 0.8, mre(found, volume.landmarks)  # a wrong orientation is > 5 mm


@pytest.fixture(scope="module")
def answer(atlas, target):
    """The atlas's landmarks on the target as it lies on disk."""
    return atlas.detect(target)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flipped x", "axes permuted and flipped"])
def test_the_voxel_layout_does_not_change_the_physical_answer(atlas, target, answer, layout):
    r = np.diag([-1, 1, 1]) if layout == "flipped x" else np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])
    base = answer
    other = atlas.detect(relaid(target, r))
    assert np.abs(np.linalg.det(relaid(target, r).index_to_lps[:3, :3])) == pytest.approx(np.prod(target.spacing))
    shift = np.linalg.norm(other.points - base.points, axis=1)
    assert shift.max() < 0.1, shift


@pytest.mark.slow
def test_an_oblique_grid_resampled_in_physical_space_gives_the_same_landmarks(atlas, target, answer):
    """The same volume resampled (B-spline) onto a grid turned by 30 degrees about an oblique axis, at 0.7 of its
    spacing (on a grid as coarse as its own, the resampling itself would blur it)."""
    image = sitk.Cast(to_image(target), sitk.sitkFloat32)
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14)
    turn = sitk.VersorTransform(axis.tolist(), np.deg2rad(30.0)).GetMatrix()
    direction = (np.array(turn).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3))
    centre = target.to_lps(np.array(target.size)[None] / 2 - 0.5)[0]
    spacing = 0.7 * target.spacing
    size = [int(1.3 * max(target.size) / 0.7)] * 3
    origin = centre - direction @ ((np.array(size) / 2 - 0.5) * spacing)
    grid = sitk.Resample(image, size, sitk.Transform(), sitk.sitkBSpline, origin.tolist(), spacing.tolist(),
                         direction.ravel().tolist(), 0.0)
    oblique = Volume(sitk.GetArrayFromImage(grid), index_to_lps(grid), target.landmarks, name="oblique")
    base, other = answer, atlas.detect(oblique)
    shift = np.linalg.norm(other.points - base.points, axis=1)
    assert shift.max() < 0.1, shift
    assert mre(other, target.landmarks) < 0.8


def test_volumes_read_from_nifti_nrrd_mha_and_a_dicom_series_agree(tmp_path, mouse):
    image = sitk.BinShrink(sitk.ReadImage(str(mouse.root / mouse.rows[3].image)), [2, 2, 2])
    image.SetDirection([0, 1, 0, -1, 0, 0, 0, 0, 1])  # an oblique-enough layout to tell formats apart
    reference = Volume(sitk.GetArrayFromImage(image), index_to_lps(image))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"v{suffix}"))
        v = read_volume(tmp_path / f"v{suffix}")
        assert v.name == "v" and np.allclose(v.index_to_lps, reference.index_to_lps, atol=1e-4)
        assert (v.voxels == reference.voxels).all()
    series = tmp_path / "series"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        plane = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        lps = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.2"),
                           ("0020|0037", "\\".join(f"{v:g}" for v in direction[0:7:3] + direction[1:8:3])),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in lps)), ("0020|0013", str(k))]:
            plane.SetMetaData(tag, value)
        plane.SetSpacing(image.GetSpacing()[:2])
        writer.SetFileName(str(series / f"{k:03d}.dcm"))
        writer.Execute(plane)
    v = read_volume(series)
    assert v.name == "series" and v.size == reference.size
    assert np.allclose(v.index_to_lps, reference.index_to_lps, atol=1e-3)
    assert (v.voxels == reference.voxels).all()


@pytest.mark.slow
def test_bad_volumes_and_markups_give_one_line_errors(tmp_path, mouse, capsys):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a gzip stream")
    with pytest.raises(InputError, match="corrupt.nii.gz: not a readable image"):
        read_volume(corrupt)
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkUInt8), str(empty))
    with pytest.raises(InputError, match="empty.nii.gz: the volume is empty"):
        read_volume(empty)
    flat = tmp_path / "flat.png"
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkUInt8) + 3, str(flat))
    with pytest.raises(InputError, match="flat.png: a 2D image"):
        read_volume(flat)
    # an atlas folder whose second .mrk.json has another landmark count
    folder = tmp_path / "atlas"
    folder.mkdir()
    for i, kept in ((0, 12), (1, 11)):
        v = halved(mouse, i)
        v.landmarks = v.landmarks.subset(v.landmarks.names[:kept])
        sitk.WriteImage(sitk.GetImageFromArray(v.voxels), str(folder / f"{v.name}.nii.gz"))
        write_markups(folder / f"{v.name}.mrk.json", v.landmarks, v)
    with pytest.raises(InputError, match="all atlases need the same set"):
        load_detector(atlas=folder)
    out = tmp_path / "out"
    atlas = ["--atlas", str(mouse.path), "--atlas-cases", mouse.rows[0].id]
    for argv, status, problems in ((["detect", "--atlas", str(folder), str(corrupt)], 2, ["same set"]),
                                   (["detect", *atlas, str(corrupt), str(empty)], 1, ["not a readable", "is empty"]),
                                   (["detect", *atlas, str(flat)], 1, ["a 2D image"])):
        capsys.readouterr()
        assert main(argv + ["--out", str(out)]) == status
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == len(problems) and "Traceback" not in err, err
        for line, problem in zip(lines, problems):
            assert line.startswith("medsapiens: error: ") and problem in line, line


def test_2d_and_3d_cannot_be_mixed(tmp_path, mouse, ceph, capsys):
    assert main(["evaluate", "--atlas", str(mouse.path), "--atlas-cases", mouse.rows[0].id, "--data", str(ceph.path),
                 "--out", str(tmp_path)]) == 2
    assert "a set of 2D images, but the detector works on 3D volumes" in capsys.readouterr().err
    assert main(["detect", "--atlas", str(ceph.path), "--atlas-cases", "001", str(mouse.root / mouse.rows[1].image),
                 "--out", str(tmp_path)]) == 1
    assert "a 3D volume" in capsys.readouterr().err
    for base in ([], ["--base", "micro"]):  # fine-tuning is for 2D images; volumes need no training
        assert main(["finetune", *base, "--data", str(mouse.path), "--cases", f"{mouse.rows[0].id},{mouse.rows[1].id}",
                     "--out", str(tmp_path / "a.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "fine-tuning learns from 2D images" in err, err
    assert not (tmp_path / "a.safetensors").exists()


def atlas_folder(tmp_path, mouse) -> tuple:
    """A folder holding one atlas case as a volume + .mrk.json pair (volume 0 of the set, halved)."""
    folder = tmp_path / "atlas"
    folder.mkdir()
    a = halved(mouse, 0)
    sitk.WriteImage(to_image(a), str(folder / f"{a.name}.nii.gz"))
    write_markups(folder / f"{a.name}.mrk.json", a.landmarks, a)
    return folder, a


@pytest.mark.slow
def test_cli_detects_on_volumes_and_writes_markups_and_csv(tmp_path, mouse, capsys):
    folder, a = atlas_folder(tmp_path, mouse)
    t = halved(mouse, 4)
    volume_path = tmp_path / f"{t.name}.nrrd"
    sitk.WriteImage(to_image(t), str(volume_path))
    out = tmp_path / "out"
    assert main(["detect", "--atlas", str(folder), str(volume_path), "--out", str(out)]) == 0
    names, lps, confidence, present, _ = read_markups(out / f"{t.name}.mrk.json")
    assert names == t.landmarks.names and present.all() and ((confidence > 0) & (confidence <= 1)).all()
    assert json.loads((out / f"{t.name}.mrk.json").read_text())["markups"][0]["coordinateSystem"] == "LPS"
    assert np.linalg.norm(lps - t.landmarks.points, axis=1).mean() < 0.8
    written = Dataset(out / "landmarks.csv")
    assert written.dim == 3 and written.names == names and written.ids() == [t.name]
    assert np.allclose(written.rows[0].landmarks.points, lps, atol=1e-3)
    again = written.case(0)  # the CSV's image path leads back to the volume
    assert again.size == t.size
    # the atlas folder itself reads as 3D cases
    (case,) = load_cases(folder)
    assert isinstance(case, Volume) and np.allclose(case.landmarks.points, a.landmarks.points, atol=1e-4)


@pytest.mark.slow
def test_cli_evaluates_a_volume_atlas_on_a_3d_set(tmp_path, mouse, capsys):
    folder, _ = atlas_folder(tmp_path, mouse)
    t = halved(mouse, 5)
    sitk.WriteImage(to_image(t), str(tmp_path / f"{t.name}.mha"))
    (tmp_path / "landmarks.csv").write_text(volume_landmarks_csv([(f"{t.name}.mha", t.landmarks)]))
    report = tmp_path / "report"
    assert main(["evaluate", "--atlas", str(folder), "--data", str(tmp_path / "landmarks.csv"), "--out",
                 str(report)]) == 0
    doc = json.loads((report / "report.json").read_text())
    assert doc["images"] == [t.name] and list(doc["summary"]["sdr"]) == ["0.5", "1.0", "2.0"]
    assert doc["summary"]["mre_mm"] < 0.8 and doc["summary"]["scored"] == KEPT
    assert [row["name"] for row in doc["per_landmark"]] == t.landmarks.names
    assert all((report / f).stat().st_size > 0 for f in ("per_landmark.png", "sdr_curve.png", "worst_cases.png"))
