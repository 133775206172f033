"""The released MedSapiens models, end to end against a local stand-in for Google Drive and Hugging Face.

The test writes a release like the authors' (checkpoints saved through mmengine's own API, zipped under
`checkpoints/med_sapien/...`, a flat pretrain base), serves it with a Drive-like confirm page, and runs the
real catalogue entries on a shared cephalogram. The model is the micro architecture fitted to case 001
(conftest): its backbone is split into a base and LoRA matrices, so the LoRA path carries real weights.
"""
import argparse
import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
import uuid
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch
from medsapiens import InputError, load_detector
from medsapiens.cli import main
from medsapiens.io.checksum import sha256_of
from medsapiens.models.build import build_model
from medsapiens.models.catalogue import PIN_ON_FIRST_DOWNLOAD, catalogue, choices
from medsapiens.models.checkpoints import read_checkpoint
from medsapiens.models.download import add_local, cached_path, resolve

DRIVE_ID = "1Nxes7MczB3dNvA2JMtGXcSEUEk8gQg4F"
GENERALIST = "checkpoints/med_sapien/best_EPE_epoch_199.pth"
HEAD = "checkpoints/med_sapien/head/best_EPE_epoch_190.pth"
PRETRAIN = "sapiens_0.3b_epoch_1600_clean.pth"
INPUT = (256, 192)  # the size the micro model was fitted at


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


@pytest.fixture(scope="module")
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
    files = {GENERALIST: save_with_mmengine(root / "generalist.pth", {**lora, **head88}, names88),
             HEAD: save_with_mmengine(root / "head.pth", {**lora, **head}, [f"L{i}" for i in range(19)])}
    bare = root / "head_bare.pth"
    torch.save({**lora, **head}, bare)
    zip_path = root / "checkpoints.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for member, path in files.items():
            z.write(path, member)
    return {"root": root, "zip": zip_path, "files": files, "bare": bare, "base": root / PRETRAIN,
            "sha": {m: sha256_of(p) for m, p in files.items()}}


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


def test_every_catalogue_entry_is_pinned_or_pins_at_first_download():
    entries = catalogue()
    assert {"medsapiens-generalist", "medsapiens-head", "medsapiens-hand", "medsapiens-chest", "medsapiens-legs",
            "sapiens-0.3b-pretrain"} <= set(entries)
    for e in entries.values():
        assert e.sha256 == PIN_ON_FIRST_DOWNLOAD or len(e.sha256) == 64, e.name
        assert e.source.url.startswith("https://"), e.name
    g = entries["medsapiens-generalist"]
    assert [len(s.names) for s in g.landmark_sets] == [19, 6, 37, 26]
    assert g.landmark_sets[0].names[:3] == ["S", "N", "Or"] and g.landmark_sets[0].names[-1] == "Ar"
    assert g.source.member == GENERALIST and DRIVE_ID in g.source.url and g.base == "sapiens-0.3b-pretrain"
    assert all(entries[n].base == "sapiens-0.3b-pretrain" and entries[n].flip_test
               for n in ("medsapiens-head", "medsapiens-hand", "medsapiens-chest", "medsapiens-legs"))
    shown = {c.name: c.display for c in choices()}
    assert shown["medsapiens-head"] == "MedSapiens head (ISBI 19)"
    assert shown["medsapiens-generalist:head"].endswith("head (ISBI 19)")
    assert shown["sapiens-0.3b-pretrain"].startswith("Sapiens 0.3b pretrain")  # what fine-tuning starts from


def test_drive_download_resumes_then_the_generalist_head_detects(hub, release, ceph, capsys):
    hub.state["cut"] = 5000  # the first transfer of the zip drops after 5000 bytes
    with pytest.raises(InputError, match="run again to resume"):
        resolve("medsapiens-generalist:head")
    path, choice = resolve("medsapiens-generalist:head")
    downloads = [(q, r) for p, q, r in hub.state["log"] if p == "/download"]
    assert downloads[-1][1] == "bytes=5000-", "the second attempt asks for the rest only"
    assert all(q["confirm"] == "t" and q["uuid"] == hub.state["uuid"] for q, _ in downloads)
    assert path == cached_path(choice.entry) and sha256_of(path) == release["sha"][GENERALIST]
    assert "SHA256" in capsys.readouterr().err  # pinned at first download, and said so
    # one download installs every model of the zip (each pinned); the zip itself is not kept
    assert sha256_of(cached_path(catalogue()["medsapiens-head"])) == release["sha"][HEAD]
    assert not any((path.parents[1] / "downloads").iterdir())

    detector = load_detector("medsapiens-generalist:head", input_size=INPUT, device="cpu", landmarks=ceph.names)
    assert detector.flip_test, "the release's test-time setting is the default"
    case = ceph.case(0)
    plain = load_detector("medsapiens-generalist:head", input_size=INPUT, flip_test=False).detect(case)
    found = detector.detect(case)
    truth = case.landmarks.points
    assert np.median(np.linalg.norm(plain.points - truth, axis=1)) < 10.0  # the fitted model, through LoRA + base
    assert np.median(np.linalg.norm(found.points - truth, axis=1)) < 25.0
    whole = load_detector("medsapiens-generalist", input_size=INPUT, flip_test=False)
    assert len(whole.names) == 88 and whole.names[:19] == ceph.names and whole.names[19] == "Chest_Point1"
    assert np.allclose(whole.detect(case).points[:19], plain.points, atol=1e-3), "the region is a slice of the 88"


def test_corrupted_downloads_are_refused(hub, release):
    hub.pin(**{"medsapiens-generalist": release["sha"][HEAD]})  # the zip's generalist will not match
    with pytest.raises(InputError, match="SHA256 .* expects"):
        resolve("medsapiens-generalist")
    assert not cached_path(catalogue()["medsapiens-generalist"]).exists()

    hub.pin(**{"medsapiens-generalist": release["sha"][GENERALIST]})
    data = bytearray(release["zip"].read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a member
    hub.state["files"][DRIVE_ID] = bytes(data)
    with pytest.raises(InputError, match="damaged zip|SHA256"):
        resolve("medsapiens-generalist")
    assert not cached_path(catalogue()["medsapiens-generalist"]).exists()


def test_offline_site_adds_the_zip_in_one_line(hub, release, monkeypatch, capsys, ceph):
    monkeypatch.setenv("MEDSAPIENS_OFFLINE", "1")
    with pytest.raises(InputError, match="models add"):
        resolve("medsapiens-head")
    assert main(["models", "add", str(release["zip"])]) == 0
    assert main(["models", "add", str(release["base"])]) == 0
    out = capsys.readouterr().out
    assert "medsapiens-generalist" in out and "medsapiens-head" in out and "sapiens-0.3b-pretrain" in out
    detector = load_detector("medsapiens-head", input_size=INPUT, flip_test=False, landmarks=ceph.names)
    assert detector.names == ceph.names
    # any other file becomes a user model, listed with the catalogue from then on
    assert add_local(release["bare"], name="my-ceph") == ["my-ceph"]
    assert main(["models"]) == 0
    assert "my-ceph" in capsys.readouterr().out
    assert resolve("my-ceph")[0].read_bytes() == release["bare"].read_bytes()


def test_mmengine_checkpoint_loads_safely_and_agrees_to_0_px(release, ceph):
    written = read_checkpoint(release["files"][HEAD])
    assert written.layout == "medsapiens" and written.landmark_names == [f"L{i}" for i in range(19)]
    case = ceph.case(1)
    found = {}
    for label, path in (("mmengine", release["files"][HEAD]), ("bare", release["bare"])):
        detector = load_detector(path, base=release["base"], input_size=INPUT, flip_test=False)
        found[label] = detector.detect(case).points
    assert np.array_equal(found["mmengine"], found["bare"])
    # reading needs no mmengine: its records come back as inert stand-ins
    code = ("import sys; from medsapiens.models.checkpoints import read_checkpoint; "
            f"c = read_checkpoint({str(release['files'][HEAD])!r}); assert 'mmengine' not in sys.modules, 'imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_pickled_object_outside_the_allow_list_is_refused_by_name(tmp_path, release):
    state = read_checkpoint(release["bare"]).tensors
    path = tmp_path / "best_EPE_epoch_1.pth"
    torch.save({"state_dict": state, "meta": {"args": argparse.Namespace(run="code")}}, path)
    with pytest.raises(InputError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "argparse.Namespace" in message and "best_EPE_epoch_1.pth" in message and "\n" not in message


def test_readme_argument_orders(tmp_path, release, ceph, capsys):
    image = str(ceph.root / ceph.rows[0].image)
    lora, base = str(release["bare"]), str(release["base"])
    common = ["--input-size", "256", "192", "--no-flip-test"]
    assert main(["detect", lora, "--base", base, image, "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["detect", lora, image, "--base", base, "--out", str(tmp_path / "b"), *common]) == 0
    from medsapiens.io.datasets import Dataset

    a, b = (Dataset(tmp_path / d / "landmarks.csv").rows[0].landmarks.points for d in "ab")
    assert np.array_equal(a, b)
    # the base as MODEL with the LoRA file as --adapter is the same model
    assert main(["detect", base, "--adapter", lora, image, "--out", str(tmp_path / "c"), *common]) == 0
    assert np.array_equal(Dataset(tmp_path / "c" / "landmarks.csv").rows[0].landmarks.points, a)
    capsys.readouterr()
    assert main(["detect", lora, image, "--out", str(tmp_path / "d"), *common]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["detect", base, "--adapter", lora, "--base", base, image, "--out", str(tmp_path / "e")]) == 2
    assert "not --adapter and --base together" in capsys.readouterr().err


def test_region_channels_are_the_generalist_rows(release):
    ckpt = read_checkpoint(release["files"][GENERALIST])
    base = read_checkpoint(release["base"])
    whole, head = build_model(ckpt, base), build_model(ckpt, base, channels=range(19))
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(head(x), whole(x)[:, :19], atol=1e-6)
    with pytest.raises(InputError, match="88 outputs"):
        build_model(ckpt, base, channels=[90])
