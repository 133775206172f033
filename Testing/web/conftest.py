"""The web front end's fixtures: `medsapiens web` running as its own process, and a headless Chromium (Debian's
`chromium`, driven by Playwright; no browser is downloaded). Phantom cases as files: ../conftest.py."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_web():
    """Skip (fail where MEDSAPIENS_REQUIRE_WEB=1, as in CI) without the web extra, Playwright or chromium."""
    import importlib.util

    absent = [what for module, what in (("trame_slicer", "the web extra (pip install 'medsapiens[web]')"),
                                        ("playwright", "Playwright (pip install 'medsapiens[webtest]')"))
              if importlib.util.find_spec(module) is None]
    if CHROMIUM is None:
        absent.append("chromium (apt-get install chromium)")
    if absent:
        reason = f"not installed: {', '.join(absent)}"
        pytest.fail(f"{reason} (MEDSAPIENS_REQUIRE_WEB is set)") if os.environ.get("MEDSAPIENS_REQUIRE_WEB", "") \
            not in ("", "0") else pytest.skip(reason)


@pytest.fixture(scope="session")
def ceph_files(tmp_path_factory, ceph, write_case_files):
    """files(i) -> (ceph<i>.nrrd, ceph<i>.mrk.json): cephalogram i of the shared data set (its 0.254 mm pixels)
    and its reference points, the ISBI 2015 landmarks."""
    folder = tmp_path_factory.mktemp("cephs")
    return lambda i: write_case_files(folder, f"ceph{i + 1:03d}", ceph.case(i))


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """`medsapiens web` on a free port of 127.0.0.1: (its URL, its process). The engine workers of its sessions
    run on one torch thread (the shared 2-core test machine)."""
    _need_web()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("web") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "medsapiens.cli", "web", "--port", str(port)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5)
        except urllib.error.HTTPError:
            break  # it answers (404 for a page it does not serve)
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"medsapiens web did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/", server
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser():
    _need_web()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()
