"""Detect on many images from the panel, on a real MRML scene (slicer-core) with the real engine worker: every
open image gets a NEW markups node named after it as soon as it is done (the user's nodes and the table's images
untouched), an image the engine refuses gets its line and the others go on, Cancel keeps what was done; a
folder is written as the command line writes it, with its damaged file named in one line."""
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from medsapiens import InputError
from MedSapiensSlicerLib.logic import WHOLE_VOLUME
from MedSapiensSlicerLib.panel import PanelLogic, PanelState

SINGLE_FILE = 4  # vtkSlicerVolumesLogic's loading option
pytestmark = pytest.mark.slow  # each test detects on phantom radiographs in the worker (a few seconds each)


@pytest.fixture
def logic(scene, engine_worker, phantom_files):
    """The panel's logic with two annotated phantom radiographs in its table (read by Slicer's own readers)."""
    logic = PanelLogic(scene, engine_worker)
    for seed in (0, 1):
        logic.addCase(*load(scene, *phantom_files(seed)))
    yield logic
    logic.shutdown()


def load(scene, image, points=None):
    """Slicer's volume reader (as one file: it reads numbered files of a folder as a series otherwise) and its
    markups reader."""
    volume = scene.logics["Volumes"].AddArchetypeVolume(str(image), image.stem, SINGLE_FILE)
    if points is None:
        return volume
    return volume, scene.GetNodeByID(scene.logics["Markups"].LoadMarkups(str(points)))


def tiny_image(folder):
    """A 20 x 20 image: the engine finds no landmarks on anything under 32 px a side, and says so."""
    path = folder / "tiny.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20), 7, np.uint16)), str(path))
    return path


def results(scene) -> list:
    """The markups nodes detection made (they record their source)."""
    return [n.GetName() for n in scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
            if n.GetAttribute("MedSapiens.Source")]


def test_every_open_image_gets_its_own_new_node_and_a_bad_one_its_line(logic, scene, phantom_files, tmp_path):
    for seed in (10, 12):
        load(scene, phantom_files(seed)[0])
    load(scene, tiny_image(tmp_path))
    mine = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "phantom10 landmarks")  # the user's own
    mine.AddControlPoint(vtk.vtkVector3d(1, 2, 0), "S")
    p = PanelState()
    job = logic.startDetectAllFor(p)
    seen = []  # the results in the scene whenever the job was not done yet

    def step():
        time.sleep(0.02)
        if not job.done:
            seen.append(len(results(scene)))

    logic.wait(job, step=step)
    assert max(seen) >= 1, "the first image's node came while the others were still being detected"
    status = logic.finishJob(job, p)
    assert status.splitlines() == [
        "Detected on 2 of 3 images: 2 new markups nodes (phantom10 landmarks_1, phantom12 landmarks).",
        "Not detected: tiny: the image is 20 x 20 px; finding landmarks needs at least 32 px along each side"]
    assert p.outputMarkups.GetName() == "phantom10 landmarks_1"
    assert mine.GetNumberOfControlPoints() == 1 and mine.GetNthControlPointLabel(0) == "S", "never overwritten"
    table = {row.markupsID for row in logic.cases}
    names = [n.GetName() for n in scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode") if n.GetID() not in table]
    assert names == ["phantom10 landmarks", "phantom10 landmarks_1", "phantom12 landmarks"], \
        "one per open image, none for the table's annotated images"
    for seed, name in ((10, "phantom10 landmarks_1"), (12, "phantom12 landmarks")):
        node = scene.GetFirstNodeByName(name)
        truth = json.loads(phantom_files(seed)[1].read_text())["markups"][0]["controlPoints"]
        ras = np.array([node.GetNthControlPointPositionWorld(i) for i in range(node.GetNumberOfControlPoints())])
        lps = np.array([c["position"] for c in truth])  # the phantom's true points, LPS
        assert [node.GetNthControlPointLabel(i) for i in range(len(truth))] == [c["label"] for c in truth]
        assert np.median(np.linalg.norm(ras * [-1, -1, 1] - lps, axis=1)) < 3.0  # mm; pixels of 0.5 mm
        assert node.GetAttribute("MedSapiens.Source") == "atlas"
        flagged = [i for i in range(len(truth)) if "check" in node.GetNthControlPointDescription(i)]
        assert all(not node.GetNthControlPointLocked(i) for i in flagged), "points to check are left unlocked"
    assert logic.review.node.GetName() == "phantom10 landmarks_1", "the first result is under review"
    p.outputMarkups = scene.GetFirstNodeByName("phantom12 landmarks")  # reviewed, then Add as case
    assert logic.addReviewedCase(p).startswith("Case added: phantom12 (Whole 2D image), 3 in the table.")
    assert logic.cases[-1].case.image.shape[:2] == (400, 320), "the whole image, read again from its node"


def test_cancel_keeps_the_images_done_and_stops_the_rest(logic, scene, phantom_files):
    for seed in (10, 12, 13):
        load(scene, phantom_files(seed)[0])
    p = PanelState()
    job = logic.startDetectAllFor(p)
    while not job.items and not job.done:  # the first image is done: Cancel
        time.sleep(0.02)
        logic.poll()
    logic.cancel(job)
    logic.wait(job)
    assert job.cancelled
    done = len(job.context["nodes"])
    assert 1 <= done < 3
    assert logic.finishJob(job, p).startswith(f"Cancelled after {done} image{'s' * (done > 1)}; kept: "
                                              f"{done} new markups node")
    assert len(results(scene)) == done


def test_a_folder_is_written_as_the_command_line_writes_it(logic, scene, phantom_files, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in (10, 12):
        (folder / f"p{seed}.nrrd").write_bytes(phantom_files(seed)[0].read_bytes())
    (folder / "p11.nrrd").write_bytes(b"damaged")
    p = replace(PanelState(), batchFolder=str(folder))
    with pytest.raises(InputError, match="^choose an output folder for the .mrk.json files and landmarks.csv$"):
        logic.startDetectFolderFor(p)
    p.batchOutput = str(tmp_path / "found")
    job = logic.wait(logic.startDetectFolderFor(p))
    status = logic.finishJob(job, p).splitlines()
    assert status[0] == f"Detected on 2 of 3 images: 2 .mrk.json files and landmarks.csv in {tmp_path / 'found'}."
    assert status[1].startswith(f"Not detected: {folder / 'p11.nrrd'}: not a readable NRRD file") and len(status) == 2
    assert sorted(f.name for f in (tmp_path / "found").iterdir()) == ["landmarks.csv", "p10.mrk.json", "p12.mrk.json"]
    node = scene.GetNodeByID(scene.logics["Markups"].LoadMarkups(str(tmp_path / "found" / "p12.mrk.json")))
    assert node.GetNumberOfControlPoints() == 9  # Slicer reads what the worker wrote
    assert p.outputMarkups is None, "a folder's results stay files"


def test_what_a_batch_takes_is_said_in_one_line(logic, scene, phantom_files):
    p = replace(PanelState(), view="Red")
    with pytest.raises(InputError, match='^Detect on all open images takes whole images: choose "Whole 2D image" or '
                                         r'"Whole volume \(3D\)" under Analyse$'):
        logic.startDetectAllFor(p)
    with pytest.raises(InputError, match="^no open 2D images to detect on besides the table's annotated ones$"):
        logic.startDetectAllFor(PanelState())
    with pytest.raises(InputError, match="^choose the folder of images to detect on$"):
        logic.startDetectFolderFor(PanelState())
    volume = load(scene, phantom_files(10)[0])
    assert logic.batchImages() == [volume] and logic.batchImages(wholeVolumes=True) == []
    with pytest.raises(InputError, match="^no open 3D volumes to detect on"):
        logic.startDetectAllFor(replace(PanelState(), view=WHOLE_VOLUME))
