"""Engine work on a thread of the application's process vs in the engine worker process, while the main thread
holds the GIL the way Slicer's main thread can (PythonQt's event loop: here 50 ms of libc usleep called through
ctypes.PyDLL, which keeps the GIL, then a little Python that drains the replies, repeated).

    python benchmarks/slicer_gil.py [--repeats 3] [--detections atlas heatmap]

Two detections: the weight-free atlas (2 phantom atlases, a phantom radiograph: mostly long SimpleITK calls) and a
micro heatmap model (random weights: time does not depend on them) on cephalogram 011 (many short torch
operations). For each design, with the main thread free (sleeping without the GIL) and holding it: median seconds
of --repeats runs and the held / free ratio. "thread" runs the engine on a threading.Thread of this process, with a
queue and a poll (what a module without a worker process would do); "worker" the engine worker process.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensSlicer"))

LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))  # PyDLL: the GIL stays held during the call
TURN_US = 50_000


def held_turn():
    LIBC.usleep(TURN_US)


def free_turn():
    time.sleep(TURN_US / 1e6)


def on_thread(case, request, turn) -> float:
    from medsapiens import api

    replies: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    threading.Thread(target=lambda: replies.put(api.detect(case, **request)), daemon=True).start()
    while True:
        turn()
        try:
            replies.get_nowait()
            return time.monotonic() - t0
        except queue.Empty:
            pass


def in_worker(worker, case, request, turn) -> float:
    t0 = time.monotonic()
    atlas = [worker.writeCase(a) for a in request["atlas"]] if request.get("atlas") else None
    job = worker.submit("detect", case=worker.writeCase(case), out=str(worker.newFile("found")),
                        **{**request, "atlas": atlas})
    while not job.done:
        turn()
        worker.poll()
    if job.error:
        raise RuntimeError(job.error)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detections", nargs="+", choices=["atlas", "heatmap"], default=["atlas", "heatmap"])
    args = parser.parse_args()
    import torch
    from medsapiens.io.datasets import Dataset
    from medsapiens.models.weight_files import save_trained
    from medsapiens.models.sapiens import SapiensPose
    from medsapiens.phantom import phantom_case
    from MedSapiensSlicerLib.worker_client import EngineWorker

    worker = EngineWorker()
    ceph = Dataset(Path(args.data) / "ceph_hamedan" / "landmarks.csv")
    torch.manual_seed(0)
    micro = save_trained(worker.newFile("micro", ".safetensors"), SapiensPose("micro", len(ceph.names), (16, 12)),
                         ceph.names, (256, 192), 3.0)
    detections = {"atlas": ("atlas, phantom", phantom_case(100), {"atlas": [phantom_case(s) for s in range(2)]}),
                  "heatmap": ("micro heatmap, ceph 011", ceph.case(10), {"model": str(micro), "device": "cpu"})}
    try:
        print("| detection | design | main thread free (s) | main thread holding the GIL (s) | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for label, case, request in (detections[d] for d in args.detections):
            designs = {"thread": lambda turn: on_thread(case, request, turn),
                       "worker": lambda turn: in_worker(worker, case, request, turn)}
            for name, run in designs.items():
                run(free_turn)  # imports and first-use costs, outside the timing
                free = statistics.median(run(free_turn) for _ in range(args.repeats))
                held = statistics.median(run(held_turn) for _ in range(args.repeats))
                print(f"| {label} | {name} | {free:.2f} | {held:.2f} | {held / free:.1f} |", flush=True)
    finally:
        worker.shutdown()


if __name__ == "__main__":
    main()
