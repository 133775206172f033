"""Shared fixtures: the real data sets beside the repository (required where MEDSAPIENS_REQUIRE_DATA=1, as in
CI), small real models, real MRML scenes, and the MedSapiens release served by a local stand-in for Google Drive."""
import http.server
import json
import os
import threading
import urllib.parse
import uuid
import zipfile
from importlib import resources
from pathlib import Path

import medsapiens  # noqa: F401  (first: it sets torch's OpenMP wait policy before torch loads)
import numpy as np
import pytest
import torch
from medsapiens.io.checksum import sha256_of

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSAPIENS_DATA") or REPO.parent / "shared" / "data")  # the shared data sets


def _without_data(reason: str):
    """Skip where the shared data are absent; fail instead where they are required (CI sets the variable)."""
    if os.environ.get("MEDSAPIENS_REQUIRE_DATA", "") not in ("", "0"):
        pytest.fail(f"{reason} (MEDSAPIENS_REQUIRE_DATA is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "ceph_hamedan" / "landmarks.csv").is_file():
        _without_data(f"the shared data sets are not at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ceph(data_dir):
    from medsapiens.io.datasets import Dataset

    return Dataset(data_dir / "ceph_hamedan" / "landmarks.csv")


@pytest.fixture(scope="session")
def mouse(data_dir):
    from medsapiens.io.datasets import Dataset

    path = data_dir / "mouse_ct" / "landmarks.csv"
    if not path.is_file():
        _without_data("the mouse micro-CT set is not in ../shared/data")
    return Dataset(path)


def overfit(model, case, input_hw, steps=60, lr=3e-3, sigma=3.0):
    """Train `model` on one real case for a few steps (real warp, codec and loss) so its peaks mean something."""
    from medsapiens.detectors.heatmap import image_tensor, normalise
    from medsapiens.models.codec import UDPCodec
    from medsapiens.models.warp import (
        apply_affine,
        image_box,
        udp_warp_matrix,
        warp_image,
    )

    wh = input_hw[::-1]
    codec = UDPCodec(wh, (wh[0] // 4, wh[1] // 4), sigma=sigma)
    center, scale = image_box(*case.size)
    m = udp_warp_matrix(center, scale, 0.0, wh)
    x = normalise(warp_image(image_tensor(case, "cpu"), m, wh))
    target, weight = codec.encode(apply_affine(m, case.landmarks.points), case.landmarks.present)
    target, weight = torch.from_numpy(target)[None], torch.from_numpy(weight)[None, :, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = (((model(x) - target) ** 2) * weight).mean() * 1000
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def fitted_micro(ceph):
    """A micro model fitted to ceph case 001 at 256 x 192 (19 landmarks)."""
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    model = SapiensPose("micro", len(ceph.names), (16, 12))
    return overfit(model, ceph.case(0), (256, 192), steps=500, lr=2e-3)


@pytest.fixture(scope="session")
def fitted_file(tmp_path_factory, fitted_micro, ceph):
    """fitted_micro saved as this project's model file."""
    from medsapiens.models.weight_files import save_trained

    path = tmp_path_factory.mktemp("model") / "ceph_micro.safetensors"
    return save_trained(path, fitted_micro, ceph.names, (256, 192), 3.0)


@pytest.fixture(scope="session")
def micro_file(tmp_path_factory, ceph):
    """An untrained micro model for the ceph landmarks (seeded), as a model file: for tests of plumbing and
    timing, where what the weights say does not matter and training one would only cost time."""
    from medsapiens.models.weight_files import save_trained
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    model = SapiensPose("micro", len(ceph.names), (16, 12))
    return save_trained(tmp_path_factory.mktemp("model") / "ceph_micro_untrained.safetensors", model, ceph.names,
                        (256, 192), 3.0)


def case_files(folder, stem: str, case):
    """(stem.nrrd, stem.mrk.json): an annotated 2D case as a user has it on disk, its image with its pixel spacing
    and its points (written once per folder and stem)."""
    import numpy as np
    import SimpleITK as sitk
    from medsapiens.io.markups import write_markups

    paths = folder / f"{stem}.nrrd", folder / f"{stem}.mrk.json"
    if not paths[0].exists():
        image = sitk.GetImageFromArray(np.asarray(case.image))
        image.SetSpacing(tuple(float(s) for s in case.spacing))
        sitk.WriteImage(image, str(paths[0]))
        write_markups(paths[1], case.landmarks, case)
    return paths


@pytest.fixture(scope="session")
def write_case_files():
    """case_files, for the fixtures of the folders below that write other cases."""
    return case_files


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """files(seed) -> (image.nrrd, image.mrk.json): a phantom radiograph (0.5 mm pixels) and its true points."""
    from medsapiens import api

    folder = tmp_path_factory.mktemp("phantoms")
    return lambda seed: case_files(folder, f"phantom{seed}", api.phantom_case(seed))


def occlude(case, k: int, half: int = 40):
    """A copy of a 2D case with noise over landmark k's neighbourhood (2 half px a side): a point no atlas can
    match, which the review rule must flag, whatever stage the atlas chose."""
    from dataclasses import replace

    import numpy as np

    image = np.array(case.image)
    x, y = np.round(case.landmarks.points[k]).astype(int)
    rows, cols = slice(max(y - half, 0), y + half), slice(max(x - half, 0), x + half)
    image[rows, cols] = np.random.default_rng(k).integers(0, 256, image[rows, cols].shape).astype(image.dtype)
    return replace(case, image=image)


@pytest.fixture(scope="session")
def occluded():
    """occlude, for the tests that need a point worth checking."""
    return occlude


def new_scene():
    """A real MRML scene from slicer-core (Slicer's libraries, no application), with the logics Slicer sets up."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    logics = {"Markups": slicer.vtkSlicerMarkupsLogic(), "Volumes": slicer.vtkSlicerVolumesLogic()}
    for name, logic in logics.items():
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene.logics = logics  # kept alive with the scene
    scene.app = app
    return scene


@pytest.fixture
def scene():
    """new_scene(), cleared after the test."""
    scene = new_scene()
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="module")
def module_scene():
    """new_scene() shared by one test module (for a fixture that is costly to make once per test)."""
    scene = new_scene()
    yield scene
    scene.Clear(True)


# ------------------------------------------------------------------ the MedSapiens release, served locally
DRIVE_ID = "1Nxes7MczB3dNvA2JMtGXcSEUEk8gQg4F"
MEMBERS = {"generalist": "checkpoints/med_sapien/best_EPE_epoch_199.pth",  # where the release zip holds them
           "head": "checkpoints/med_sapien/head/best_EPE_epoch_190.pth"}
PRETRAIN = "sapiens_0.3b_epoch_1600_clean.pth"


def save_with_mmengine(path, state_dict, names):
    """What mmengine's CheckpointHook writes: meta (with mmpose's dataset_meta), state_dict, message_hub with
    HistoryBuffer log records, the AdamW state and the warm-up + step schedulers, saved by mmengine itself."""
    mmengine = pytest.importorskip("mmengine")
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import LinearLR, MultiStepLR
    from mmengine.runner.checkpoint import save_checkpoint

    params = [torch.nn.Parameter(v.detach().clone()) for v in state_dict.values()]
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=0.1)
    sum((p ** 2).sum() for p in params).backward()
    optimizer.step()  # a real AdamW state (exp_avg, exp_avg_sq, step)
    wrapper = OptimWrapper(optimizer)
    schedulers = [LinearLR(wrapper, start_factor=0.001, begin=0, end=500, by_epoch=False),
                  MultiStepLR(wrapper, milestones=[170, 200], gamma=0.1, begin=0, end=210, by_epoch=True)]
    hub = MessageHub.get_instance(f"release-{uuid.uuid4()}")
    for step in range(3):
        hub.update_scalar("train/loss", 0.01 / (step + 1))
        hub.update_scalar("val/EPE", np.float64(1.2 + step))
    hub.update_info("epoch", 199)
    dataset_meta = {"dataset_name": "x-ray", "num_keypoints": len(names),
                    "keypoint_id2name": dict(enumerate(names)), "keypoint_name2id": {n: i for i, n in enumerate(names)},
                    "flip_indices": list(range(len(names))), "flip_pairs": [],
                    "keypoint_colors": np.zeros((len(names), 3), np.uint8),
                    "sigmas": np.full(len(names), 0.00463, np.float32),
                    "dataset_keypoint_weights": np.ones(len(names), np.float32)}
    checkpoint = {"meta": {"epoch": 199, "iter": 5000, "cfg": "model = dict(type='TopdownPoseEstimator')",
                           "seed": 0, "experiment_name": "lora_med_sapiens", "mmengine_version": mmengine.__version__,
                           "dataset_meta": dataset_meta},
                  "state_dict": state_dict, "message_hub": hub.state_dict(), "optimizer": wrapper.state_dict(),
                  "param_schedulers": [s.state_dict() for s in schedulers]}
    save_checkpoint(checkpoint, str(path))
    return path


@pytest.fixture(scope="session")
def release(tmp_path_factory, fitted_micro, ceph):
    """The release zip (generalist: 88 channels, the head's 19 = the fitted model; head specialist), the base."""
    root = tmp_path_factory.mktemp("release")
    g = torch.Generator().manual_seed(5)
    fitted = {k: v.detach().clone() for k, v in fitted_micro.state_dict().items()}
    lora, base = {}, {k[len("backbone."):]: v for k, v in fitted.items() if k.startswith("backbone.")}
    for i in range(2):
        for name, out, r in (("qkv", 192, 4), ("proj", 64, 8)):
            down, up = torch.randn(r, 64, generator=g) * 0.2, torch.randn(out, r, generator=g) * 0.2
            lora[f"backbone.module.layers.{i}.attn.{name}.lora_down.weight"] = down
            lora[f"backbone.module.layers.{i}.attn.{name}.lora_up.weight"] = up
            base[f"layers.{i}.attn.{name}.weight"] = base[f"layers.{i}.attn.{name}.weight"] - up @ down
    base["pos_embed"] = torch.cat([torch.randn(1, 1, 64, generator=g), base["pos_embed"]], dim=1)
    base["cls_token"] = torch.randn(1, 1, 64, generator=g)
    torch.save(base, root / PRETRAIN)
    head = {k: v for k, v in fitted.items() if k.startswith("head.")}
    head88 = dict(head)
    for p in ("weight", "bias"):
        rest = torch.randn(88 - 19, *head[f"head.final_layer.{p}"].shape[1:], generator=g) * 0.01
        head88[f"head.final_layer.{p}"] = torch.cat([head[f"head.final_layer.{p}"], rest])
    names88 = [f"P{i}" for i in range(88)]
    files = {"generalist": save_with_mmengine(root / "generalist.pth", {**lora, **head88}, names88),
             "head": save_with_mmengine(root / "head.pth", {**lora, **head}, [f"L{i}" for i in range(19)])}
    bare = root / "head_bare.pth"
    torch.save({**lora, **head}, bare)
    zip_path = root / "checkpoints.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for kind, path in files.items():
            z.write(path, MEMBERS[kind])
    return {"root": root, "zip": zip_path, "files": files, "bare": bare, "base": root / PRETRAIN,
            "sha": {kind: sha256_of(p) for kind, p in files.items()}, "members": MEMBERS, "drive_id": DRIVE_ID}


class DriveLike(http.server.BaseHTTPRequestHandler):
    """`/uc?id=` answers with Drive's virus-scan page (a form with confirm + uuid); `/download` serves the file
    (HTTP Range supported; `cut` bytes then a dropped connection when asked); `/hf/NAME` serves plain files."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.server.state
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        st["log"].append((url.path, query, self.headers.get("Range")))
        if url.path == "/uc":
            page = (f'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
                    f'<form id="download-form" action="/download" method="get">'
                    f'<input type="submit" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{query["id"]}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="{st["uuid"]}"></form></body></html>').encode()
            return self._send(200, page, "text/html; charset=utf-8")
        if url.path == "/download":
            if query.get("confirm") != "t" or query.get("uuid") != st["uuid"]:
                return self._send(403, b"no", "text/plain")
            return self._send_file(st["files"][query["id"]])
        if url.path.startswith("/hf/"):
            return self._send_file(st["files"][url.path[4:]])
        self._send(404, b"", "text/plain")

    def _send(self, code, body, kind):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, data: bytes):
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.server.state.pop("cut", None)
        self.wfile.write(data[start:start + cut] if cut else data[start:])
        self.close_connection = bool(cut)


@pytest.fixture
def hub(tmp_path, release, monkeypatch):
    """The local server, and a catalogue mirror: the shipped models.json with its URLs pointed at the server."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DriveLike)
    httpd.state = {"uuid": str(uuid.uuid4()), "log": [],
                   "files": {DRIVE_ID: release["zip"].read_bytes(), PRETRAIN: release["base"].read_bytes()}}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    data = json.loads((resources.files("medsapiens.models") / "models.json").read_text(encoding="utf-8"))
    for m in data["models"]:
        if m["source"]["kind"] == "google-drive":
            m["source"]["url"] = f"{url}/uc?export=download&id={DRIVE_ID}"
        elif m["name"] == "sapiens-0.3b-pretrain":
            m["source"]["url"] = f"{url}/hf/{PRETRAIN}"
    mirror = tmp_path / "models.json"

    def write(**pins):
        for m in data["models"]:
            m["sha256"] = pins.get(m["name"], m["sha256"])
        mirror.write_text(json.dumps(data))

    write()
    monkeypatch.setenv("MEDSAPIENS_CATALOGUE", str(mirror))
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDSAPIENS_OFFLINE", raising=False)
    httpd.pin = write
    yield httpd
    httpd.shutdown()
