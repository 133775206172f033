"""The worker's loop: requests from stdin, run one at a time through medsapiens.api, replies on stdout.

A reader thread reads stdin all the time, so `cancel` reaches a running request at once (the engine checks the
flag every training step and between stages), and `shutdown` or the end of stdin (the application closed or
died) stops the worker. The protocol owns the real stdout; whatever the engine or a library prints goes to
stderr. A new request kind is one more entry in HANDLERS: fn(request, progress, cancel) -> result fields, where
progress(Progress) reports and progress.item(**fields) sends one image's outcome of a batch.
"""
from __future__ import annotations

import io
import os
import queue
import sys
import threading
import traceback
from pathlib import Path

from .. import Volume, api
from ..errors import Cancelled, InputError
from ..progress import within
from . import protocol


def detect(request: dict, progress, cancel) -> dict:
    case = protocol.read_case(request["case"])
    found = api.detect(case, request.get("model"), adapter=request.get("adapter"), atlas=_atlas(request),
                       deformable=_deformable(request), device=request.get("device"),
                       precision=request.get("precision", "auto"), progress=progress, cancel=cancel)
    return {"landmarks": protocol.write_landmarks(request["out"], found)}


def detect_batch(request: dict, progress, cancel) -> dict:
    """One detector on many images, each image's outcome an item reply as soon as it is done (see protocol):
    the application's images ("cases"), or files and folders ("files") through api.detect_files as the command
    line runs it."""
    inputs = api.check_images(request["files"], out=request["out"]) if "files" in request else None  # before loading
    detector = api.load_detector(request.get("model"), adapter=request.get("adapter"), atlas=_atlas(request),
                                 atlas_deformable=_deformable(request), device=request.get("device"),
                                 precision=request.get("precision", "auto"), progress=within(progress, 0.0, 0.05),
                                 cancel=cancel)
    out, images = Path(request["out"]), within(progress, 0.05, 1.0)
    if inputs is not None:
        done = api.detect_files(detector, inputs, out, progress=images, cancel=cancel,
                                on_error=lambda line: progress.item(error=line),
                                on_image=lambda item, path: progress.item(name=item.id, file=str(path)))
        return {"images": done.images, "failed": done.failed, "written": [str(p) for p in done.written]}
    out.mkdir(parents=True, exist_ok=True)
    failed = api.detect_many(
        detector, request["cases"], read=protocol.read_case, progress=images, cancel=cancel,
        on_found=lambda n, case, found: progress.item(index=n, landmarks=protocol.write_landmarks(out / f"{n}.npz",
                                                                                                   found)),
        on_error=lambda n, line: progress.item(index=n, error=line))
    return {"images": len(request["cases"]), "failed": failed}


def _deformable(request: dict) -> bool | None:
    """The atlas's B-spline stage: always where the request asks for it, else where its cases show it better."""
    return True if request.get("deformable") else None


def _atlas(request: dict):
    """The atlas cases a detect request sends (None: a model or an adapter detects)."""
    return [protocol.read_case(p) for p in request["atlas"]] if request.get("atlas") else None


def finetune(request: dict, progress, cancel) -> dict:
    """On a base model, or on the atlas (no base; "unannotated": more images for it to label): then the result
    also carries api.adapter_info of the new adapter (its held-out estimate and the cases it has seen), so the
    application need not read the file."""
    cases = [protocol.read_case(p) for p in request["cases"]]
    unannotated = [protocol.read_case(p) for p in request.get("unannotated", [])]
    result = api.finetune(request.get("base"), cases, request["out"], unannotated=unannotated,
                          device=request.get("device"), progress=progress, cancel=cancel,
                          **request.get("settings", {}))
    return {"adapter": str(result.path),
            **({"info": api.adapter_info(result.path)} if request.get("base") is None else {})}


def report(request: dict, progress, cancel) -> dict:
    """The report of the case's image and landmarks (api.write_report): matplotlib draws it here, not in the
    application's process."""
    case = protocol.read_case(request["case"])
    if case.landmarks is None or isinstance(case, Volume):
        raise InputError(f"{request['case']}: a report needs a 2D case with its landmarks")
    files = api.write_report(request["out"], request.get("title", case.name), case.image, case.landmarks,
                             case.spacing, request.get("analysis", api.DEFAULT_ANALYSIS), request.get("source", "annotated"))
    return {"files": [str(f) for f in files]}


HANDLERS = {protocol.DETECT: detect, protocol.DETECT_BATCH: detect_batch, protocol.FINETUNE: finetune,
            protocol.REPORT: report}


class Replies:
    """What a running request says: called with a Progress, a progress reply; item(**fields), one image's
    outcome of a batch."""

    def __init__(self, server, rid):
        self._server, self._id = server, rid

    def __call__(self, p) -> None:
        self._server.send(id=self._id, kind=protocol.PROGRESS, fraction=round(float(p.fraction), 4),
                          message=p.message)

    def item(self, **fields) -> None:
        self._server.send(id=self._id, kind=protocol.ITEM, **fields)


class Server:
    def __init__(self, requests, replies):
        self._requests, self._replies = requests, replies
        self._send_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._cancel: dict = {}  # request id -> threading.Event, for requests queued or running

    def send(self, **message) -> None:
        with self._send_lock:
            self._replies.write(protocol.encode(message))
            self._replies.flush()

    def serve(self) -> int:
        threading.Thread(target=self._read, name="requests", daemon=True).start()
        self.send(kind=protocol.READY, pid=os.getpid())
        while (request := self._queue.get()) is not None:
            self._run(request)
        return 0

    def _read(self) -> None:
        for line in self._requests:
            if not line.strip():
                continue
            try:
                message = protocol.decode(line)
            except ValueError as e:
                self.send(kind=protocol.ERROR, id=None, message=f"bad request: {e}")
                continue
            rid = message.get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
                self.send(kind=protocol.ERROR, id=None, message=f"bad request: id {rid!r} is not a number or a string")
                continue
            if message["kind"] == protocol.CANCEL:
                event = self._cancel.get(message.get("id"))
                if event is not None:
                    event.set()
            elif message["kind"] == protocol.SHUTDOWN:
                break
            else:
                self._cancel[message.get("id")] = threading.Event()
                self._queue.put(message)
        for event in list(self._cancel.values()):  # shutdown, or the application went away: stop what runs
            event.set()
        self._queue.put(None)

    def _run(self, request: dict) -> None:
        rid = request.get("id")
        cancelled = self._cancel[rid]
        try:
            protocol.check_request(request)
            handler = HANDLERS[request["kind"]]
            if cancelled.is_set():
                raise Cancelled("cancelled before it started")
            self.send(id=rid, kind=protocol.RESULT, **handler(request, Replies(self, rid), cancelled.is_set))
        except Cancelled:
            self.send(id=rid, kind=protocol.CANCELLED)
        except Exception as e:  # the worker stays up for the next request; the trace goes to its log
            if not isinstance(e, InputError):
                traceback.print_exc(file=sys.stderr)
            self.send(id=rid, kind=protocol.ERROR, message=protocol.one_line(e))
        finally:
            self._cancel.pop(rid, None)


def main() -> int:
    replies = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", line_buffering=True)
    os.dup2(2, 1)  # prints of the engine and its libraries (C ones included) go to stderr, not the protocol
    sys.stdout = sys.stderr
    requests = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
    return Server(requests, replies).serve()
