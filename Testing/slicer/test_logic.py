"""MedSapiensLogic on a real MRML scene (slicer-core): exact geometry through flipped and oblique volumes and slice
planes, new markups nodes, training cases from markups, and detect / fine-tune on a real radiograph."""
import math

import numpy as np
import pytest
import vtk
from medsapiens import InputError, Landmarks
from medsapiens.detectors.factory import load_detector
from medsapiens.io.images import read_image
from medsapiens.io.markups import write_markups
from MedSapiensSlicerLib.logic import MedSapiensLogic
from vtk.util.numpy_support import numpy_to_vtk


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def vtk_matrix(m):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, m[r, c])
    return out


# IJK -> RAS of the test volumes: near-identity, LPS (as DICOM), LAS, and oblique with anisotropic voxels
GEOMETRIES = {
    "RAS": (np.eye(3), (1.0, 1.0, 1.0)),
    "LPS": (np.diag([-1.0, -1.0, 1.0]), (0.9, 0.9, 1.1)),
    "LAS": (np.diag([-1.0, 1.0, 1.0]), (1.0, 0.8, 1.2)),
    "oblique": (rotation([1, 2, 3], 35), (0.8, 1.0, 1.2)),
}
SPHERES = np.array([[-8.0, 6.0, 3.0], [7.0, -5.0, 3.0], [2.0, 9.0, 3.0]])  # RAS mm, on the plane z = 3


def add_volume(scene, directions, spacing, spheres=SPHERES, dims=(48, 48, 48), name="vol"):
    """A volume whose voxels hold Gaussian blobs (sigma 1.6 mm) centred on `spheres` (RAS), evaluated in RAS."""
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag(spacing)
    centre_ijk = (np.array(dims) - 1) / 2
    ijk_to_ras[:3, 3] = -ijk_to_ras[:3, :3] @ centre_ijk + [1.0, -2.0, 3.0]  # volume centre at (1, -2, 3)
    k, j, i = np.meshgrid(*(np.arange(d) for d in dims[::-1]), indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ ijk_to_ras.T
    values = np.zeros(k.shape)
    for s in spheres:
        values += 1000 * np.exp(-((ras[..., :3] - s) ** 2).sum(-1) / (2 * 1.6 ** 2))
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.GetPointData().SetScalars(numpy_to_vtk(values.astype(np.float32).ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    return node, ijk_to_ras


def slice_node(scene, normal, transverse, centre, fov=(120.0, 100.0)):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    node.SetLayoutName("Red")
    node.SetFieldOfView(fov[0], fov[1], 1.0)
    node.SetSliceToRASByNTP(*normal, *transverse, *centre, 0)
    node.UpdateMatrices()
    return node


def find_blobs(image, n):
    """The n brightest local maxima, refined by the intensity centroid of a 5 x 5 patch."""
    img = image.astype(float).copy()
    found = []
    for _ in range(n):
        y, x = np.unravel_index(int(img.argmax()), img.shape)
        ys, xs = np.mgrid[y - 2:y + 3, x - 2:x + 3]
        w = image[y - 2:y + 3, x - 2:x + 3].astype(float)
        w = w - w.min()
        found.append([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
        img[max(0, y - 6):y + 7, max(0, x - 6):x + 7] = -np.inf
    return np.array(found)


IN_PLANE = np.array([[-8.0, 6.0], [7.0, -5.0], [2.0, 9.0]])  # sphere offsets (mm) along the view's x and y axes


def view_plane(scene, plane, centre):
    """A slice node: Slicer's axial / sagittal / coronal presets, tilted, or seen from below and turned."""
    if plane in ("Axial", "Sagittal", "Coronal"):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
        node.SetFieldOfView(120, 100, 1)
        node.SetOrientation(plane)
        node.JumpSliceByCentering(*centre)
        node.UpdateMatrices()
        return node
    if plane == "oblique":  # tilted 25 degrees about an in-plane diagonal
        tilt = rotation([1, 1, 0], 25)
        return slice_node(scene, tilt @ [0, 0, 1], tilt @ [1, 0, 0], centre)
    return slice_node(scene, [0, 0, -1.0], [0.6, -0.8, 0], centre)  # "flipped": image axes run against RAS


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("plane", ["Axial", "Sagittal", "Coronal", "oblique", "flipped"])
def test_spheres_come_back_at_their_ras_positions(scene, geometry, plane):
    """Blobs at known RAS -> caseFromSlice -> found in the image -> writeLandmarks: within half a voxel."""
    directions, spacing = GEOMETRIES[geometry]
    node = view_plane(scene, plane, SPHERES.mean(axis=0))
    m = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(3)])
    truth = m[:, 3] + IN_PLANE @ m[:, :2].T  # the spheres, on the viewed plane
    volume, _ = add_volume(scene, directions, spacing, truth)
    logic = MedSapiensLogic(scene)
    case, geo = logic.caseFromSlice(node, volume)
    assert case.image.ndim == 2 and case.image.dtype == np.float32
    assert np.allclose(geo.spacing, min(spacing), rtol=1e-6)
    pixels = find_blobs(case.image, 3)
    out = logic.writeLandmarks(Landmarks(["a", "b", "c"], pixels), geo, "found")
    ras = np.array([out.GetNthControlPointPositionWorld(i) for i in range(3)])
    distance = np.linalg.norm(ras[:, None] - truth[None], axis=-1)
    assert distance.min(axis=0).max() < 0.5 * min(spacing), distance.min(axis=0)
    # as on screen: the sphere right of another in the view is right of it in the image, and row 0 is the top
    order_x = np.argsort(IN_PLANE[:, 0])
    found_x = np.argsort([pixels[np.argmin(np.linalg.norm(ras - t, axis=1)), 0] for t in truth])
    assert (order_x == found_x).all()
    # pixel -> RAS -> pixel round trip, and the Case's own LPS matrix agrees with RAS
    back, off = geo.to_pixel(ras)
    assert np.allclose(back, pixels, atol=1e-9) and np.allclose(off, 0, atol=1e-9)
    assert np.allclose(case.to_lps(pixels) * [-1, -1, 1], ras, atol=1e-9)


@pytest.mark.parametrize("orientation", ["Sagittal", "Coronal"])
def test_standard_views_show_the_image_as_on_screen(scene, orientation):
    """Row 0 is the top of the view: the view's up direction (SliceToRAS y) points to smaller rows."""
    directions, spacing = GEOMETRIES["oblique"]
    volume, _ = add_volume(scene, directions, spacing)
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Yellow")
    node.SetFieldOfView(80, 60, 1)
    node.SetOrientation(orientation)
    node.UpdateMatrices()
    case, geo = MedSapiensLogic(scene).caseFromSlice(node, volume)
    up = np.array([node.GetSliceToRAS().GetElement(r, 1) for r in range(3)])
    right = np.array([node.GetSliceToRAS().GetElement(r, 0) for r in range(3)])
    step_down = geo.to_ras([[0, 1]]) - geo.to_ras([[0, 0]])
    step_right = geo.to_ras([[1, 0]]) - geo.to_ras([[0, 0]])
    assert np.dot(step_down[0], up) < 0 and np.dot(step_right[0], right) > 0
    assert case.size[0] <= 80 / min(spacing) + 1 and case.size[1] <= 60 / min(spacing) + 1


def test_training_case_projects_markups_and_drops_off_plane_points(scene, tmp_path):
    directions, spacing = GEOMETRIES["LPS"]
    volume, _ = add_volume(scene, directions, spacing)
    node = slice_node(scene, [0, 0, 1], [1, 0, 0], SPHERES.mean(axis=0))
    logic = MedSapiensLogic(scene)
    marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "user")
    for i, p in enumerate(SPHERES):
        marks.AddControlPoint(vtk.vtkVector3d(*p), f"P{i}")
    marks.AddControlPoint(vtk.vtkVector3d(0, 0, 3 + 0.6 * spacing[2]), "off")   # more than half a slice off
    marks.AddControlPoint(vtk.vtkVector3d(0, 0, 3 + 0.4 * spacing[2]), "near")  # within half a slice
    marks.AddControlPoint(vtk.vtkVector3d(0, 0, 3), "gone")
    marks.SetNthControlPointPositionMissing(5)
    case = logic.trainingCase(volume, marks, node)
    assert case.landmarks.names == ["P0", "P1", "P2", "off", "near", "gone"]
    assert case.landmarks.present.tolist() == [True, True, True, False, True, False]
    _, geo = logic.caseFromSlice(node, volume)
    assert np.allclose(geo.to_ras(case.landmarks.points[:3]), SPHERES, atol=1e-9)
    # the training case written as .mrk.json by the engine and read back by Slicer: same RAS
    path = write_markups(tmp_path / "case.mrk.json", case.landmarks, case)
    loaded = scene.GetNodeByID(scene.logics["Markups"].LoadMarkups(str(path)))
    ras = np.array([loaded.GetNthControlPointPositionWorld(i) for i in range(3)])
    assert np.allclose(ras, SPHERES, atol=1e-3)
    assert loaded.GetNthControlPointPositionStatus(3) == loaded.PositionMissing
    with pytest.raises(InputError, match="none of its points"):
        far = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "far")
        far.AddControlPoint(vtk.vtkVector3d(0, 0, 30), "A")
        logic.trainingCase(volume, far, node)
    with pytest.raises(InputError, match="3D volume"):
        logic.trainingCase(volume, marks)


@pytest.fixture
def radiograph(scene, ceph, tmp_path):
    """Cephalogram 001 as a 2D NRRD with its real pixel spacing, loaded by Slicer's own volume reader."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ceph.root / ceph.rows[0].image))
    image.SetSpacing((ceph.rows[0].spacing,) * 2)
    path = tmp_path / "ceph001.nrrd"
    sitk.WriteImage(image, str(path))
    node = scene.logics["Volumes"].AddArchetypeVolume(str(path), "ceph001")
    assert node is not None and node.GetImageData() is not None
    return node, path


def test_detect_on_a_loaded_radiograph_writes_a_new_node(scene, radiograph, fitted_file, ceph):
    volume, path = radiograph
    user = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    user.AddControlPoint(vtk.vtkVector3d(1, 2, 0), "S")
    detector = load_detector(fitted_file, device="cpu")
    logic = MedSapiensLogic(scene)
    node = logic.detect(volume, detector)
    node2 = logic.detect(volume, detector)
    assert node.GetID() != user.GetID() and node2.GetID() != node.GetID() and node.GetName() != node2.GetName()
    assert user.GetNumberOfControlPoints() == 1 and user.GetNthControlPointLabel(0) == "S"
    assert np.allclose(user.GetNthControlPointPositionWorld(0), [1, 2, 0])
    # the same pixels as the engine finds on the file, at the RAS where Slicer shows that pixel
    engine = detector.detect(read_image(path))
    ras = np.array([node.GetNthControlPointPositionWorld(i) for i in range(19)])
    sx, sy, _ = volume.GetSpacing()
    assert np.allclose(ras[:, :2], -engine.points * [sx, sy], atol=1e-3) and np.allclose(ras[:, 2], 0)
    assert [node.GetNthControlPointLabel(i) for i in range(19)] == ceph.names
    for i in range(19):
        confidence = float(node.GetNthControlPointDescription(i).split()[1])
        assert confidence == pytest.approx(engine.confidence[i], abs=1e-3)
        assert bool(node.GetNthControlPointLocked(i)) == (confidence >= 0.5)
    # near the truth: the model was fitted on this image
    truth = ceph.rows[0].landmarks.points
    assert np.median(np.linalg.norm(-ras[:, :2] / sx - truth, axis=1)) < 10


def test_low_confidence_and_missing_points_are_marked(scene, radiograph):
    volume, _ = radiograph
    logic = MedSapiensLogic(scene)
    _, geo = logic.caseFromVolume2D(volume)
    marks = Landmarks(["a", "b", "c"], [[10, 20], [30, 40], [np.nan, np.nan]], [0.9, 0.2, 0.0],
                      [True, True, False])
    node = logic.writeLandmarks(marks, geo)
    assert [node.GetNthControlPointLocked(i) for i in range(3)] == [1, 0, 0]
    assert [node.GetNthControlPointSelected(i) for i in range(3)] == [1, 0, 0]
    assert node.GetNthControlPointPositionStatus(2) == node.PositionMissing
    assert node.GetNthControlPointDescription(1) == "confidence 0.200"


def test_short_finetune_through_the_logic(scene, radiograph, fitted_file, ceph, tmp_path):
    volume, _ = radiograph
    truth = ceph.rows[0].landmarks
    sx = ceph.rows[0].spacing
    marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "annotated")
    for name, (x, y) in zip(truth.names[:5], truth.points[:5]):
        marks.AddControlPoint(vtk.vtkVector3d(-x * sx, -y * sx, 0), name)  # a 2D image in Slicer: LPS (x sx, y sy)
    logic = MedSapiensLogic(scene)
    case = logic.trainingCase(volume, marks)
    assert np.allclose(case.landmarks.points, truth.points[:5], atol=1e-9)
    seen = []
    out = logic.finetune([case], fitted_file, tmp_path / "a.safetensors", progress=seen.append, steps=3,
                         time_budget=None, views_per_case=2, lora_blocks=1, device="cpu")
    assert seen[-1].step == 3
    detector = load_detector(fitted_file, adapter=out, device="cpu")
    assert detector.names == truth.names[:5]
    node = logic.detect(volume, detector)
    assert node.GetNumberOfControlPoints() == 5


def test_clear_errors(scene):
    logic = MedSapiensLogic(scene)
    with pytest.raises(InputError, match="no input volume"):
        logic.caseFor(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty: holds no image data"):
        logic.caseFor(empty)
    directions, spacing = GEOMETRIES["RAS"]
    volume, _ = add_volume(scene, directions, spacing)
    away = slice_node(scene, [0, 0, 1], [1, 0, 0], [0, 0, 500])
    with pytest.raises(InputError, match="does not cross"):
        logic.caseFromSlice(away, volume)
