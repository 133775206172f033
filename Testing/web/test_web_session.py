"""The page's session without a browser: a WebSession on trame-slicer's real Slicer application (its own MRML
scene and readers). The server folder is offered by name only and a name outside it is refused; an image and its
points uploaded together become the input and the annotated points, and Add case takes them."""
import pytest

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
