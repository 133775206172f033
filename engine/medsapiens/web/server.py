"""`medsapiens web`: the front door. Each browser that opens it gets a session process of its own (app.py: its
own MRML scene, cases, temporary folder and engine worker), started on a free port of the same host and the
browser sent there; a session that crashes takes nobody else's work, or this server, with it.

Listens on 127.0.0.1 unless told otherwise; any other address is said, in one line, to let anyone who can reach
the port use it. At most WebSettings.max_sessions sessions run at once.
"""
from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from medsapiens import InputError, api

SETTINGS = api.WEB_DEFAULTS
START_TIMEOUT = 180.0  # s for a session process to listen (it loads Slicer's libraries and VTK first)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_extra() -> None:
    """One line when the `web` extra is not installed."""
    absent = [m for m in ("trame_slicer", "slicer", "aiohttp") if importlib.util.find_spec(m) is None]
    if absent:
        raise InputError(f"the web front end needs the `web` extra ({', '.join(absent)} missing): "
                         "pip install 'medsapiens[web]'")


def exposure_warning(host: str, port: int) -> str | None:
    if host in LOOPBACK:
        return None
    return (f"medsapiens web: listening on {host}:{port}: anyone who can reach this port can open images, run "
            "jobs and use this server's processors; there is no login")


class Sessions:
    """The session processes of this server, each with its port and log file."""

    def __init__(self, host: str, data_dir: Path | None):
        self.host, self.data_dir = host, data_dir
        self.logs = Path(tempfile.mkdtemp(prefix="medsapiens-web-logs-"))
        self.running: list[tuple[subprocess.Popen, int]] = []

    async def start(self) -> int:
        """A new session process; its port once it listens. InputError (one line) when it cannot start."""
        self.running = [(p, port) for p, port in self.running if p.poll() is None]
        if len(self.running) >= SETTINGS.max_sessions:
            raise InputError(f"{len(self.running)} sessions are open, the most this server runs at once; close one "
                             "or try again later")
        port = _free_port(self.host)
        log = self.logs / f"session-{port}.log"
        command = [sys.executable, "-m", "medsapiens.web.app", "--host", self.host, "--port", str(port)]
        if self.data_dir:
            command += ["--data", str(self.data_dir)]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running.append((process, port))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await _listening(self.host, port):
            if process.poll() is not None or loop.time() > deadline:
                process.kill()
                lines = log.read_text(errors="replace").strip().splitlines()
                raise InputError(f"the session could not start: {lines[-1] if lines else 'no output'}")
            await asyncio.sleep(0.25)
        return port

    def stop(self) -> None:
        for process, _ in self.running:
            process.terminate()
        for process, _ in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def serve(host: str = "127.0.0.1", port: int = 8080, data_dir: Path | None = None) -> int:
    """Run the front door until interrupted: GET / starts a session and redirects the browser to it."""
    check_extra()
    if data_dir is not None and not Path(data_dir).is_dir():
        raise InputError(f"--data {data_dir}: not a folder")
    from aiohttp import web

    sessions = Sessions(host, data_dir)

    async def new_session(request):
        try:
            session_port = await sessions.start()
        except InputError as e:
            return web.Response(status=503, text=f"medsapiens web: {e}\n")
        raise web.HTTPFound(f"http://{request.url.host}:{session_port}/")

    app = web.Application()
    app.router.add_get("/", new_session)
    warning = exposure_warning(host, port)
    if warning:
        print(warning, file=sys.stderr)
    print(f"medsapiens web: open http://{host}:{port}/ in a browser", file=sys.stderr, flush=True)
    try:
        web.run_app(app, host=host, port=port, print=None)
    finally:
        sessions.stop()
    return 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def _listening(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
    except OSError:
        return False
    writer.close()
    return True
