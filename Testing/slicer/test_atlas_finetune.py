"""Fine-tune with the atlas chosen, as the panel runs it: the module logic on a real MRML scene, the real worker
process, real cephalograms loaded by Slicer's volume reader. The adapter lands in api.adapters_dir(), Detect
then uses it alone (atlas + refiner, its atlas cases inside), the held-out estimate reaches the logic and its
panel text, the scene's other 2D images are labelled by the atlas and learned from, the case table knows which
cases the adapter has seen, re-training after "Add case" warm-starts, Cancel in the atlas phase, while labelling
the other images and in training and a refiner worse than the atlas all leave the previous adapter byte for byte
as it was."""
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import vtk
from medsapiens import api
from medsapiens import load_detector
from medsapiens.models.weight_files import load_weights
from MedSapiensSlicerLib.logic import MedSapiensLogic
from MedSapiensSlicerLib.worker_client import EngineWorker

# small and quick (a few seconds per fold on 2 cores), and still better than the atlas on these 3 cases
FAST = {"steps": 150, "batch": 16, "patch": 32, "width": 8}
SUMMARY = re.compile(r"Expected error on unseen cases: adapter (\d+\.\d\d) mm, atlas (\d+\.\d\d) mm "
                     r"\(leave-one-case-out, (\d+) cases\); refined landmarks: (\d+) of 19\. Trained (\d+) steps in "
                     r"\d+ s(, also on (\d+) unannotated images labelled by the atlas)?"
                     r"(, continued from the previous adapter)?\."
                     r"( The atlas's B-spline stage \(flexible anatomy\) was kept: \d+\.\d\d mm against \d+\.\d\d mm "
                     r"without it on \d+ held-out cases\.)?"
                     r"( Points with P\(within 2 mm\) < \d\.\d\d are flagged \"check\": on the held-out cases \d+ % "
                     r"of the points, with \d+ of \d+ errors over 3 mm among them\.)")


def table(scene, ceph_volume, folder, worker, rows=(0, 1, 2)):
    logic = MedSapiensLogic(scene, worker)
    for i in rows:
        logic.addCase(*ceph_volume(scene, i, folder))
    return logic


@pytest.fixture(scope="module")
def engine_worker():
    """This module's worker, on one torch thread: on the shared 2-core test machine, under load, a second thread
    made these small networks 6x slower (114 s against 18 s for one fine-tune); the code run is the same."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("OMP_NUM_THREADS", "1")
        worker = EngineWorker()
        worker.start()
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def trained(module_scene, ceph, tmp_path_factory, engine_worker, ceph_volume):
    """An adapter fine-tuned on the atlas of 3 annotated cephalograms and one more open image through the logic
    (written where the panel writes it, under a temporary MEDSAPIENS_CACHE): (path, its bytes, the finished job)."""
    folder = tmp_path_factory.mktemp("atlas-finetune")
    logic = table(module_scene, ceph_volume, folder, engine_worker)
    ceph_volume(module_scene, 20, folder, annotated=False)
    unannotated = logic.unannotatedImages()
    assert [c.name for c in unannotated] == ["ceph020"]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MEDSAPIENS_CACHE", str(folder / "cache" / "models"))
        out = logic.adapterPath("ceph task", atlas=True)
        assert out.parent == api.adapters_dir()
    job = logic.wait(logic.startFinetune(None, out, unannotated=unannotated, **FAST), timeout=600)
    assert job.error is None and job.result["adapter"] == str(out)
    return out, out.read_bytes(), job


@pytest.mark.slow
def test_finetune_with_the_atlas_writes_an_adapter_and_its_estimate_reaches_the_panel(trained, module_scene):
    out, _, job = trained
    assert re.fullmatch(r"ceph-task\.atlas-[0-9a-f]{8}\.safetensors", out.name)
    info = job.result["info"]
    assert info == MedSapiensLogic.adapterInfo(out)  # what the worker sent = the file's header
    est = load_weights(out)[1]["estimate"]
    text = MedSapiensLogic.adapterSummary(info)
    match = SUMMARY.fullmatch(text)
    assert match, text
    assert float(match[1]) == round(est["refined_mre_mm"], 2) and float(match[2]) == round(est["atlas_mre_mm"], 2)
    assert int(match[3]) == 3 and int(match[4]) == sum(est["use_refined"]) and int(match[5]) == 3 * FAST["steps"]
    assert match[7] == "1" and info["unannotated_images"] == 1  # the open image the atlas labelled
    assert match[8] is None  # a first training
    assert (match[9] is not None) == info["atlas_stage"]["bspline"]  # the B-spline stage said only where kept
    lines = MedSapiensLogic.adapterLandmarks(info).splitlines()  # the tooltip: per landmark
    assert len(lines) == 19
    for line, (name, e), use in zip(lines, est["per_landmark"].items(), est["use_refined"]):
        assert line == f"{name}: adapter {e['refined_mm']:.2f} mm, atlas {e['atlas_mm']:.2f} mm " + \
            ("(refined)" if use else "(atlas kept)")
    assert est["refined_mre_mm"] <= est["atlas_mre_mm"]  # else it would not have been written
    assert [c["label"] for c in info["cases"]] == ["ceph000 (Whole 2D image)", "ceph001 (Whole 2D image)",
                                                   "ceph002 (Whole 2D image)"]
    # the progress the panel showed named the phases and the time left
    assert job.fraction == 1.0


@pytest.mark.slow
def test_detect_with_the_atlas_uses_the_adapter_alone(trained, scene, ceph, tmp_path, engine_worker, ceph_volume):
    """No model and no atlas cases sent: the adapter carries its atlas; the worker's landmarks are the refined
    ones the engine gives for the same image, and differ from its atlas's own on the refined landmarks."""
    out, _, job = trained
    logic = MedSapiensLogic(scene, engine_worker)  # an empty table: the adapter needs none
    volume, _ = ceph_volume(scene, 10, tmp_path, annotated=False)
    done = logic.wait(logic.startDetect(volume, adapter=str(out)), timeout=300)
    assert done.error is None, done.error
    node = logic.finishDetect(done)
    assert node.GetAttribute("MedSapiens.Source") == f"atlas + adapter {out.name}"
    ras = np.array([node.GetNthControlPointPositionWorld(i) for i in range(node.GetNumberOfControlPoints())])
    case, geometry = logic.caseFor(volume)
    refined, atlas_only = load_detector(adapter=str(out)).detect_both(case)
    names = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    assert names == refined.names
    expected = geometry.to_ras(refined.points)
    # the same pipeline twice (in two processes, with their own thread counts): ITK's threaded metric may move the
    # atlas a little, and the refiner's answer with it; within a pixel (0.254 mm) for most landmarks
    assert np.median(np.linalg.norm(ras - expected, axis=1)) < 0.254
    use = np.array([n in job.result["info"]["refined_landmarks"] for n in names])
    assert use.any() and not np.allclose(refined.points[use], atlas_only.points[use])
    assert np.allclose(refined.points[~use], atlas_only.points[~use])


@pytest.mark.slow
def test_the_table_shows_seen_cases_and_retraining_after_add_case_warm_starts(trained, scene, ceph, tmp_path,
                                                                              engine_worker, ceph_volume):
    out, original, _ = trained
    target = tmp_path / out.name
    target.write_bytes(original)
    logic = table(scene, ceph_volume, tmp_path, engine_worker)
    info = logic.adapterInfo(target)
    assert logic.adapterInfo(target) is info, "a panel update reads the header once per version of the file"
    assert logic.casesSeen(info) == [True, True, True]  # matched by content, in another scene
    logic.addCase(*ceph_volume(scene, 3, tmp_path))  # the correct-and-add flow: a 4th case
    assert logic.casesSeen(info) == [True, True, True, False]
    points = scene.GetNodeByID(logic.cases[0].markupsID)
    p = points.GetNthControlPointPosition(0)
    points.SetNthControlPointPosition(0, p[0] + 1.0, p[1], p[2])  # a corrected point: not what it saw
    assert logic.casesSeen(info) == [False, True, True, False]
    points.SetNthControlPointPosition(0, *p)
    assert logic.casesSeen(info)[0]
    assert logic.adapterPath("ceph task", atlas=True).name == out.name  # same task and landmarks: same file
    t0 = time.monotonic()
    job = logic.wait(logic.startFinetune(None, target, **FAST), timeout=600)
    assert job.error is None, job.error
    new = job.result["info"]
    assert new["warm_started"] and new["cases_estimated"] == 4
    assert logic.adapterInfo(target) == new, "the file the fine-tune replaced is read again"
    assert new["steps"] <= info["steps"] // 2, "a fold more, and still at most half the first run's steps"
    assert logic.casesSeen(new) == [True] * 4
    assert SUMMARY.fullmatch(logic.adapterSummary(new))[8]  # says it continued from the previous adapter
    print(f"warm re-training on 4 cases: {time.monotonic() - t0:.1f} s ({new['steps']} steps)")


@pytest.mark.parametrize("phase", ["atlas of the other cases", "atlas labelling the unannotated images",
                                   "training network"])
@pytest.mark.slow
def test_cancel_keeps_the_previous_adapter_byte_identical(trained, scene, ceph, tmp_path, engine_worker, phase,
                                                          ceph_volume):
    out, original, _ = trained
    target = tmp_path / out.name
    target.write_bytes(original)
    logic = table(scene, ceph_volume, tmp_path, engine_worker)
    if phase.startswith("atlas labelling"):
        for i in (20, 21):
            ceph_volume(scene, i, tmp_path, annotated=False)
    job = logic.startFinetune(None, target, unannotated=logic.unannotatedImages(), **{**FAST, "steps": 100000})
    deadline = time.monotonic() + 300
    while not job.message.startswith(phase):
        assert not job.done and time.monotonic() < deadline, job.error
        time.sleep(0.02)
        logic.poll()
    at = job.message
    logic.cancel(job)
    logic.wait(job, timeout=30)
    assert job.cancelled and job.error is None and job.result is None, at
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors" or ".part" in p.name] == [target.name]


@pytest.mark.slow
def test_a_refiner_worse_than_the_atlas_is_one_line_and_the_previous_adapter_stays(trained, scene, ceph, tmp_path,
                                                                                   engine_worker, ceph_volume):
    """A learning rate of 1000 scatters the refined points: worse than the atlas on the held-out cases, so the
    fine-tune ends in one line that says so, and the previous adapter (and with it Detect) stays as it was."""
    out, original, _ = trained
    target = tmp_path / out.name
    target.write_bytes(original)
    logic = table(scene, ceph_volume, tmp_path, engine_worker)
    job = logic.wait(logic.startFinetune(None, target, **{**FAST, "steps": 8, "lr": 1000.0}), timeout=600)
    assert job.result is None and not job.cancelled
    assert "\n" not in job.error
    assert re.fullmatch(r"the fine-tuned adapter was not better than the atlas on held-out cases \(adapter "
                        r"\d+\.\d\d mm, atlas \d+\.\d\d mm, leave-one-case-out on 3 cases\); nothing was saved and "
                        r"the previous detector is kept", job.error), job.error
    assert target.read_bytes() == original
    assert logic.adapterInfo(target) == {**MedSapiensLogic.adapterInfo(out), "path": str(target)}


def test_the_other_open_2d_images_are_the_unannotated_ones(scene, ceph, tmp_path, ceph_volume):
    """Not the table's own images, not label maps, not 3D volumes; and none when the table holds slices of a
    volume (the open 2D images may be another task)."""
    logic = table(scene, ceph_volume, tmp_path, None, rows=(0, 1))
    other, _ = ceph_volume(scene, 20, tmp_path, annotated=False)
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(other.GetImageData())
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 8)
    data.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(data)
    images = logic.unannotatedImages()
    assert [c.name for c in images] == ["ceph020"]
    case, _ = logic.caseFromVolume2D(other)
    assert np.array_equal(images[0].image, case.image) and np.allclose(images[0].pixel_to_lps, case.pixel_to_lps)
    logic.cases[1] = replace(logic.cases[1], plane="Red: axial slice")
    assert logic.unannotatedImages() == []
