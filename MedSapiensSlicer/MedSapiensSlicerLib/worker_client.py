"""The application's side of the engine worker (medsapiens.worker): a process of Slicer's own Python, started
on first use and kept warm, so the loaded model stays between clicks and engine work never runs in Slicer.

A reader thread puts the worker's replies on a queue and does nothing else; the main thread calls `poll()`
(the widget's QTimer does) to apply them to the Jobs. No Qt here, so it is tested as it is. Cancel asks the
worker to stop; if it has not stopped CANCEL_GRACE seconds later, the process is killed (files are written
atomically, so a previous adapter stays as it was either way). A worker that dies is reported on its jobs in one
line and started again by the next request.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from medsapiens.worker import protocol

CANCEL_GRACE = 2.0  # s from Cancel until the worker is killed if it has not stopped by itself
LOG_NAME = "worker.log"


def worker_python() -> str:
    """Slicer's own interpreter (as SlicerMONAIAuto3DSeg finds it); this one outside Slicer."""
    return shutil.which("PythonSlicer") or sys.executable


class Job:
    """One request as the main thread sees it: progress, then result, error or cancelled (`done`)."""

    def __init__(self, id: int, kind: str, context=None):
        self.id, self.kind, self.context = id, kind, context  # context: what the caller needs to finish the job
        self.started = time.monotonic()
        self.fraction, self.message = 0.0, ""
        self.items: list[dict] = []  # a batch's outcome per image, in the order they came (protocol "item")
        self.done = self.cancelled = False
        self.result: dict | None = None
        self.error: str | None = None
        self.cancel_requested: float | None = None  # monotonic time of Cancel

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class EngineWorker:
    def __init__(self, python: str | None = None):
        self.python = python or worker_python()
        self.folder: Path | None = None  # this session's files (requests, results, the worker's log)
        self.pid: int | None = None  # set by the worker's ready message
        self._process: subprocess.Popen | None = None
        self._replies: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._files = itertools.count(1)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def newFile(self, stem: str, suffix: str = ".npz") -> Path:
        """A new path in this session's folder (the folder is made on first use and removed by shutdown)."""
        return self._folder() / f"{stem}-{next(self._files)}{suffix}"

    def writeCase(self, case, stem: str = "case") -> str:
        """A copy of the case (pixels, geometry, landmarks) in a new file of the session folder, for a request."""
        return protocol.write_case(self.newFile(stem), case)

    @staticmethod
    def readLandmarks(path):
        return protocol.read_landmarks(path)

    def start(self) -> None:
        if self.running:
            return
        env = dict(os.environ)
        engine_root = str(Path(importlib.util.find_spec("medsapiens").origin).parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_root, env.get("PYTHONPATH")) if p)
        log = open(self._folder() / LOG_NAME, "ab")
        self._process = subprocess.Popen([self.python, "-m", "medsapiens.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, cwd=str(self.folder), env=env,
                                         creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # Windows
        log.close()
        self._replies = queue.Queue()  # replies of an earlier process are not mixed in
        threading.Thread(target=_read_replies, args=(self._process, self._replies), name="medsapiens-replies",
                         daemon=True).start()

    def submit(self, kind: str, context=None, **fields) -> Job:
        """Send a request (starting the worker if needed); its replies reach the Job through poll()."""
        self.start()
        job = Job(next(self._ids), kind, context)
        self._jobs[job.id] = job
        if not self._send({"id": job.id, "kind": kind, **fields}):
            self._finish(job, error=self._stopped_message())
        return job

    def cancel(self, job: Job) -> None:
        if job.done or job.cancel_requested is not None:
            return
        job.cancel_requested = time.monotonic()
        job.message = "cancelling"
        self._send({"kind": "cancel", "id": job.id})

    def poll(self) -> list[Job]:
        """Apply the replies that arrived; kill a worker that ignores Cancel. Returns the jobs that changed."""
        changed = {}
        while True:
            try:
                reply = self._replies.get_nowait()
            except queue.Empty:
                break
            if reply["kind"] == "exit":
                for job in self._pending():
                    self._finish(job, error=self._stopped_message())
                    changed[job.id] = job
                continue
            if reply["kind"] == "ready":
                self.pid = reply.get("pid")
            job = self._jobs.get(reply.get("id"))
            if job is None or job.done:
                continue
            changed[job.id] = job
            if reply["kind"] == "progress":
                job.fraction, job.message = reply.get("fraction", job.fraction), reply.get("message", "")
            elif reply["kind"] == "item":
                job.items.append(_fields(reply))
            elif reply["kind"] == "result":
                self._finish(job, result=_fields(reply))
            elif reply["kind"] == "cancelled":
                self._finish(job, cancelled=True)
            else:
                self._finish(job, error=reply.get("message") or "the engine worker failed")
        for job in self._pending():
            if job.cancel_requested is not None and time.monotonic() - job.cancel_requested > CANCEL_GRACE:
                self._kill()
                self._finish(job, cancelled=True)
                job.message = "cancelled (the worker was stopped)"
                changed[job.id] = job
        return list(changed.values())

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker (asking first, then killing) and remove this session's files."""
        if self.running:
            self._send({"kind": "shutdown"})
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None
        for job in self._pending():
            self._finish(job, cancelled=True)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    # --------------------------------------------------------------------------------------------- internals
    def _folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="medsapiens-"))
        return self.folder

    def _send(self, message: dict) -> bool:
        if not self.running:
            return False
        try:
            self._process.stdin.write(protocol.encode(message).encode("utf-8"))
            self._process.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def _pending(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.done]

    def _finish(self, job: Job, result=None, error=None, cancelled=False) -> None:
        job.done, job.result, job.error, job.cancelled = True, result, error, cancelled
        if result is not None:
            job.fraction = 1.0
        del self._jobs[job.id]

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def _stopped_message(self) -> str:
        code = self._process.poll() if self._process is not None else None
        self._process = None
        last = ""
        if self.folder is not None and (self.folder / LOG_NAME).exists():
            lines = (self.folder / LOG_NAME).read_text(errors="replace").strip().splitlines()
            last = f": {lines[-1].strip()}" if lines else ""
        return f"the engine worker stopped unexpectedly (exit code {code}){last}; it restarts with the next request"


def _fields(reply: dict) -> dict:
    """A reply's content, without its id and kind."""
    return {k: v for k, v in reply.items() if k not in ("id", "kind")}


def _read_replies(process: subprocess.Popen, replies: queue.Queue) -> None:
    """Reader thread: the worker's stdout lines onto the queue; an 'exit' entry when it closes."""
    for line in process.stdout:
        try:
            replies.put(protocol.decode(line))
        except ValueError:
            continue  # not a protocol line; the worker sends its prints to its log, so this should not happen
    process.wait()
    replies.put({"kind": "exit", "code": process.returncode})
