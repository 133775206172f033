"""The clinician's session on a real MRML scene (slicer-core), through PanelLogic as the panel's buttons call it:
Annotate this image makes a template that Slicer's own placement code fills in the set's order (a skipped landmark
stays missing), Add case refuses a wrong name, a repeat or a deleted point in one line, the review lists the
flagged points worst first and Slicer's markups logic jumps the slice views to one, a moved point is marked
corrected, Add as case takes the reviewed node with the geometry it was detected on; and the whole session of the
module's self-test (MedSapiensSlicerLib/scenario.py) with the real engine worker."""
from dataclasses import replace

import numpy as np
import pytest
import vtk
from medsapiens import InputError, Landmarks, api
from MedSapiensSlicerLib.annotation import labels
from MedSapiensSlicerLib.panel import FROM_FILE, FROM_MODEL, LOCAL_FILE, PanelLogic, PanelState
from MedSapiensSlicerLib.scenario import FAST, SessionScenario, place

ISBI = "ISBI 2015 cephalometric (19)"


@pytest.fixture
def logic(scene, engine_worker):
    logic = PanelLogic(scene, engine_worker, scene.logics["Markups"])
    yield logic
    logic.shutdown()


def slice_view(scene, name="Red"):
    """A slice node as a view makes it (a slice logic keeps it), placed away from the images."""
    import slicer

    view = slicer.vtkMRMLSliceLogic()
    view.SetMRMLApplicationLogic(scene.app)
    view.SetMRMLScene(scene)
    node = view.AddSliceNode(name)
    node.SetSliceToRASByNTP(0, 0, 1, 1, 0, 0, 50, 60, 70, 0)
    scene.views = [*getattr(scene, "views", []), view]  # alive as long as the scene
    return node


def centre(sliceNode) -> np.ndarray:
    m = sliceNode.GetSliceToRAS()
    return np.array([m.GetElement(r, 3) for r in range(3)])


def statuses(node) -> list[int]:
    return [node.GetNthControlPointPositionStatus(i) for i in range(node.GetNumberOfControlPoints())]


def test_annotate_makes_a_template_that_slicers_place_mode_fills_in_order(logic, scene, tmp_path):
    volume = SessionScenario(logic, None, tmp_path).addPhantom(0)
    user = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mine")
    p = replace(PanelState(), inputVolume=volume, landmarkSet=ISBI, trainingMarkups=user)
    isbi = api.landmark_set("isbi2015")
    node = logic.annotate(p)
    assert p.trainingMarkups is node and node.GetID() != user.GetID() and node.GetName() == "phantom000 points"
    assert labels(node) == list(isbi.names) and statuses(node) == [node.PositionUndefined] * 19
    assert [node.GetNthControlPointDescription(i) for i in range(19)] == list(isbi.descriptions)
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()
    assert scene.logics["Markups"].GetActiveListID() == node.GetID()  # Slicer's place mode fills this node
    assert logic.placementLine(p) == ("Place S (1 of 19): Sella: centre of the sella turcica. Click it in a slice "
                                      "view, or Skip it if it cannot be seen.")
    heard = []
    logic.onPointsChanged = lambda: heard.append(logic.placementLine(p))
    pixels = np.column_stack([10.0 + 7 * np.arange(19), 20.0 + 9 * np.arange(19)])
    ras = np.column_stack([-pixels * 0.5, np.zeros(19)])  # the phantom's 0.5 mm pixels, LPS = (x sx, y sy, 0)
    assert [place(node, ras[0]), place(node, ras[1])] == [0, 1]
    assert heard[-1].startswith("Place Or (3 of 19): Orbitale: lowest point")
    assert logic.skipLandmark(p).startswith("Place Po (4 of 19): Porion: ")  # Or cannot be seen: skipped
    assert place(node, ras[3]) == 3, "place mode passes over the skipped landmark"
    for i in range(4, 19):
        assert place(node, ras[i]) == i
    assert logic.placementLine(p) == "18 of 19 landmarks placed in 'phantom000 points' (missing: Or). Add case to " \
                                     "use them."
    assert node.GetFixedNumberOfControlPoints() and node.GetControlPointPlacementComplete()  # no stray 20th point
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform, "place mode ends with the last one"
    assert logic.addCaseFor(p) == "Case added: phantom000 (Whole 2D image), 1 in the table."
    case = logic.trainingCases()[0]
    assert case.landmarks.names == list(isbi.names) and list(np.flatnonzero(~case.landmarks.present)) == [2]
    present = case.landmarks.present
    assert np.allclose(case.landmarks.points[present], pixels[present], atol=1e-9)
    assert user.GetNumberOfControlPoints() == 0, "the user's own node is untouched"


def test_add_case_refuses_a_wrong_name_a_repeat_or_a_deleted_point_in_one_line(logic, scene, tmp_path):
    scenario = SessionScenario(logic, None, tmp_path)
    p = replace(PanelState(), inputVolume=scenario.addPhantom(0), landmarkSet=ISBI)
    node = logic.annotate(p)
    for i in range(19):
        place(node, (-10.0 - i, -20.0 - i, 0.0))
    refusals = []
    for index, wrong in ((3, "F-4"), (4, "S")):  # a point left with Slicer's own name; a landmark placed twice
        right = node.GetNthControlPointLabel(index)
        node.SetNthControlPointLabel(index, wrong)
        with pytest.raises(InputError) as e:
            logic.addCaseFor(p)
        refusals.append(str(e.value))
        node.SetNthControlPointLabel(index, right)
    node.SetFixedNumberOfControlPoints(False)
    node.RemoveNthControlPoint(18)
    with pytest.raises(InputError) as e:
        logic.addCaseFor(p)
    refusals.append(str(e.value))
    assert refusals == [
        "phantom000 points: 'F-4' is not a landmark of ISBI 2015 cephalometric (19) (S, N, Or, Po, A, ...)",
        "phantom000 points: 'S' appears twice (points 1 and 5); each landmark once",
        "phantom000 points: 18 points for the 19 landmarks of ISBI 2015 cephalometric (19); Ar is not there (keep a "
        "landmark you cannot place as an unplaced or missing point instead of deleting it)"]
    assert logic.cases == []


def test_the_models_landmarks_are_my_cases_with_the_atlas_and_a_file_is_read_as_chosen(logic, scene, tmp_path):
    """With the atlas, the first case sets the landmarks (only a repeat is refused), the next is checked against
    them; a landmark set file is read when chosen, and a bad one is one line naming it."""
    scenario = SessionScenario(logic, None, tmp_path)
    p = replace(PanelState(), inputVolume=scenario.addPhantom(0))
    assert p.landmarkSet == FROM_MODEL
    assert logic.modelLandmarksLine(p) == "those of your cases (none yet)"
    with pytest.raises(InputError, match="the chosen model's landmarks are not known yet"):
        logic.annotate(p)
    first = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "first")
    for name, x in (("Tip", 10.0), ("Chin", 20.0)):
        first.AddControlPoint(vtk.vtkVector3d(-x, -x, 0), name)
    p.trainingMarkups = first
    logic.addCaseFor(p)
    template = logic.annotate(replace(p, inputVolume=scenario.addPhantom(1)))
    assert labels(template) == ["Tip", "Chin"] and logic.modelLandmarkSet(p).title == "my cases (2)"
    assert logic.modelLandmarksLine(p) == "2: Tip, Chin"
    assert logic.modelLandmarksLine(replace(p, model="medsapiens-head")) == "19: S, N, Or, Po, A, ..."
    assert logic.modelLandmarksLine(replace(p, model=LOCAL_FILE)) == "not known: choose the model file"
    other = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "other")
    other.AddControlPoint(vtk.vtkVector3d(-5, -5, 0), "F-1")
    with pytest.raises(InputError, match=r"^other: 'F-1' is not a landmark of my cases \(2\) \(Tip, Chin\)$"):
        logic.addCaseFor(replace(p, trainingMarkups=other))
    with pytest.raises(InputError, match=r"^choose the landmark set's file"):
        logic.annotate(replace(p, landmarkSet=FROM_FILE))
    bad = tmp_path / "set.csv"
    bad.write_text("A,b,c\n")
    with pytest.raises(InputError, match=rf"^{bad}: 3 columns in the line of 'A'"):
        logic.annotate(replace(p, landmarkSet=FROM_FILE, landmarkSetFile=str(bad)))
    with pytest.raises(InputError, match="choose the image to annotate"):
        logic.annotate(replace(p, inputVolume=None))


@pytest.mark.slow
def test_review_lists_flagged_points_jumps_to_them_and_add_as_case_keeps_the_detected_geometry(logic, scene,
                                                                                               tmp_path, occluded):
    """Detect on the Red view's slice; the review list holds the flagged points, least probable first; a click
    centres the slice views on the point (Slicer's markups logic) and makes it the active point; moving it marks it
    corrected; Add as case takes the node on the plane it was detected on, although the view has moved since."""
    red = slice_view(scene)
    scenario = SessionScenario(logic, None, tmp_path)
    p = replace(PanelState(), landmarkSet=FROM_FILE, landmarkSetFile=str(scenario.landmarkSetFile()))
    scenario.p = p
    for seed in (0, 1, 2):
        scenario.annotate(scenario.addPhantom(seed))
    target = scenario.addPhantom(100)
    import slicer

    slicer.util.updateVolumeFromArray(target, occluded(api.phantom_case(100), 4).image[None])  # one to check
    red.SetFieldOfView(170.0, 210.0, 1.0)  # the Red view shows the whole target as it is stored, in plane
    red.SetSliceToRASByNTP(0, 0, -1, -1, 0, 0, -80.0, -100.0, 0.0, 0)
    red.UpdateMatrices()
    p.inputVolume, p.view = target, "Red"
    job = logic.wait(logic.startDetectFor(p))
    assert logic.finishJob(job, p).startswith("9 of 9 landmarks placed in 'phantom100 landmarks'")
    node, rows = p.outputMarkups, logic.reviewRows(p)
    detected = [Landmarks.read_description(node.GetNthControlPointDescription(i)) for i in range(9)]
    assert [r.index for r in rows] == sorted((i for i in range(9) if detected[i][1]), key=lambda i: detected[i][0])
    assert logic.reviewLine(rows).startswith("Points to check, least probable first")
    assert logic.reviewLine([]) == "No point of this result is flagged for checking."
    assert rows and [r.cells() for r in rows] == [(labels(node)[r.index], f"{detected[r.index][0]:.2f}", "check")
                                                  for r in rows]
    detection = logic.detections[node.GetID()]
    detectedPlane = detection.geometry.pixel_to_ras.copy()
    assert detection.plane.startswith("Red slice at R -79.8, A -99.8")  # the view's slice, cut to the image
    assert np.allclose(detectedPlane, logic.caseFor(target)[1].pixel_to_ras), "all of it, as stored"
    worst = rows[0]
    point = np.array(node.GetNthControlPointPositionWorld(worst.index))
    assert np.linalg.norm(centre(red) - point) > 1.0
    logic.jumpToPoint(p, worst.index)
    assert np.allclose(centre(red), point, atol=1e-9) and node.GetDisplayNode().GetActiveControlPoint() == worst.index
    red.SetFieldOfView(40.0, 40.0, 1.0)  # and the user zooms in to look closely
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 0.5)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())  # a transform over the node moves no point by hand
    truth = scenario.truth[target.GetID()][worst.name]
    node.SetNthControlPointPositionWorld(worst.index, *truth)  # the user drags the point where it belongs
    after = {r.index: r for r in logic.reviewRows(p)}
    assert after[worst.index].cells() == (worst.name, f"{worst.probability:.2f}", "corrected")
    assert node.GetNthControlPointDescription(worst.index) == f"confidence {worst.probability:.3f}; corrected"
    assert all(not after[r.index].corrected for r in rows[1:]), "the others still say check"
    kept = ", ".join(r.name for r in rows[1:])
    assert logic.addReviewedCase(p) == (f"Case added: phantom100 ({logic.cases[-1].plane}), 4 in the table."
                                        + (f" Flagged and not moved (kept as detected): {kept}." if kept else ""))
    row = logic.cases[-1]
    assert row.markupsID == node.GetID() and row.plane == detection.plane
    assert np.array_equal(row.geometry.pixel_to_ras, detectedPlane), "the plane it was detected on, not the view's now"
    assert logic.caseFor(target, red)[0].size != logic.caseFor(target)[0].size, "the view shows less of it now"
    case = logic.annotatedCase(row)
    assert np.allclose(row.geometry.to_ras(case.landmarks.points[[worst.index]])[0], truth, atol=1e-6)
    with pytest.raises(InputError, match="not the result of a Detect on an image still open"):
        logic.addReviewedCase(replace(p, outputMarkups=scenario.out.cases[0]))
    mine = replace(p, outputMarkups=scenario.out.cases[0])  # a person's own points chosen as the result
    logic.followPoints(mine)
    before = [mine.outputMarkups.GetNthControlPointDescription(i) for i in range(9)]
    moved = np.array(mine.outputMarkups.GetNthControlPointPositionWorld(0)) + [1.0, 0.0, 0.0]
    mine.outputMarkups.SetNthControlPointPositionWorld(0, *moved)
    assert [mine.outputMarkups.GetNthControlPointDescription(i) for i in range(9)] == before, "left alone"
    assert logic.reviewRows(mine) == []


@pytest.mark.slow
def test_the_clinicians_session(logic, scene, tmp_path, monkeypatch):
    """The self-test's scenario: template annotation of 3 phantoms, Fine-tune, Detect on a 4th, the worst flagged
    point reviewed and corrected, Add as case, Fine-tune again, warm; each long step cancelled midway first."""
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache" / "models"))
    red = slice_view(scene)
    p = replace(PanelState(), adapterName="session")
    out = SessionScenario(logic, p, tmp_path).run()
    assert [labels(n) for n in out.cases] == [list(api.phantom_case(0).landmarks.names)] * 3
    assert out.cases[1].GetNthControlPointPositionStatus(labels(out.cases[1]).index("C2")) == \
        out.cases[1].PositionMissing
    assert [c.split(":")[0] for c in out.cancelled] == ["training network 1 of 3", "registering atlas case 1 of 3",
                                                         "training network 1 of 4"]
    assert out.jumped[0][0] == "Red" and np.allclose(centre(red), out.jumped[0][2])
    assert out.first["cases_estimated"] == 3 and not out.first["warm_started"]
    assert out.warm["cases_estimated"] == 4 and out.warm["warm_started"]
    assert out.warm["steps"] <= out.first["steps"] // 2 + FAST["steps"], "a warm start trains at most half as long"
    assert logic.casesSeen(out.warm) == [True] * 4, "the reviewed case (its corrected point) is what it learned"
    print("session:", {k: f"{v:.1f} s" for k, v in out.seconds.items()})
