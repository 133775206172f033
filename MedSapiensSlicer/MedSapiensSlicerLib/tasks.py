"""Long engine work on a worker thread, reported through a queue that the GUI drains on its own thread.

The worker never touches Qt or MRML objects: it calls a plain function and puts (kind, value) messages in a
queue; the widget's QTimer calls `poll()` and updates the panel. Cancel sets a flag the function checks.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback


class BackgroundTask:
    """Run fn(*args, progress=self.report, cancel=self.cancelled, **kwargs) (or without them) on a thread."""

    def __init__(self, fn, *args, with_callbacks: bool = True, **kwargs):
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.started = time.monotonic()
        self.result = self.error = None
        self.done = False
        if with_callbacks:
            kwargs = {**kwargs, "progress": self.report, "cancel": self.cancelled}
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self._queue.put(("result", fn(*args, **kwargs)))
        except BaseException as e:  # handed to the GUI thread, which shows it
            self._queue.put(("error", (e, traceback.format_exc())))

    def report(self, value) -> None:
        """Called by the worker with anything the GUI should show (e.g. a training.Progress)."""
        self._queue.put(("progress", value))

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> list:
        """Progress values reported since the last poll; sets `done` with `result` or `error` at the end."""
        values = []
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                return values
            if kind == "progress":
                values.append(value)
            else:
                self.done = True
                self.result, self.error = (value, None) if kind == "result" else (None, value)

    def wait(self, timeout=None) -> None:
        self._thread.join(timeout)
