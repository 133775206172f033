"""What a clinician does with the released head model in the panel: pick "MedSapiens head (ISBI 19)" from the
model list, Detect on a cephalogram loaded by Slicer's volume reader, see the analysis table. The release is the
one the shared `release` fixture writes (mmengine checkpoints in the authors' zip layout), served by
its Drive-like local server (conftest.py); the detection runs in the real engine worker process."""
import pytest
from MedSapiensSlicerLib.analysis import analysisRows
from MedSapiensSlicerLib.logic import MedSapiensLogic
from MedSapiensSlicerLib.worker_client import EngineWorker


@pytest.mark.slow
def test_pick_the_head_model_detect_and_see_the_analysis(hub, scene, ceph, tmp_path, ceph_volume):
    from medsapiens import api
    from medsapiens.analysis.cephalometry import MEASURE_NAMES

    choices = api.models()
    name = next(n for n, display in choices.items() if display == "MedSapiens head (ISBI 19)")
    assert api.needs_download(name), "asked before the first download"
    worker = EngineWorker()  # started after the hub's environment is set, as Slicer's would be on first use
    try:
        logic = MedSapiensLogic(scene, worker)
        volume, _ = ceph_volume(scene, 0, tmp_path, annotated=False)
        job = logic.wait(logic.startDetect(volume, model=name, device="cpu"), timeout=600)
        assert job.error is None, job.error
        node = logic.finishDetect(job)
    finally:
        worker.shutdown()
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    assert labels == ceph.names
    rows = analysisRows(node)
    assert [r.measure for r in rows] == list(MEASURE_NAMES)
    assert all(r.value_text and r.normal_range and r.class_number in (1, 2, 3, 4) for r in rows), rows
    assert not api.needs_download(name), "downloaded once, then kept"
