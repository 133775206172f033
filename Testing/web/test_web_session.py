"""The page's session without a browser: a WebSession on trame-slicer's real Slicer application (its own MRML
scene and readers). The server folder is offered by name only and a name outside it is refused; an image and its
points uploaded together become the input and the annotated points, and Add case takes them; a landmark set file
is checked like every upload (a bad one refused in one line), its template is filled in order by Slicer's own
placement code with a skip, and Add case checks the names; a detection in the session's engine worker is
reviewed (the list, the jump, corrected), analysed with the analysis chosen by name, reported and added."""
import json
import time

import numpy as np
import pytest
from medsapiens import InputError

pytestmark = pytest.mark.slow  # the first SlicerApp of a process loads VTK and Slicer's libraries (~10 s)


@pytest.fixture
def session(tmp_path):
    pytest.importorskip("trame_slicer", reason="the web extra (pip install 'medsapiens[web]') is not installed")
    from medsapiens.web.session import WebSession
    from trame_slicer.core import SlicerApp

    web = WebSession(SlicerApp(), tmp_path / "session", tmp_path / "server")
    yield web
    web.shutdown()


def test_the_server_folder_is_offered_by_name_and_nothing_else_opens(session, phantom_files, tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    image, points = phantom_files(0)
    (server / "ceph.nrrd").write_bytes(image.read_bytes())
    (server / "notes.txt").write_text("not an image")
    (tmp_path / "secret.nrrd").write_bytes(image.read_bytes())
    assert session.serverFiles() == ["ceph.nrrd"]
    assert session.openServerFile("../secret.nrrd") == "secret.nrrd: not an image of the server's folder"
    assert session.openServerFile("notes.txt") == "notes.txt: not an image of the server's folder"
    assert session.openServerFile("ceph.nrrd") == "Opened ceph.nrrd."
    assert [name for _, name in session.nodes("vtkMRMLScalarVolumeNode")] == ["ceph"]


def test_an_image_and_its_points_uploaded_together_make_a_case(session, phantom_files):
    image, points = phantom_files(1)
    assert session.upload([(image.name, image.read_bytes()), (points.name, points.read_bytes())]) == \
        "Opened phantom1.nrrd, phantom1.mrk.json."
    assert session.p.inputVolume.GetName() == "phantom1"
    assert session.p.trainingMarkups.GetNumberOfControlPoints() == 9
    assert session.addCase() == "Case added: phantom1 (Whole 2D image), 1 in the table."
    assert session.caseTable() == [("phantom1", session.p.trainingMarkups.GetName(), "Whole 2D image", "")]


def test_a_landmark_set_file_is_checked_and_its_template_filled_in_order(session, phantom_files, tmp_path):
    from MedSapiensSlicerLib.panel import FROM_FILE
    from MedSapiensSlicerLib.scenario import place
    from medsapiens import api

    names = api.phantom_case(0).landmarks.names
    good = ("name,description\n" + "".join(f"{n},the phantom's {n.lower()}\n" for n in names)).encode()
    assert session.uploadLandmarkSet("phantom set.csv", good) == \
        "Landmark set phantom set.csv: 9 landmarks (Sella, Nasion, Vertex, Occiput, Incisor, ...)."
    chosen = session.p.landmarkSet, session.p.landmarkSetFile
    assert chosen[0] == FROM_FILE and str(tmp_path / "session") in chosen[1]
    image, points = phantom_files(0)
    refused = {"three.csv": (b"name,description,x\nS,a,b\n", "three.csv: 3 columns in the line of 'S'; a landmark "
                             "set has two, name,description (quote a description that holds a comma)"),
               "a picture.json": (b'{"landmarks": ["S"], "picture": "../../../etc/hostname"}',
                                  "a picture.json: not a landmark set file"),
               "image.csv": (image.read_bytes(), "image.csv: not a landmark set file"),
               "binary.csv": (bytes(range(256)), "binary.csv: not a landmark set file"),
               "empty.json": (b'{"title": "nothing"}', 'empty.json: a JSON landmark set needs "landmarks"')}
    for name, (content, line) in refused.items():
        status = session.uploadLandmarkSet(name, content)
        assert status.startswith(line) and "\n" not in status and str(tmp_path) not in status, status
    assert (session.p.landmarkSet, session.p.landmarkSetFile) == chosen  # the good file stays chosen
    assert len(list((tmp_path / "session" / "uploads").iterdir())) == 1  # nothing of the refused files is kept
    for junk in ("/etc/passwd", {"a": 1}, None):
        session.chooseLandmarkSet(junk)
    assert session.p.landmarkSet == FROM_FILE

    assert session.annotate() == "choose the image to annotate as the input volume first"
    assert session.upload([(image.name, image.read_bytes())]) == "Opened phantom0.nrrd."
    assert session.annotate() == "Annotating 'phantom0 points': click each landmark named below in the view."
    node = session.p.trainingMarkups
    interaction = session.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place  # Slicer's place mode, on this node
    assert session.app.markups_logic.GetActiveListID() == node.GetID() and node.GetDisplayNode().GetVisibility()
    assert session.placing() and session.placementLine() == ("Place Sella (1 of 9): the phantom's sella. Click it "
                                                             "in a slice view, or Skip it if it cannot be seen.")
    case = api.phantom_case(0)
    for name, (x, y) in zip(case.landmarks.names, case.landmarks.points * case.spacing):
        if name == "Vertex":
            assert session.skipLandmark().startswith("Place Occiput (4 of 9)")
        else:
            place(node, (-x, -y, 0.0))  # what a click in the view runs
    assert not session.placing() and interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    assert session.placementLine() == "8 of 9 landmarks placed in 'phantom0 points' (missing: Vertex). Add case " \
                                      "to use them."
    assert session.addCase() == "Case added: phantom0 (Whole 2D image), 1 in the table."

    assert session.upload([(image.name, image.read_bytes())]) == "Opened phantom0.nrrd."
    session.annotate()
    session.p.trainingMarkups.SetNthControlPointLabel(2, "Vertx")
    assert session.addCase() == ("phantom0_1 points: 'Vertx' is not a landmark of landmark set (9) (Sella, Nasion, "
                                 "Vertex, Occiput, Incisor, ...)")
    assert len(session.caseTable()) == 1


def finish(session, timeout: float = 300) -> str:
    """Poll the page's session until its job is done (as the page does); the status line."""
    deadline = time.monotonic() + timeout
    while session.job is not None:
        assert time.monotonic() < deadline, session.status
        time.sleep(0.05)
        session.poll()
    return session.status


def test_a_detected_cephalogram_reviewed_analysed_reported_and_added(session, ceph, ceph_files, tmp_path):
    """Detect with the atlas of 2 cephalograms on a third, in the session's engine worker; the review list, the
    jump (trame-slicer's markups logic centres the Red slice on the point), a moved point marked corrected; the
    analysis chosen by name only; the report of the points as they are now, drawn by the worker; Add as case."""
    import slicer

    view = slicer.vtkMRMLSliceLogic()  # a slice view's node, as the page's layout makes it
    view.SetMRMLApplicationLogic(session.app.app_logic)
    view.SetMRMLScene(session.scene)
    red = view.AddSliceNode("Red")
    for i in range(2):
        image, points = ceph_files(i)
        session.upload([(image.name, image.read_bytes()), (points.name, points.read_bytes())])
        assert session.addCase().endswith(f"{i + 1} in the table.")
    image, reference = ceph_files(2)
    session.upload([(image.name, image.read_bytes())])
    assert session.startReport() == "no result to report yet: Detect first"
    session.start("detect")
    assert finish(session) == "19 of 19 landmarks placed in 'ceph003 landmarks'."

    rows, node = session.reviewRows(), session.p.outputMarkups
    assert rows and [r.probability for r in rows] == sorted(r.probability for r in rows)
    assert session.reviewLine(rows).startswith("Points to check, least probable first")
    worst = rows[0]
    for junk in (-1, 19, "3", None):
        session.jumpToPoint(junk)  # what no row sends: nothing happens
    session.jumpToPoint(worst.index)
    ras = np.array(node.GetNthControlPointPositionWorld(worst.index))
    m = red.GetSliceToRAS()
    assert np.allclose([m.GetElement(r, 3) for r in range(3)], ras, atol=1e-6)  # the view is centred on it
    assert node.GetDisplayNode().GetActiveControlPoint() == worst.index
    x, y = next(p for p in json.loads(reference.read_text())["markups"][0]["controlPoints"]
                if p["label"] == worst.name)["position"][:2]
    node.SetNthControlPointPositionWorld(worst.index, -x, -y, 0.0)  # dragged onto the reference point
    assert {r.index: r.cells()[2] for r in session.reviewRows()}[worst.index] == "corrected"

    assert [r.measure for r in session.analysis()][:3] == ["ANB", "SNB", "SNA"]  # ISBI 2015 by default
    session.chooseAnalysis("steiner")
    for junk in ("<script>", ["steiner"], None):
        session.chooseAnalysis(junk)
        session.start(junk)
    assert session.p.analysis == "steiner" and [r.measure for r in session.analysis()][:3] == ["SNA", "SNB", "ANB"]
    name, table = session.analysisFile()
    assert name == "ceph003 landmarks analysis.csv" and b"SNA" in table

    with pytest.raises(InputError):
        session.reportFile("html")  # none made yet
    assert session.startReport() == "Writing the report..."
    assert finish(session) == "The report of 'ceph003 landmarks' (Steiner) is ready to download."
    assert session.reportReady()
    name, html = session.reportFile("html")
    text = html.decode("utf-8")
    flagged = [r.name for r in session.reviewRows() if not r.corrected]
    listed = text.split("Points to check:</b> ")[1].split("</p>")[0]
    assert name == "ceph003 landmarks report.html" and "<img alt='tracing'" in text and "data:image/png;base64," in text
    assert all(f"{n} (confidence " in listed for n in flagged) and f"{worst.name} (" not in listed, listed
    assert session.reportFile("pdf")[1][:5] == b"%PDF-"
    with pytest.raises(InputError):
        session.reportFile("../../etc/passwd")
    node.SetNthControlPointPositionWorld(1, *(np.array(node.GetNthControlPointPositionWorld(1)) + [2.0, 0.0, 0.0]))
    assert not session.reportReady()  # a point moved since: that report is not offered
    with pytest.raises(InputError):
        session.reportFile("html")

    for junk in (node.GetID(), "vtkMRMLScalarVolumeNode99", ["x"], None):
        session.select(volumeID=junk, outputID=session.p.inputVolume.GetID() if junk is None else junk)
    assert (session.p.inputVolume.GetName(), session.p.outputMarkups) == ("ceph003", node)  # not nodes offered
    session.select(volumeID=session.logic.cases[0].volumeID)
    assert session.startReport() == ("'ceph003 landmarks' does not belong to ceph001: choose the image its points "
                                     "are on as the input volume")
    assert session.addReviewedCase().startswith("Case added: ceph003 (Whole 2D image), 3 in the table. Flagged and "
                                                "not moved (kept as detected): ")
