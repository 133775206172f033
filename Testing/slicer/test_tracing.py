"""The tracing and the analysis choice on a real MRML scene (slicer-core): line and angle nodes in one folder that
follow a moved point at once (Slicer's own angle and length equal the table's), hide with a missing point and
with the check box, give way to another analysis; a left-facing image reads the same; the report from the panel
is written by the engine worker."""
import os
from dataclasses import replace

import numpy as np
import pytest
from medsapiens import Landmarks, api
from MedSapiensSlicerLib.logic import WHOLE_IMAGE, Detection
from MedSapiensSlicerLib.panel import PanelLogic, PanelState
from MedSapiensSlicerLib.tracing import TRACING_ATTRIBUTE


@pytest.fixture
def traced(scene, ceph, ceph_volume, tmp_path):
    """(logic, panel state, result node, geometry, ceph row) with a Steiner tracing over cephalogram 0."""
    volume, _ = ceph_volume(scene, 0, tmp_path, annotated=False)
    logic = PanelLogic(scene)
    _, geometry = logic.caseFromVolume2D(volume)
    node = logic.writeLandmarks(ceph.rows[0].landmarks, geometry, "result", "atlas")
    p = PanelState(inputVolume=volume, outputMarkups=node, analysis="steiner")
    logic.showTracing(p)
    return logic, p, node, geometry, ceph.rows[0]


def tracing_nodes(scene) -> dict:
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return {n.GetName(): n for n in nodes if n.GetAttribute(TRACING_ATTRIBUTE)}


def position(node, i) -> np.ndarray:
    ras = np.zeros(3)
    node.GetNthControlPointPositionWorld(i, ras)
    return ras


def test_the_tracing_follows_a_moved_point_and_the_table_with_it(scene, traced):
    import slicer

    logic, p, node, geometry, row = traced
    nodes = tracing_nodes(scene)
    assert set(nodes) == {"S-N-A", "S-N-B", "N-B", "N-A", "S-N", "Go-Gn"}  # not those needing UIA, LIA, U6, L6
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in nodes.values()} == {logic.tracing.folder}
    assert sh.GetItemName(logic.tracing.folder) == "result steiner tracing"
    names = row.landmarks.names
    assert np.allclose(position(nodes["S-N"], 1), position(node, names.index("N")))
    assert all(n.GetLocked() for n in nodes.values())

    heard = []
    logic.onAnalysisChanged = lambda: heard.append(logic.analysisTable(p))
    n = names.index("N")
    moved = row.landmarks.points.copy()
    moved[n] += [30.0, -12.0]
    node.SetNthControlPointPositionWorld(n, *geometry.to_ras(moved[n:n + 1])[0])
    assert heard, "the panel heard of the move at once"
    assert np.allclose(position(nodes["S-N"], 1), position(node, n))
    assert np.allclose(position(nodes["S-N-A"], 1), position(node, n))  # the vertex
    table = {r.measure: r for r in heard[-1]}
    want = {m.name: m.value for m in api.analyze(Landmarks(names, moved), row.spacing, "steiner")}
    assert table["SNA"].value == pytest.approx(want["SNA"], abs=1e-6)
    assert nodes["S-N-A"].GetAngleDegrees() == pytest.approx(table["SNA"].value, abs=1e-6)  # Slicer's own angle
    assert nodes["S-N-B"].GetAngleDegrees() == pytest.approx(table["SNB"].value, abs=1e-6)
    sn = np.linalg.norm((moved[n] - moved[names.index("S")]) * row.spacing)
    assert nodes["S-N"].GetLineLengthWorld() == pytest.approx(sn, abs=1e-6)
    assert table["U1-NA_deg"].cells()[3] == "not computed (missing UIA)" and table["U1-NA_deg"].normal_range


def test_missing_points_and_the_check_box_hide_lines_another_analysis_replaces_them(scene, traced):
    logic, p, node, _, row = traced
    nodes = tracing_nodes(scene)
    node.SetNthControlPointPositionMissing(row.landmarks.names.index("Gn"))
    visible = {name for name, n in nodes.items() if n.GetDisplayNode().GetVisibility()}
    assert visible == set(nodes) - {"Go-Gn"}
    rows = {r.measure: r for r in logic.analysisTable(p)}
    assert rows["SN-GoGn"].value != rows["SN-GoGn"].value and rows["SNA"].value == rows["SNA"].value  # NaN, a value

    p.showTracing = False
    logic.showTracing(p)
    assert not any(n.GetDisplayNode().GetVisibility() for n in nodes.values())
    p.showTracing = True
    logic.showTracing(p)
    assert {name for name, n in nodes.items() if n.GetDisplayNode().GetVisibility()} == visible

    p.analysis = "bjork"
    logic.showTracing(p)
    assert not any(scene.IsNodePresent(n) for n in nodes.values()), "the Steiner tracing left the scene"
    assert {"N-S-Ar", "S-Ar-Go", "Ar-Go-Me", "S-Go", "N-Me"} <= set(tracing_nodes(scene))
    p.outputMarkups = None
    logic.showTracing(p)
    assert logic.tracing is None and not tracing_nodes(scene)


def test_a_left_facing_image_reads_the_same_in_every_analysis(scene, traced):
    logic, p, node, geometry, row = traced
    mirrored = row.landmarks.points * [-1, 1] + [row.width - 1, 0]
    left = logic.writeLandmarks(Landmarks(row.landmarks.names, mirrored, present=row.landmarks.present), geometry)
    for analysis in api.analyses():
        p.analysis = analysis
        right = logic.analysisTable(p)
        p.outputMarkups = left
        for a, b in zip(right, logic.analysisTable(p)):
            assert (a.value != a.value and b.value != b.value) or b.value == pytest.approx(a.value, abs=1e-6), \
                (analysis, a.measure)
        p.outputMarkups = node


@pytest.mark.slow
def test_the_panel_report_is_written_by_the_worker(scene, traced, engine_worker, tmp_path):
    logic, p, node, geometry, row = traced
    logic.worker = engine_worker
    node.SetNthControlPointDescription(row.landmarks.names.index("B"), "confidence 0.310; check")
    logic.detections[node.GetID()] = Detection(p.inputVolume.GetID(), WHOLE_IMAGE, None, geometry)  # as a batch's
    p = replace(p, inputVolume=None)  # the report is of the image the result was detected on, whatever is chosen
    job = logic.wait(logic.startReportFor(p, tmp_path / "out" / "result.html"))
    assert not job.error, job.error
    status = logic.finishJob(job, p)
    assert status.startswith("Report saved to") and str(tmp_path / "out" / "result.pdf") in status
    text = (tmp_path / "out" / "result.html").read_text(encoding="utf-8")
    assert "detected: atlas" in text and "B (confidence" in text and "Steiner" in text
    assert (tmp_path / "out" / "result.pdf").read_bytes()[:5] == b"%PDF-"
    assert not [f for f in job.context["files"] if os.path.exists(f)], "the case file is removed"
