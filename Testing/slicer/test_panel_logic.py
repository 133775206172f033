"""Every choice the panel makes, as PanelLogic makes it on a real MRML scene (slicer-core) with the real engine
worker: which view a choice names, what Detect runs for each model choice, what Fine-tune trains (the atlas's
refiner, learning from the other open images, or LoRA on a model), which atlas options apply, the question
before a download, and how a finished, failed or cancelled job reaches the panel's state and status line."""
from dataclasses import replace
from pathlib import Path

import pytest
import vtk
from medsapiens import InputError, api
from MedSapiensSlicerLib.logic import WHOLE_IMAGE, WHOLE_VOLUME
from MedSapiensSlicerLib.panel import LOCAL_FILE, PanelLogic, PanelState

FAST = {"steps": 40, "batch": 16, "patch": 32, "width": 8}  # the flow, not the accuracy: kept even if worse


@pytest.fixture
def logic(scene, engine_worker):
    logic = PanelLogic(scene, engine_worker)
    yield logic
    logic.shutdown()


def test_views_name_the_whole_image_the_whole_volume_or_a_slice_node_by_layout(logic, scene):
    app = scene.app
    import slicer

    red = slicer.vtkMRMLSliceLogic()
    red.SetMRMLApplicationLogic(app)
    red.SetMRMLScene(scene)
    node = red.AddSliceNode("Red")
    assert logic.viewFor(WHOLE_IMAGE) is None and logic.viewFor(WHOLE_VOLUME) == WHOLE_VOLUME
    assert logic.viewFor("Red").GetID() == node.GetID()
    with pytest.raises(InputError, match="no Yellow slice view"):
        logic.viewFor("Yellow")


def test_detect_options_follow_the_model_choice(logic, tmp_path, micro_file):
    p = PanelState()
    assert logic.detectOptions(p) == {"model": None, "atlas": True, "deformable": False}
    assert logic.detectOptions(replace(p, atlasDeformable=True))["deformable"]
    assert not logic.detectOptions(replace(p, atlasDeformable=True, view=WHOLE_VOLUME))["deformable"]
    assert logic.detectOptions(replace(p, atlasAdapter=str(tmp_path / "gone.safetensors")))["atlas"], \
        "an adapter file that is not there: the plain atlas"
    with pytest.raises(InputError, match="choose the model file"):
        logic.detectOptions(replace(p, model=LOCAL_FILE))
    local = replace(p, model=LOCAL_FILE, modelFile=str(micro_file), device="cpu", precision="fp32")
    assert logic.detectOptions(local) == {"model": str(micro_file), "adapter": None, "device": "cpu",
                                          "precision": "fp32"}
    with pytest.raises(InputError, match="a whole volume is detected by the atlas"):
        logic.detectOptions(replace(local, view=WHOLE_VOLUME))


def test_a_download_is_asked_about_first_and_only_for_catalogue_models_not_on_disk(logic, micro_file, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    name = next(n for n, display in api.models().items() if display == "MedSapiens head (ISBI 19)")
    question = logic.downloadQuestion(replace(PanelState(), model=name))
    assert question.startswith("Download\nMedSapiens head") and "http" in question and question.endswith("?")
    assert logic.downloadQuestion(PanelState()) is None  # the atlas downloads nothing
    assert logic.downloadQuestion(replace(PanelState(), model=LOCAL_FILE, modelFile=str(micro_file))) is None


def test_atlas_options_apply_to_the_2d_atlas_and_the_adapter_once_there_is_one(logic):
    p = PanelState()
    options = logic.atlasOptions(p)
    assert options.deformable and options.learnUnannotated and not options.useAdapter
    assert "Fine-tune with the atlas chosen" in options.useAdapterTip
    assert not logic.atlasOptions(replace(p, view=WHOLE_VOLUME)).deformable
    assert not logic.atlasOptions(replace(p, model=LOCAL_FILE)).learnUnannotated


@pytest.mark.slow
def test_finetune_on_the_atlas_then_detect_uses_the_adapter(logic, scene, ceph, tmp_path, monkeypatch, ceph_volume,
                                                            phantom_files):
    """The panel's Fine-tune with the atlas chosen: the refiner learns from the table and the other open image;
    finishing points Detect at the new adapter; the status lines say what happened; once the table holds another
    task's cases, Detect with that adapter is refused in one line."""
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache" / "models"))
    for i in (0, 1, 2):
        logic.addCase(*ceph_volume(scene, i, tmp_path))
    target, _ = ceph_volume(scene, 5, tmp_path, annotated=False)
    p = replace(PanelState(), adapterName="panel task", timeBudget=120.0)
    job = logic.startFinetuneFor(p, keep_worse=True, **FAST)
    logic.cancel(job)  # Cancel: nothing changes
    logic.wait(job)
    assert logic.finishJob(job, p) == "Cancelled; nothing was changed." and p.atlasAdapter == ""
    job = logic.wait(logic.startFinetuneFor(p, keep_worse=True, **FAST))  # the flow, whatever the accuracy
    assert job.error is None, job.error
    status = logic.finishJob(job, p)
    assert status == f"Adapter saved to {job.result['adapter']}; Detect with the atlas uses it."
    assert p.atlasAdapter == job.result["adapter"] and p.useAtlasAdapter
    assert job.result["info"]["unannotated_images"] == 1  # the open image without points
    assert logic.detectOptions(p) == {"model": None, "adapter": p.atlasAdapter}
    assert logic.atlasOptions(p).useAdapter and p.atlasAdapter in logic.atlasOptions(p).useAdapterTip
    assert [row[3] for row in logic.caseTable(p)] == ["seen", "seen", "seen"]
    p.inputVolume = target
    job = logic.wait(logic.startDetectFor(p))
    assert logic.finishJob(job, p).startswith("19 of 19 landmarks placed in 'ceph005 landmarks'")
    assert p.outputMarkups.GetAttribute("MedSapiens.Source") == f"atlas + adapter {Path(p.atlasAdapter).name}"
    logic.removeCases(range(3))  # another task's cases in the table: the adapter would find its own landmarks
    for seed in (0, 1):
        image, points = phantom_files(seed)
        volume = scene.logics["Volumes"].AddArchetypeVolume(str(image), image.stem, 4)  # 4: as one file
        logic.addCase(volume, scene.GetNodeByID(scene.logics["Markups"].LoadMarkups(str(points))))
    with pytest.raises(InputError, match=r"^the fine-tuned adapter finds S, N, Or, Po, A, \.\.\., but the table's "
                                         r"cases have Sella, .*: fine-tune again, or clear \"Use my fine-tuned adapter\"$"):
        logic.detectOptions(p)


def test_a_failed_job_is_its_one_line_and_changes_nothing(logic, scene, ceph, tmp_path, ceph_volume):
    volume, _ = ceph_volume(scene, 0, tmp_path, annotated=False)
    p = replace(PanelState(), inputVolume=volume, model=LOCAL_FILE, modelFile=str(tmp_path / "missing.pth"),
                device="cpu")
    job = logic.wait(logic.startDetectFor(p))
    status = logic.finishJob(job, p)
    assert status.startswith("Error: ") and "missing.pth" in status and "\n" not in status
    assert p.outputMarkups is None
    assert logic.jobStatus(job, "Detecting").startswith("Detecting: ")


@pytest.mark.slow
def test_fine_tune_with_a_model_trains_lora_on_it_and_selects_the_adapter(logic, scene, ceph, tmp_path, fitted_file,
                                                                         monkeypatch, ceph_volume):
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache" / "models"))
    logic.addCase(*ceph_volume(scene, 0, tmp_path))
    p = replace(PanelState(), model=LOCAL_FILE, modelFile=str(fitted_file), device="cpu", adapterName="lora task",
                timeBudget=3.0)
    job = logic.wait(logic.startFinetuneFor(p))
    assert job.error is None, job.error
    assert logic.finishJob(job, p) == f"Adapter saved to {job.result['adapter']} and selected."
    assert p.adapter == job.result["adapter"] and p.adapter.endswith("lora-task.safetensors")
    assert "info" not in job.result  # a LoRA adapter has no held-out estimate
    assert logic.detectOptions(p)["adapter"] == p.adapter


def test_the_case_table_lists_volume_points_plane_and_nothing_seen_without_an_adapter(logic, scene, ceph,
                                                                                       tmp_path, ceph_volume):
    logic.addCase(*ceph_volume(scene, 0, tmp_path))
    assert logic.caseTable(PanelState()) == [("ceph000", "points000", WHOLE_IMAGE, "")]
    marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "stray")
    marks.AddControlPoint(vtk.vtkVector3d(0, 0, 0), "S")
    assert len(logic.caseTable(PanelState())) == 1


def test_the_logic_stops_watching_the_scene_on_shutdown(scene, ceph, tmp_path, ceph_volume):
    """A case whose volume is deleted leaves the table while the logic watches the scene; after shutdown (the
    module closed) the logic no longer hears of the scene."""
    watching, closed = PanelLogic(scene), PanelLogic(scene)
    for i, logic in enumerate((watching, closed)):
        logic.addCase(*ceph_volume(scene, i, tmp_path))
    closed.shutdown()
    for logic in (watching, closed):
        scene.RemoveNode(scene.GetNodeByID(logic.cases[0].volumeID))
    assert watching.cases == [] and len(closed.cases) == 1


def test_unlocking_a_result_lets_every_point_be_dragged_and_locking_holds_them_again(logic, scene):
    import numpy as np
    from medsapiens import Landmarks

    found = Landmarks(["a", "b"], np.array([[3.0, 4.0, 1.0], [5.0, 6.0, 2.0]]), confidence=np.array([0.9, 0.1]))
    node = logic.writeLandmarks(found, None)
    assert [node.GetNthControlPointLocked(i) for i in range(2)] == [True, False]  # Detect locks what it trusts
    PanelLogic.setPointsLocked(node, False)
    assert not node.GetLocked() and not any(node.GetNthControlPointLocked(i) for i in range(2))
    PanelLogic.setPointsLocked(node, True)
    assert all(node.GetNthControlPointLocked(i) for i in range(2))
