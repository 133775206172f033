"""The panel's cephalometric table on a real MRML scene (slicer-core): a markups node written by the logic reads
back to the engine's analysis through flipped and oblique image grids, follows moved and missing points, and
exports an atomic CSV; end to end after a detection on a radiograph loaded by Slicer's volume reader."""
import csv
import math

import numpy as np
import pytest
import vtk
from medsapiens import Landmarks
from medsapiens.analysis.cephalometry import MEASURE_NAMES, MEASUREMENT_COLUMNS as CSV_COLUMNS, analyze
from medsapiens.detectors.atlas import AtlasDetector
from MedSapiensSlicerLib.analysis import analysisRows, writeAnalysisCSV
from MedSapiensSlicerLib.logic import MedSapiensLogic
from slicer.util import vtkMatrixFromArray


def flat_volume(scene, directions, spacing, size=(670, 836)):
    """An empty single-slice volume with the given voxel directions and spacing (only its grid matters here)."""
    image = vtk.vtkImageData()
    image.SetDimensions(size[0], size[1], 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag([*spacing, 1.0])
    ijk_to_ras[:3, 3] = [12.0, -40.0, 7.5]
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ceph")
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtkMatrixFromArray(ijk_to_ras))
    return node


def tilted(degrees, axis) -> np.ndarray:
    """The 3 x 3 rotation by `degrees` about `axis` (VTK's own)."""
    from slicer.util import arrayFromVTKMatrix

    turn = vtk.vtkTransform()
    turn.RotateWXYZ(degrees, *axis)
    return arrayFromVTKMatrix(turn.GetMatrix())[:3, :3]


def values(rows) -> dict:
    return {r.measure: r.value for r in rows}


@pytest.mark.parametrize("grid", ["LPS", "LAS", "oblique"])
def test_rows_equal_the_engine_analysis_of_the_detected_pixels(scene, ceph, grid):
    row = ceph.rows[0]
    directions = {"LPS": np.diag([-1.0, -1.0, 1.0]), "LAS": np.diag([-1.0, 1.0, 1.0]),
                  "oblique": tilted(35, [1, 2, 3])}[grid]
    spacing = (row.spacing, row.spacing) if grid != "oblique" else (row.spacing, 0.8 * row.spacing)
    logic = MedSapiensLogic(scene)
    _, geometry = logic.caseFromVolume2D(flat_volume(scene, directions, spacing))
    node = logic.writeLandmarks(row.landmarks, geometry)
    rows = analysisRows(node)
    want = {m.name: m for m in analyze(row.landmarks, spacing)}
    assert [r.measure for r in rows] == list(MEASURE_NAMES)
    for r in rows:
        assert r.value == pytest.approx(want[r.measure].value, abs=1e-6), r.measure
        assert r.class_number == want[r.measure].class_number
    anb = rows[0]
    assert anb.landmarks == "S, N, A, B" and anb.normal_range == "3.2-5.7°"
    assert anb.cells() == ("ANB", want["ANB"].text(), "3.2-5.7°",
                           f"{want['ANB'].class_number}: {want['ANB'].band.name}")


def test_rows_follow_moved_and_missing_points(scene, ceph):
    row = ceph.rows[0]
    logic = MedSapiensLogic(scene)
    _, geometry = logic.caseFromVolume2D(flat_volume(scene, np.diag([-1.0, -1.0, 1.0]), (row.spacing,) * 2))
    node = logic.writeLandmarks(row.landmarks, geometry)
    before = values(analysisRows(node))

    b = row.landmarks.names.index("B")
    moved = row.landmarks.points.copy()
    moved[b] += [25.0, 0.0]  # B 25 px forward: SNB grows, ANB shrinks
    node.SetNthControlPointPositionWorld(b, *geometry.to_ras(moved[b:b + 1])[0])
    node.SetNthControlPointPositionMissing(row.landmarks.names.index("Gn"))
    rows = {r.measure: r for r in analysisRows(node)}
    present = np.array([n != "Gn" for n in row.landmarks.names])
    want = {m.name: m.value for m in analyze(Landmarks(row.landmarks.names, moved, present=present), row.spacing)}
    assert rows["SNB"].value == pytest.approx(want["SNB"], abs=1e-6) and rows["SNB"].value > before["SNB"] + 1
    assert rows["ANB"].value == pytest.approx(want["ANB"], abs=1e-6)
    assert math.isnan(rows["FHA"].value) and rows["FHA"].class_number is None
    assert rows["FHA"].class_name == "not computed (missing Gn)" and rows["FHA"].cells()[1] == ""
    assert rows["FHI"].class_number is not None and rows["SNA"].value == pytest.approx(before["SNA"], abs=1e-9)


def test_no_table_for_other_landmark_sets_or_unknown_planes(scene, ceph):
    row = ceph.rows[0]
    logic = MedSapiensLogic(scene)
    _, geometry = logic.caseFromVolume2D(flat_volume(scene, np.diag([-1.0, -1.0, 1.0]), (row.spacing,) * 2))
    hands = logic.writeLandmarks(Landmarks(["L0", "L1"], [[1.0, 2.0], [3.0, 4.0]]), geometry)
    assert analysisRows(hands) is None and analysisRows(None) is None
    mine = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mine")  # not written by the logic: no plane
    for name, p in zip(row.landmarks.names, geometry.to_ras(row.landmarks.points)):
        mine.AddControlPoint(vtk.vtkVector3d(*p), name)
    assert analysisRows(mine) is None
    assert values(analysisRows(mine, geometry)) == pytest.approx(values(analysisRows(
        logic.writeLandmarks(row.landmarks, geometry))), abs=1e-9)


def test_export_replaces_the_file_atomically(scene, ceph, tmp_path):
    row = ceph.rows[0]
    logic = MedSapiensLogic(scene)
    _, geometry = logic.caseFromVolume2D(flat_volume(scene, np.diag([-1.0, -1.0, 1.0]), (row.spacing,) * 2))
    node = logic.writeLandmarks(row.landmarks, geometry, "ceph landmarks")
    rows = analysisRows(node)
    out = tmp_path / "analysis.csv"
    out.write_text("an older export, longer than the new one\n" * 200)
    assert writeAnalysisCSV(rows, node.GetName(), out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.csv"]  # no temporary file left
    with open(out, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_COLUMNS and len(table) == 9
    for cells, r in zip(table[1:], rows):
        record = dict(zip(CSV_COLUMNS, cells))
        assert record["markups"] == "ceph landmarks" and record["measure"] == r.measure
        assert float(record["value"]) == pytest.approx(r.value, rel=1e-5)
        assert int(record["class"]) == r.class_number and record["class_name"] == r.class_name


def test_detect_then_analysis_on_a_loaded_radiograph(scene, ceph, tmp_path):
    """End to end: the atlas detector on cephalogram 051 loaded by Slicer's reader, then the table."""
    import SimpleITK as sitk

    target = ceph.rows[50]
    image = sitk.ReadImage(str(ceph.root / target.image))
    image.SetSpacing((target.spacing,) * 2)
    sitk.WriteImage(image, str(tmp_path / "051.nrrd"))
    volume = scene.logics["Volumes"].AddArchetypeVolume(str(tmp_path / "051.nrrd"), "ceph051")
    logic = MedSapiensLogic(scene)
    case, geometry = logic.caseFor(volume)
    node = logic.writeLandmarks(AtlasDetector([ceph.case(0)]).detect(case), geometry, "ceph051 landmarks")
    rows = analysisRows(node)
    assert rows is not None and all(r.class_number is not None for r in rows)
    # the same measures as the logic's other way from a node back to pixels (an annotated case)
    logic.addCase(volume, node)
    case, = logic.trainingCases()
    want = {m.name: m.value for m in analyze(case.landmarks, case.spacing)}
    assert values(rows) == pytest.approx(want, abs=1e-6)
    truth = {m.name: m.value for m in analyze(target.landmarks, target.spacing)}
    assert abs(values(rows)["SNA"] - truth["SNA"]) < 10  # a detection, not noise
