"""Whole-volume (3D) landmarks on a real MRML scene (slicer-core): a shared micro-CT volume loaded through Slicer's
own volume reader, under a parent transform; training volumes from markups; detection into a new markups node."""
import numpy as np
import pytest
import vtk
from medsapiens import InputError
from medsapiens.detectors.atlas3d import Atlas3DDetector
from medsapiens.io.datasets import Dataset
from medsapiens.io.images import read_volume
from MedSapiensSlicerLib.logic import MedSapiensLogic

KEPT = 10  # landmarks used for the detection here (every fourth): the local stage's cost grows with them


@pytest.fixture(scope="module")
def mouse(data_dir):
    path = data_dir / "mouse_ct" / "landmarks.csv"
    if not path.is_file():
        pytest.skip("the mouse micro-CT set is not in ../shared/data")
    return Dataset(path)


def vtk_matrix(m):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, m[r, c])
    return out


def turn_and_shift():
    """A rigid RAS transform: 90 degrees about S, then 30 degrees about R, and a shift (mm)."""
    a, b = np.deg2rad(90.0), np.deg2rad(30.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rx @ rz, [5.0, -7.0, 12.0]
    return m


def load(scene, path, transform=None):
    """The volume through Slicer's own reader (vtkSlicerVolumesLogic.AddArchetypeVolume), optionally under a
    linear transform node."""
    node = scene.logics["Volumes"].AddArchetypeVolume(str(path), path.name.split(".")[0])
    assert node is not None and node.GetImageData() is not None
    if transform is not None:
        t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "turn")
        t.SetMatrixTransformToParent(vtk_matrix(transform))
        node.SetAndObserveTransformNodeID(t.GetID())
    return node


def markups(scene, names, lps, transform=None):
    """A user's markups node holding LPS points (given in the frame under `transform`), as placed in Slicer."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "placed")
    for name, p in zip(names, lps):
        node.AddControlPoint(vtk.vtkVector3d(-p[0], -p[1], p[2]), name)
    if transform is not None:
        node.SetAndObserveTransformNodeID(scene.GetFirstNodeByName("turn").GetID())
    return node


def world_ras(node) -> np.ndarray:
    out = np.zeros((node.GetNumberOfControlPoints(), 3))
    for i in range(len(out)):
        node.GetNthControlPointPositionWorld(i, out[i])
    return out


def world_lps(transform, lps):
    ras = lps * [-1, -1, 1]
    return ((np.column_stack([ras, np.ones(len(ras))]) @ transform.T)[:, :3]) * [-1, -1, 1]


def test_a_volume_loaded_by_slicer_is_the_engine_volume_in_world_space(scene, mouse):
    row = mouse.rows[1]
    path = mouse.root / row.image
    on_disk = read_volume(path)
    logic = MedSapiensLogic(scene)
    plain = logic.volumeCase(load(scene, path))
    assert (plain.voxels == on_disk.voxels).all()
    assert np.allclose(plain.index_to_lps, on_disk.index_to_lps, atol=1e-5)
    # under a parent transform: where Slicer draws the voxels, and the user's points with them
    m = turn_and_shift()
    node = load(scene, path, m)
    placed = markups(scene, row.landmarks.names, row.landmarks.points, m)
    case = logic.volumeTrainingCase(node, placed)
    corner = np.array([[3.0, 7.0, 11.0]])
    assert np.allclose(case.to_lps(corner), world_lps(m, on_disk.to_lps(corner)), atol=1e-4)
    assert case.landmarks.names == row.landmarks.names
    assert np.allclose(case.landmarks.points, world_lps(m, row.landmarks.points), atol=1e-4)
    # each landmark still sits on the same voxel
    assert np.allclose(case.to_index(case.landmarks.points), on_disk.to_index(row.landmarks.points), atol=1e-4)


def test_whole_volume_detection_writes_a_new_node_and_leaves_the_users_alone(scene, mouse):
    atlas = mouse.case(0)
    kept = mouse.names[::4][:KEPT]
    atlas.landmarks = atlas.landmarks.subset(kept)
    detector = Atlas3DDetector([atlas])
    row = mouse.rows[3]
    m = turn_and_shift()
    node = load(scene, mouse.root / row.image, m)
    truth = row.landmarks.subset(kept)
    placed = markups(scene, truth.names[:3], truth.points[:3] + 1.0, m)  # the user's own, deliberately off
    before = world_ras(placed)
    logic = MedSapiensLogic(scene)
    found = logic.detectVolume(node, detector)
    assert found.GetID() != placed.GetID() and found.GetParentTransformNode() is None
    assert [found.GetNthControlPointLabel(i) for i in range(found.GetNumberOfControlPoints())] == kept
    ras = world_ras(found)
    expected = world_lps(m, truth.points) * [-1, -1, 1]
    assert np.linalg.norm(ras - expected, axis=1).mean() < 0.8
    assert placed.GetNumberOfControlPoints() == 3
    assert np.allclose(world_ras(placed), before)
    with pytest.raises(InputError, match="no input volume"):
        logic.volumeCase(None)
