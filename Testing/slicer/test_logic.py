"""MedSapiensLogic on a real MRML scene (slicer-core): exact geometry through flipped and oblique volumes, slice
planes and parent transforms, new markups nodes, annotated cases that keep their own geometry, and detection on a
real radiograph in the engine worker."""
import math

import numpy as np
import pytest
import vtk
from medsapiens import InputError, Landmarks
from medsapiens import load_detector
from medsapiens.io.images import read_image
from medsapiens.io.markups import write_markups
from slicer.util import vtkMatrixFromArray
from MedSapiensSlicerLib.logic import WHOLE_IMAGE, MedSapiensLogic
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


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
    node.SetIJKToRASMatrix(vtkMatrixFromArray(ijk_to_ras))
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
    logic.addCase(volume, marks, node)
    case, = logic.trainingCases()
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
        logic.addCase(volume, far, node)
    with pytest.raises(InputError, match="3D volume"):
        logic.addCase(volume, marks)
    assert len(logic.cases) == 1, "refused cases are not added"


def test_cases_on_two_slices_of_one_volume_keep_their_own_images(scene):
    """Two cases on two axial slices of one volume: each keeps the image and plane of its own "Add case", even
    after the view moved on; points are projected onto each case's own plane."""
    blobs = np.vstack([SPHERES, SPHERES[:1] * [1, 1, 0] + [0, 0, -6.0]])  # three at S = 3, one at S = -6
    volume, _ = add_volume(scene, *GEOMETRIES["RAS"], blobs)
    view = slice_node(scene, [0, 0, 1], [1, 0, 0], [1.0, -2.0, 3.0])
    marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    for i, p in enumerate(blobs):
        marks.AddControlPoint(vtk.vtkVector3d(*p), f"P{i}")
    logic = MedSapiensLogic(scene)
    seen = []
    logic.onCasesChanged = lambda: seen.append(len(logic.cases))
    logic.addCase(volume, marks, view)
    view.SetSliceOffset(-6.0)
    logic.addCase(volume, marks, view)
    view.SetSliceOffset(20.0)  # the view moves on; the cases do not
    upper, lower = logic.trainingCases()
    assert seen == [1, 2]
    assert upper.landmarks.present.tolist() == [True, True, True, False]
    assert lower.landmarks.present.tolist() == [False, False, False, True]
    assert np.allclose(upper.to_lps(upper.landmarks.points[:3]) * [-1, -1, 1], SPHERES, atol=1e-9)
    assert np.allclose(lower.to_lps(lower.landmarks.points[3:]) * [-1, -1, 1], blobs[3:], atol=1e-9)
    # the pixels are those of each slice: the blobs of that slice are bright there, the others are not
    for case, on_plane in ((upper, [0, 1, 2]), (lower, [3])):
        x, y = np.round(case.landmarks.points[on_plane]).astype(int).T
        assert (case.image[y, x] > 800).all()
    assert not np.allclose(upper.image, lower.image)
    assert [r.plane for r in logic.cases] == ["Red slice at R 1.0, A -2.0, S 3.0", "Red slice at R 1.0, A -2.0, S -6.0"]


def test_cases_whose_nodes_are_deleted_leave_the_table(scene, radiograph):
    volume, _ = radiograph
    logic = MedSapiensLogic(scene)
    rows = []
    for name in ("a", "b"):
        marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        marks.AddControlPoint(vtk.vtkVector3d(-10, -20, 0), "S")
        rows.append(logic.addCase(volume, marks))
    assert rows[0].plane == WHOLE_IMAGE
    seen = []
    logic.onCasesChanged = lambda: seen.append([r.markupsID for r in logic.cases])
    scene.RemoveNode(scene.GetNodeByID(rows[0].markupsID))
    assert seen == [[rows[1].markupsID]]
    scene.RemoveNode(volume)
    assert logic.cases == [] and seen[-1] == []


def test_the_captured_image_is_a_copy_of_the_voxels(scene, radiograph):
    volume, _ = radiograph
    logic = MedSapiensLogic(scene)
    case, _ = logic.caseFromVolume2D(volume)
    before = case.image.copy()
    voxels = vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars())
    assert not np.shares_memory(case.image, voxels)
    voxels[:] = 0  # the user edits the volume while the engine works
    assert np.array_equal(case.image, before)


def parent_transform(scene, node, degrees=30.0, axis=(1, 2, 3), shift=(12.0, -7.0, 4.0)):
    """Put `node` under a linear transform (rotation + translation); returns its 4 x 4 matrix."""
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rotation(axis, degrees), shift
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    transform.SetMatrixTransformToParent(vtkMatrixFromArray(m))
    node.SetAndObserveTransformNodeID(transform.GetID())
    return m


def test_a_volume_under_a_parent_transform(scene):
    """Blobs of a volume moved by a rotation + translation are found where the scene shows them (<= 0.3 mm)."""
    directions, spacing = GEOMETRIES["LPS"]
    volume, _ = add_volume(scene, directions, spacing)
    m = parent_transform(scene, volume)
    shown = SPHERES @ m[:3, :3].T + m[:3, 3]  # where the blobs are in the scene (world RAS)
    normal, transverse = m[:3, :3] @ [0, 0, 1], m[:3, :3] @ [1, 0, 0]
    view = slice_node(scene, normal, transverse, shown.mean(axis=0))
    logic = MedSapiensLogic(scene)
    case, geo = logic.caseFromSlice(view, volume)
    out = logic.writeLandmarks(Landmarks(["a", "b", "c"], find_blobs(case.image, 3)), geo, "found")
    ras = np.array([out.GetNthControlPointPositionWorld(i) for i in range(3)])
    distance = np.linalg.norm(ras[:, None] - shown[None], axis=-1).min(axis=0)
    assert distance.max() <= 0.3, distance


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


def detect(logic, volume, model, **options):
    job = logic.wait(logic.startDetect(volume, model=str(model), device="cpu", **options), timeout=300)
    assert job.error is None, job.error
    return logic.finishDetect(job)


@pytest.mark.slow
def test_detect_on_a_loaded_radiograph_writes_a_new_node(scene, radiograph, fitted_file, ceph, engine_worker):
    volume, path = radiograph
    user = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    user.AddControlPoint(vtk.vtkVector3d(1, 2, 0), "S")
    detector = load_detector(fitted_file, device="cpu")
    logic = MedSapiensLogic(scene, engine_worker)
    node = detect(logic, volume, fitted_file)
    node2 = detect(logic, volume, fitted_file)
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
        confidence = Landmarks.read_description(node.GetNthControlPointDescription(i))[0]
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
    assert node.GetNthControlPointDescription(1) == "confidence 0.200; check"
    assert node.GetNthControlPointDescription(0) == "confidence 0.900"
    # a detector's own review rule: a confident point flagged, a doubtful one trusted
    ruled = Landmarks(["a", "b"], [[10, 20], [30, 40]], [0.9, 0.2], check=[True, False])
    node = logic.writeLandmarks(ruled, geo)
    assert [node.GetNthControlPointLocked(i) for i in range(2)] == [0, 1]
    assert node.GetNthControlPointDescription(0) == "confidence 0.900; check"


def test_a_radiograph_under_a_parent_transform(scene, radiograph, micro_file, engine_worker):
    """Detection in the worker on a 2D volume moved by a transform: the landmarks move with it (<= 0.3 mm)."""
    volume, _ = radiograph
    logic = MedSapiensLogic(scene, engine_worker)
    plain = detect(logic, volume, micro_file)
    m = parent_transform(scene, volume)
    moved = detect(logic, volume, micro_file)
    before = np.array([plain.GetNthControlPointPositionWorld(i) for i in range(19)])
    after = np.array([moved.GetNthControlPointPositionWorld(i) for i in range(19)])
    assert np.abs(before[:, 2]).max() < 1e-9 and np.abs(after - before).max() > 1.0
    assert np.linalg.norm(after - (before @ m[:3, :3].T + m[:3, 3]), axis=1).max() <= 0.3


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
