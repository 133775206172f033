"""The web front end end to end in a headless Chromium: `medsapiens web` started as a user starts it, pages
driven by clicks, uploads and mouse drags: a clinician's session on phantom radiographs (upload 3 annotated
cases, Cancel a fine-tune, fine-tune with a short budget, detect on a fourth, the points seen in Slicer's
rendered slice view, one dragged, the points downloaded, a crashed worker reported and replaced), with a second
browser's session meanwhile that does not see the first's cases and refuses a bad upload in one line. One test:
a session process costs seconds of CPU to start."""
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.web, pytest.mark.slow]
SPACING, SIZE = 0.5, (320, 400)  # the phantoms' mm per pixel and (width, height)


def open_session(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True).new_page()
    page.set_default_timeout(60_000)
    page.goto(url, timeout=180_000)  # the front door starts this session's process, then redirects to it
    page.wait_for_selector("#status")
    return page


def wait_status(page, pattern: str, timeout: float = 60) -> str:
    page.wait_for_function("p => new RegExp(p).test(document.querySelector('#status').innerText)", arg=pattern,
                           timeout=timeout * 1000)
    return page.locator("#status").inner_text()


def upload(page, *paths) -> str:
    page.evaluate("document.querySelector('#status').innerText = ''")  # the reply replaces it
    page.set_input_files("input[type=file]", [str(p) for p in paths])
    return wait_status(page, ".")


def add_case(page, phantom_files, seed) -> str:
    assert upload(page, *phantom_files(seed)) == f"Opened phantom{seed}.nrrd, phantom{seed}.mrk.json."
    page.click("#add-case")
    return wait_status(page, f"^Case added: phantom{seed} ")


def points(page) -> dict:
    """The result points table: label -> (R, A, S)."""
    rows = page.locator("#points tr").all_inner_texts()
    return {cells[0]: tuple(float(c) for c in cells[1:4]) for cells in (r.split("\t") for r in rows)}


def view_image(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#view img.image-display-area").screenshot())).convert("RGB"),
                      dtype=np.int16)


def on_screen(page, ras) -> tuple[float, float]:
    """Where a point of the phantom image (world R, A) is drawn in the view: Slicer fits the whole image, centred."""
    box = page.locator("#view img.image-display-area").bounding_box()
    width, height = SIZE[0] * SPACING, SIZE[1] * SPACING
    scale = max(width / box["width"], height / box["height"])  # mm per screen pixel
    centre = (np.array(SIZE) - 1) * SPACING / 2
    x, y = -ras[0], -ras[1]  # LPS of the image plane = pixel x spacing
    return box["width"] / 2 + (x - centre[0]) / scale, box["height"] / 2 + (y - centre[1]) / scale


def save_screenshot(page, path: Path) -> None:
    """The page as a 256-colour PNG (the README's screenshot: MEDSAPIENS_WEB_SCREENSHOT=Screenshots/web.png)."""
    from PIL import Image

    Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(256).save(path, optimize=True)


def session_worker(page) -> int:
    """The pid of the engine worker of the session this page talks to (its process serves the page's port)."""
    port = re.search(r":(\d+)/", page.url)[1]
    procs = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(proc.name) if proc.name.isdigit() else -1] = (ppid, [c.decode(errors="replace") for c in cmdline])
    session = [pid for pid, (_, cmd) in procs.items() if "medsapiens.web.app" in cmd and port in cmd]
    assert len(session) == 1, session
    workers = [pid for pid, (ppid, cmd) in procs.items() if ppid == session[0] and "medsapiens.worker" in cmd]
    assert len(workers) == 1, workers
    return workers[0]


def test_a_clinicians_session_in_the_browser(web_server, browser, phantom_files, tmp_path):
    started = time.monotonic()
    url, server = web_server
    page = open_session(browser, url)
    for seed in range(3):
        assert add_case(page, phantom_files, seed).endswith(f"{seed + 1} in the table.")
    assert page.locator("#cases tr").count() == 3

    page.fill("#time-budget", "30")
    page.click("#finetune")
    wait_status(page, "^Fine-tuning: (?!starting)")  # the worker is running it
    page.click("#cancel")
    assert wait_status(page, "^Cancelled") == "Cancelled; nothing was changed."

    page.click("#finetune")
    page.wait_for_function("() => +document.querySelector('#progress').getAttribute('aria-valuenow') > 0")
    seen = {float(page.locator("#progress").get_attribute("aria-valuenow"))}  # progress is shown on the way
    another_session_keeps_its_own_cases(browser, url, page, phantom_files, tmp_path)  # while this one trains
    while not re.match(r"Adapter saved|Error", page.locator("#status").inner_text()):
        assert time.monotonic() - started < 600, page.locator("#status").inner_text()
        time.sleep(0.5)
    outcome = page.locator("#status").inner_text()
    assert re.match(r"Adapter saved to .*atlas-[0-9a-f]{8}\.safetensors; Detect with the atlas uses it\.$|"
                    r"Error: .*(atlas|better).*", outcome), outcome  # a refiner no better than the atlas is one line
    assert any(0 < f < 100 for f in seen), seen

    assert upload(page, phantom_files(3)[0]) == "Opened phantom3.nrrd."
    page.click("#detect")
    assert re.match(r"9 of 9 landmarks placed in 'phantom3 landmarks'", wait_status(page, "landmarks placed", 120))
    found = points(page)
    truth = json.loads(phantom_files(3)[1].read_text())["markups"][0]["controlPoints"]
    errors = [np.hypot(found[t["label"]][0] + t["position"][0], found[t["label"]][1] + t["position"][1])
              for t in truth]  # LPS -> RAS
    assert np.median(errors) < 3.0, errors

    time.sleep(1.5)  # the view's next frame
    shown = view_image(page)
    page.click("#show-points")
    time.sleep(1.5)
    hidden = view_image(page)
    page.click("#show-points")
    difference = np.abs(shown - hidden).max(axis=2)
    assert 0 < (difference > 60).mean() < 0.1  # the points and their labels, not the whole view
    for label, ras in found.items():  # a drawn point wherever a landmark is
        x, y = (int(round(c)) for c in on_screen(page, ras))
        assert difference[y - 4:y + 5, x - 4:x + 5].max() > 60, label

    page.click("#edit-points")
    label, before = "Vertex", found["Vertex"]
    box = page.locator("#view img.image-display-area").bounding_box()
    x, y = on_screen(page, before)
    page.mouse.move(box["x"] + x, box["y"] + y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + x + 4 * step, box["y"] + y, steps=2)
    page.mouse.up()
    deadline, last, after = time.monotonic() + 30, None, before
    while (after == before or after != last) and time.monotonic() < deadline:  # moved, and settled
        time.sleep(0.5)
        last, after = after, points(page)[label]
    mm_per_pixel = max(SIZE[0] * SPACING / box["width"], SIZE[1] * SPACING / box["height"])
    assert abs((before[0] - after[0]) - 40 * mm_per_pixel) < 2.0 and abs(after[1] - before[1]) < 2.0, (before, after)

    with page.expect_download() as download:
        page.click("#download-points")
    document = json.loads(Path(download.value.path()).read_text())
    saved = {p["label"]: p["position"] for p in document["markups"][0]["controlPoints"]}
    assert len(saved) == 9 and abs(-saved[label][0] - after[0]) < 0.1  # as dragged, in LPS
    save_screenshot(page, Path(os.environ.get("MEDSAPIENS_WEB_SCREENSHOT") or tmp_path / "web.png"))

    worker = session_worker(page)
    page.click("#detect")
    os.kill(worker, signal.SIGKILL)
    assert "the engine worker stopped unexpectedly" in wait_status(page, "^Error: ", 60)
    page.click("#detect")  # a fresh worker
    wait_status(page, "9 of 9 landmarks placed", 120)
    assert session_worker(page) != worker and server.poll() is None  # the server went on
    page.context.close()


def another_session_keeps_its_own_cases(browser, url, page, phantom_files, tmp_path):
    """A second browser gets a session of its own: none of the first's cases, its own table; a bad upload there
    is refused in one line."""
    other = open_session(browser, url)
    assert other.url != page.url  # its own session process
    assert other.locator("#cases tr").count() == 0
    assert other.locator("#status").inner_text().startswith("Upload an image")
    assert add_case(other, phantom_files, 1).endswith("1 in the table.")  # not 4: the first's cases are not here
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    line = upload(other, notes)
    assert line == "notes.txt: not an image (PNG, JPEG, NRRD, NIfTI, DICOM) or a Slicer markups file (.mrk.json)"
    assert other.locator("#cases tr").count() == 1 and page.locator("#cases tr").count() == 3
    other.context.close()
