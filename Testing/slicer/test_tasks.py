"""BackgroundTask, as the panel uses it: a real fine-tune on a worker thread, progress drained by polling, Cancel."""
import time

from MedSapiensSlicerLib.logic import MedSapiensLogic
from MedSapiensSlicerLib.tasks import BackgroundTask


def drain(task, until, timeout=120):
    seen, t0 = [], time.monotonic()
    while not until(seen) and time.monotonic() - t0 < timeout:
        seen += task.poll()
        time.sleep(0.02)
    return seen


def test_result_and_error_reach_the_polling_thread():
    task = BackgroundTask(lambda x, progress, cancel: (progress(0.5), x * 2)[1], 21)
    seen = drain(task, lambda s: task.done)
    assert task.done and task.result == 42 and task.error is None and seen == [0.5]
    task = BackgroundTask(int, "not a number", with_callbacks=False)
    drain(task, lambda s: task.done)
    assert isinstance(task.error[0], ValueError) and "Traceback" in task.error[1]


def test_cancel_stops_a_real_finetune_and_keeps_the_previous_adapter(tmp_path, fitted_file, ceph):
    from medsapiens.training.loops import Cancelled

    out = tmp_path / "task.safetensors"
    out.write_bytes(b"previous adapter")
    case = ceph.case(0)
    task = BackgroundTask(MedSapiensLogic.finetune, [case], fitted_file, out, steps=100000, time_budget=None,
                          views_per_case=2, lora_blocks=1, device="cpu")
    seen = drain(task, lambda s: any(p.phase == "train" and p.step >= 2 for p in s))
    assert any(p.phase == "views" for p in seen), "progress while the views are made"
    task.cancel()
    task.wait(60)
    drain(task, lambda s: task.done, timeout=10)
    assert task.done and isinstance(task.error[0], Cancelled)
    assert out.read_bytes() == b"previous adapter" and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert task.elapsed > 0
