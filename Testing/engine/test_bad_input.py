"""Bad input as a new user gives it, through the command line and through the worker: every case ends in one line
that names the file (or the request) and the problem, with the documented exit status, and never a traceback."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from medsapiens.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, ceph):
    """The bad files: unreadable, truncated, empty, 1 x 1 and 40000 x 10 images, a header-only CSV, a folder that
    cannot be made (under a plain file)."""
    root = tmp_path_factory.mktemp("bad")
    png = (ceph.root / ceph.rows[0].image).read_bytes()
    (root / "unreadable.png").write_bytes(b"hello, not an image")
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "empty.png").write_bytes(b"")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 1), np.uint8)), str(root / "tiny.png"))
    strip = np.random.default_rng(0).integers(0, 255, (10, 40000)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(strip), str(root / "strip.png"))
    (root / "header.csv").write_text(ceph.path.read_text().splitlines()[0] + "\n")
    (root / "plain-file").write_text("a file, not a folder")
    (root / "model.pth").write_text("not a model")
    return root


def cli_cases(root, ceph, model):
    atlas = ["--atlas", str(ceph.path), "--atlas-cases", "001"]
    image = str(ceph.root / ceph.rows[1].image)
    detect = lambda *a: ["detect", *atlas, *map(str, a), "--out", str(root / "out")]  # noqa: E731
    return [  # (what, arguments, exit status: 1 an image of the batch failed, 2 bad input; what the line says)
        ("unreadable image", detect(root / "unreadable.png"), 1, "unreadable.png: not a readable image (not an "
                                                                  "image format it reads"),
        ("truncated image", detect(root / "truncated.png"), 1, "truncated.png: not a readable image (the file is "
                                                                "damaged or cut short)"),
        ("empty image", detect(root / "empty.png"), 1, "empty.png: not a readable image (the file is empty)"),
        ("1 x 1 image", detect(root / "tiny.png"), 1, "tiny.png: image is too small (1 x 1 px)"),
        ("40000 x 10 image", detect(root / "strip.png"), 1, "strip.png: the image is 40000 x 10 px; finding "
                                                             "landmarks needs at least 32 px along each side"),
        ("NaN spacing", detect(image) + ["--spacing", "nan"], 2, "--spacing nan: must be a positive number of mm"),
        ("header-only CSV", ["detect", "--atlas", str(root / "header.csv"), image, "--out", str(root / "o")], 2,
         "header.csv: no data rows"),
        ("unknown case ids", ["detect", "--atlas", str(ceph.path), "--atlas-cases", "001,999", image, "--out",
                              str(root / "o")], 2, "no rows for 999"),
        ("missing model file", ["detect", str(root / "absent.pth"), image, "--out", str(root / "o")], 2,
         "absent.pth: neither a file nor a catalogue model"),
        ("a model file that is text", ["detect", str(root / "model.pth"), image, "--out", str(root / "o")], 2,
         "model.pth: not a PyTorch checkpoint"),
        ("a model of another landmark set", ["detect", str(model), image, "--landmarks", "A,B", "--out",
                                             str(root / "o")], 2, "not the expected set of 2 (A, B)"),
        ("too few cases", ["finetune", "--data", str(ceph.path), "--cases", "001", "--out",
                           str(root / "a.safetensors")], 2, "needs at least 2 annotated cases"),
        ("output folder that cannot be made", ["detect", *atlas, image, "--out", str(root / "plain-file" / "out")],
         2, "plain-file/out: cannot make the output folder (Not a directory)"),
        ("landmarks no analysis reads", ["analyze", str(ceph.root.parent / "hand_dha" / "landmarks.csv"), "--out",
                                         str(root / "x.csv")], 2, "no cephalometric measure can be computed"),
        ("rows that select nothing", ["evaluate", "--atlas", str(ceph.path), "--atlas-cases", "001", "--data",
                                      str(ceph.path), "--rows", "500:", "--out", str(root / "r")], 2,
         "--rows 500:: selects no rows"),
    ]


def test_the_command_line_answers_bad_input_in_one_line(files, ceph, micro_file, capsys):
    for what, args, status, message in cli_cases(files, ceph, micro_file):
        assert main(args) == status, what
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medsapiens:")]
        assert len(ours) == 1 and ours[0].startswith("medsapiens: error: ") and message in ours[0], (what, ours)


@pytest.mark.slow
def test_no_traceback_reaches_the_terminal(files, ceph, micro_file):
    """The same in real processes, for those where Python, ITK or libpng could print their insides."""
    cases = {what: (args, status, message) for what, args, status, message in cli_cases(files, ceph, micro_file)}
    for what in ("40000 x 10 image", "output folder that cannot be made", "truncated image",
                 "a model file that is text"):
        args, status, message = cases[what]
        run = subprocess.run([sys.executable, "-m", "medsapiens.cli", *args], capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        ours = [line for line in lines if line.startswith("medsapiens:")]  # libpng may write its own line before
        assert run.returncode == status and len(ours) == 1 and ours[0] == lines[-1] and message in ours[0], lines
        assert "Traceback" not in run.stderr
        assert ".cxx" not in run.stderr and "0x" not in run.stderr, "no ITK source paths or addresses"


def test_the_worker_answers_garbage_requests_in_one_line_and_stays_up(tmp_path):
    worker = subprocess.Popen([sys.executable, "-m", "medsapiens.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    requests = [  # (line, the error it gets)
        ("not json", "bad request: not JSON: not json"),
        ("[1, 2]", "bad request: not a protocol message: [1, 2]"),
        ('{"kind": 5}', 'bad request: not a protocol message: {"kind": 5}'),
        ('{"id": [1], "kind": "detect"}', "bad request: id [1] is not a number or a string"),
        ('{"id": 1, "kind": "detect"}', "detect request without 'case'"),
        ('{"id": 2, "kind": "detect", "case": 5, "out": "o.npz"}', "detect request: 'case' is int, not str"),
        (json.dumps({"id": 3, "kind": "detect", "case": str(tmp_path / "gone.npz"), "out": "o.npz"}),
         f"{tmp_path / 'gone.npz'}: no such file"),
        ('{"id": 4, "kind": "finetune", "cases": ["a.npz"], "out": "a", "settings": "fast"}',
         "finetune request: 'settings' is str, not dict"),
        ('{"id": 5, "kind": "finetune", "cases": [1, 2], "out": "a"}', "finetune request: 'cases' must list file "
                                                                       "paths"),
        ('{"id": 6, "kind": "segment"}', "unknown request 'segment' (known: detect, detect_batch, finetune, "
                                         "report)"),
        ('{"id": 7, "kind": "report", "out": "a.html"}', "report request without 'case'"),
        ('{"id": 8, "kind": "detect_batch", "out": "o"}', "detect_batch request: give either 'cases' or 'files'"),
        ('{"id": 9, "kind": "detect_batch", "files": ["a"], "cases": [], "out": "o"}',
         "detect_batch request: give either 'cases' or 'files'"),
        ('{"id": 10, "kind": "detect_batch", "files": [3], "out": "o"}', "detect_batch request: 'files' must list "
                                                                         "file paths"),
    ]
    try:
        assert json.loads(worker.stdout.readline())["kind"] == "ready"
        for line, error in requests:
            worker.stdin.write(line + "\n")
            worker.stdin.flush()
            reply = json.loads(worker.stdout.readline())
            assert reply["kind"] == "error" and reply["message"] == error, (line, reply)
        worker.stdin.write('{"kind": "shutdown"}\n')
        worker.stdin.flush()
        assert worker.wait(30) == 0
        assert "Traceback" not in worker.stderr.read()
    finally:
        worker.kill()
