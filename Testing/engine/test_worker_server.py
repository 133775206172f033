"""The engine worker (`python -m medsapiens.worker`) over its real pipes, its file format, and the public API's
detector cache (a model re-written in place is loaded again)."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from medsapiens import Cancelled, Case, InputError, Landmarks, NotBetter, Volume, api
from medsapiens import load_detector
from medsapiens.models.weight_files import save_trained
from medsapiens.worker import protocol


def test_cases_and_landmarks_travel_as_plain_arrays(tmp_path):
    pixel_to_lps = np.array([[0.2, 0, 0, 5], [0, -0.3, 0, 6], [0, 0, 1, 7], [0, 0, 0, 1.0]])
    marks = Landmarks(["a", "b"], [[1.5, 2.5], [np.nan, np.nan]], [0.7, 0.0], [True, False], check=[True, False])
    case = Case(np.arange(12, dtype=np.uint16).reshape(3, 4), (0.2, 0.3), marks, name="ceph 1",
                pixel_to_lps=pixel_to_lps)
    back = protocol.read_case(protocol.write_case(tmp_path / "c.npz", case))
    assert back.image.dtype == np.uint16 and np.array_equal(back.image, case.image)
    assert back.spacing == (0.2, 0.3) and back.name == "ceph 1" and np.array_equal(back.pixel_to_lps, pixel_to_lps)
    assert back.landmarks.names == ["a", "b"] and back.landmarks.present.tolist() == [True, False]
    assert back.landmarks.check.tolist() == [True, False], "the review flag travels too"
    assert np.array_equal(back.landmarks.points, marks.points, equal_nan=True)
    plain = protocol.read_case(protocol.write_case(tmp_path / "p.npz", Case(np.zeros((4, 5, 3), np.uint8))))
    assert plain.landmarks is None and plain.image.shape == (4, 5, 3)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:  # no object arrays: nothing to unpickle
        assert all(f[k].dtype != object for k in f.files)
    index_to_lps = np.array([[0, 0, -0.5, 9], [0.4, 0, 0, -3], [0, -0.3, 0, 2], [0, 0, 0, 1.0]])  # permuted, flipped
    points = Landmarks(["x", "y"], [[1.5, -2.0, 3.25], [np.nan] * 3], [0.9, 0.0], [True, False])
    volume = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), index_to_lps, points, name="skull 1")
    back = protocol.read_case(protocol.write_case(tmp_path / "v.npz", volume))
    assert isinstance(back, Volume) and back.name == "skull 1" and back.voxels.dtype == np.int16
    assert np.array_equal(back.voxels, volume.voxels) and np.array_equal(back.index_to_lps, index_to_lps)
    assert back.landmarks.names == ["x", "y"] and back.landmarks.present.tolist() == [True, False]
    assert np.array_equal(back.landmarks.points, points.points, equal_nan=True)
    with np.load(tmp_path / "v.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


def test_api_detect_takes_volumes_only_with_a_volume_atlas(tmp_path, micro_file):
    volume = Volume(np.zeros((4, 5, 6), np.uint8), np.eye(4), name="skull")
    with pytest.raises(InputError, match="skull: a 3D volume; models and adapters detect on 2D images"):
        api.detect(volume, str(micro_file))
    atlas = Volume(np.zeros((4, 5, 6), np.uint8), np.eye(4), Landmarks(list("abcd"), np.ones((4, 3))), name="a")
    with pytest.raises(InputError, match="the deformable stage is for 2D atlases"):
        api.detect(volume, atlas=[atlas], deformable=True)
    with pytest.raises(Cancelled):
        api.detect(volume, atlas=[atlas], cancel=lambda: True)


class Worker:
    """The worker process as an application sees it: JSON lines in, JSON lines out."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "medsapiens.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.reply()["kind"] == "ready"

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def reply(self) -> dict:
        return json.loads(self.process.stdout.readline())

    def final(self) -> dict:
        while (r := self.reply())["kind"] == "progress":
            assert 0.0 <= r["fraction"] <= 1.0 and isinstance(r["message"], str)
        return r

    def replies_until_final(self) -> list:
        """Every reply to the request running now, its result, error or cancelled last."""
        replies = [self.reply()]
        while replies[-1]["kind"] in ("progress", "item"):
            replies.append(self.reply())
        return replies


@pytest.mark.slow
def test_the_worker_answers_requests_and_survives_bad_ones(tmp_path, micro_file, ceph):
    worker = Worker()
    try:
        worker.send("not json")
        assert worker.reply() == {"kind": "error", "id": None, "message": worker_error("not json")}
        worker.send(json.dumps({"id": 1, "kind": "segment"}))
        assert worker.final() == {"id": 1, "kind": "error", "message": "unknown request 'segment' (known: detect, "
                                                                        "detect_batch, finetune, report)"}
        worker.send(json.dumps({"id": 9, "kind": "report", "case": 3, "out": "x.html"}))
        assert worker.final() == {"id": 9, "kind": "error", "message": "report request: 'case' is int, not str"}
        case = ceph.case(3)
        image = protocol.write_case(tmp_path / "case.npz", case)
        request = {"kind": "detect", "case": image, "out": str(tmp_path / "found.npz"), "device": "cpu"}
        worker.send(json.dumps({"id": 2, **request, "model": str(tmp_path / "missing.safetensors")}))
        error = worker.final()
        assert error["kind"] == "error" and "missing.safetensors" in error["message"] and "\n" not in error["message"]
        worker.send(json.dumps({"id": 3, **request, "model": str(micro_file)}))
        assert worker.final() == {"id": 3, "kind": "result", "landmarks": str(tmp_path / "found.npz")}
        found = protocol.read_landmarks(tmp_path / "found.npz")
        engine = load_detector(micro_file, device="cpu").detect(case)
        assert found.names == engine.names and np.allclose(found.points, engine.points)
        worker.send(json.dumps({"kind": "shutdown"}))
        assert worker.process.wait(30) == 0
        assert worker.process.stdout.read() == "", "nothing after shutdown, and no stray prints on the protocol"
    finally:
        worker.process.kill()


def worker_error(line):
    try:
        protocol.decode(line)
    except ValueError as e:
        return f"bad request: {e}"


def test_the_worker_ends_when_its_application_goes_away():
    worker = Worker()
    worker.process.stdin.close()  # Slicer quit or crashed: the pipe closes
    assert worker.process.wait(30) == 0


def test_a_model_rewritten_in_place_is_loaded_again(tmp_path, micro_file, ceph):
    """The detector cache is keyed by the file's content, not its path."""
    path = tmp_path / "model.safetensors"
    shutil.copy(micro_file, path)
    case = ceph.case(7)
    first = api.detect(case, str(path), device="cpu")
    assert np.allclose(api.detect(case, str(path), device="cpu").confidence, first.confidence)
    other = load_detector(micro_file, device="cpu").model
    with torch.no_grad():
        for p in other.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_trained(path, other, ceph.names, (256, 192), 3.0)
    second = api.detect(case, str(path), device="cpu")
    expected = load_detector(path, device="cpu").detect(case)
    assert np.allclose(second.points, expected.points) and np.allclose(second.confidence, expected.confidence)
    assert not np.allclose(second.confidence, first.confidence)


def test_api_finetune_refuses_unknown_settings(micro_file, ceph, tmp_path):
    with pytest.raises(InputError, match="unknown fine-tune settings: colour"):
        api.finetune(str(micro_file), [ceph.case(0)], tmp_path / "a.safetensors", colour="red")
    with pytest.raises(InputError, match="unannotated images are for fine-tuning on the atlas"):
        api.finetune(str(micro_file), [ceph.case(0)], tmp_path / "a.safetensors", unannotated=[ceph.case(1)])


@pytest.mark.slow
def test_api_finetune_on_the_atlas_says_when_it_labels_the_unannotated_images(ceph, tmp_path):
    """The progress an application shows: the leave-one-out atlas, then each unannotated image, then training,
    in a bar that only moves forward (cancelled once training starts: nothing written)."""
    seen = []
    cancel = lambda: bool(seen) and seen[-1][1].startswith("training")  # noqa: E731
    with pytest.raises(Cancelled):
        api.finetune(None, [ceph.case(0), ceph.case(1)], tmp_path / "a.safetensors",
                     unannotated=[ceph.case(3), ceph.case(4)], progress=lambda p: seen.append((p.fraction, p.message)),
                     cancel=cancel, steps=4, batch=16, patch=32, width=8)
    messages = [m for _, m in seen]
    labelling = [m for m in messages if m.startswith("atlas labelling")]
    assert labelling[0].startswith("atlas labelling the unannotated images: 1 of 2, about ")  # s left
    assert labelling[-1] == "atlas labelling the unannotated images: 2 of 2"
    order = [m.split(":")[0] for m in messages]
    assert order.index("atlas of the other cases") < order.index("atlas labelling the unannotated images") < \
        next(i for i, m in enumerate(order) if m.startswith("training"))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0.1 < fractions[-1] < 0.5
    assert not (tmp_path / "a.safetensors").exists()


@pytest.fixture(scope="module")
def atlas_adapter(ceph, tmp_path_factory):
    """An adapter fine-tuned on the atlas of 2 cephalograms through the API (small, kept even if worse)."""
    from dataclasses import replace

    from medsapiens.settings import REFINE_DEFAULTS
    from medsapiens.training.refine import finetune_on_atlas

    out = tmp_path_factory.mktemp("atlas-adapter") / "task.safetensors"
    settings = replace(REFINE_DEFAULTS, steps=8, batch=16, patch=32, width=8)
    finetune_on_atlas([ceph.case(0), ceph.case(1)], out, settings=settings, keep_worse=True)
    return out


@pytest.mark.slow
def test_adapter_info_reads_the_header_only_and_case_checksums_match_the_file(atlas_adapter, ceph):
    from medsapiens.detectors.refiner import grey
    from medsapiens.models.weight_files import load_weights

    code = ("import sys; from medsapiens import api; info = api.adapter_info(sys.argv[1]); "
            "print('torch' in sys.modules, info['cases_estimated'], len(info['landmark_names']))")
    run = subprocess.run([sys.executable, "-c", code, str(atlas_adapter)], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "2", "19"]  # no torch in an application's process for this
    info, meta = api.adapter_info(atlas_adapter), load_weights(atlas_adapter)[1]
    assert info["adapter_mre_mm"] == meta["estimate"]["refined_mre_mm"]
    assert info["atlas_mre_mm"] == meta["estimate"]["atlas_mre_mm"] and info["method"] == "leave-one-case-out"
    assert info["refined_landmarks"] == [n for n, u in zip(meta["landmark_names"], meta["use_refined"]) if u]
    assert [c["label"] for c in info["cases"]] == ["001", "002"] and info["steps"] == 16
    # the numpy checksum hashes the image as the refiner sees it (torch) and stores it, rounded to 8 bits
    for i, stored in enumerate(info["cases"]):
        case = ceph.case(i)
        assert api.case_checksum(case, ceph.names) == stored["sha256"]
        as_float = Case(grey(case).numpy() / 3.0 + 7.0, case.spacing, case.landmarks)  # windowed like a float image
        h = hashlib.sha256(grey(as_float).round().to(torch.uint8).numpy().tobytes())
        h.update(np.nan_to_num(as_float.landmarks.points, nan=-1.0).astype("<f8").tobytes())  # missing: -1
        assert api.case_checksum(as_float, ceph.names) == h.hexdigest()
    case = ceph.case(0)
    points = case.landmarks.points.copy()  # (the data set's own landmarks stay as they are)
    points[3, 0] += 0.5
    moved = Case(case.image, case.spacing, Landmarks(case.landmarks.names, points))
    assert api.case_checksum(moved, ceph.names) != info["cases"][0]["sha256"]
    with pytest.raises(InputError, match="not an adapter fine-tuned on the atlas"):
        api.adapter_info(ceph.root / "landmarks.csv")


@pytest.mark.slow
def test_api_detect_with_an_atlas_adapter_alone(atlas_adapter, ceph, micro_file, tmp_path):
    case = ceph.case(6)
    found = api.detect(case, adapter=str(atlas_adapter))
    assert api.detect(case, adapter=str(atlas_adapter)) is not found  # a new detection ...
    kept = api.load_detector(adapter=str(atlas_adapter))
    assert api.load_detector(adapter=str(atlas_adapter)) is kept  # ... by the detector kept loaded for this file
    expected = load_detector(adapter=str(atlas_adapter)).detect(case)
    assert found.names == expected.names
    assert np.median(np.linalg.norm(found.points - expected.points, axis=1)) < 1.0
    lora = tmp_path / "lora.safetensors"
    shutil.copy(micro_file, lora)
    with pytest.raises(InputError, match="runs on its base model"):
        api.detect(case, adapter=str(lora))
    with pytest.raises(InputError, match="unknown settings for fine-tuning on the atlas: colour"):
        api.finetune(None, [ceph.case(0), ceph.case(1)], tmp_path / "a.safetensors", colour="red")
    assert issubclass(NotBetter, InputError)  # the worker and the CLI report it in one line


@pytest.mark.slow
def test_a_batch_answers_image_by_image_goes_on_after_a_bad_one_and_cancels_between_images(tmp_path, phantom_files):
    """Open images (case files): an item per image as it is done, the bad one its line; files and folders: the
    command line's .mrk.json files and landmarks.csv; Cancel after the first image: no more images."""
    atlas = [protocol.write_case(tmp_path / f"atlas{s}.npz", api.phantom_case(s)) for s in (0, 1)]
    images = [api.phantom_case(10), Case(np.zeros((20, 20), np.uint8), name="tiny"), api.phantom_case(12)]
    cases = [protocol.write_case(tmp_path / f"image{n}.npz", c) for n, c in enumerate(images)]
    worker = Worker()
    try:
        worker.send(json.dumps({"id": 1, "kind": "detect_batch", "cases": cases, "out": str(tmp_path / "found"),
                                "atlas": atlas}))
        replies = worker.replies_until_final()
        assert replies[-1] == {"id": 1, "kind": "result", "images": 3, "failed": 1}
        items = [r for r in replies if r["kind"] == "item"]
        assert items == [{"id": 1, "kind": "item", "index": 0, "landmarks": str(tmp_path / "found" / "0.npz")},
                         {"id": 1, "kind": "item", "index": 1, "error": "tiny: the image is 20 x 20 px; finding "
                                                                        "landmarks needs at least 32 px along each "
                                                                        "side"},
                         {"id": 1, "kind": "item", "index": 2, "landmarks": str(tmp_path / "found" / "2.npz")}]
        progress = [(r["fraction"], r["message"]) for r in replies if r["kind"] == "progress"]
        assert [f for f, _ in progress] == sorted(f for f, _ in progress), "one bar, only forward"
        assert [m for _, m in progress if m.startswith("detecting")] == [
            "detecting on phantom010: 1 of 3", "detecting on tiny: 2 of 3", "detecting on phantom012: 3 of 3"]
        assert replies.index(items[0]) < [r.get("message") for r in replies].index("detecting on tiny: 2 of 3"), \
            "each image's item comes as soon as it is done"
        engine = api.load_detector(atlas=[api.phantom_case(s) for s in (0, 1)]).detect(images[2])
        distance = np.linalg.norm(protocol.read_landmarks(items[2]["landmarks"]).points - engine.points, axis=1)
        assert np.median(distance) < 0.5, distance  # the atlas's multi-threaded registration varies a little

        folder = tmp_path / "folder"
        folder.mkdir()
        for seed in (10, 12):
            shutil.copy(phantom_files(seed)[0], folder)
        worker.send(json.dumps({"id": 2, "kind": "detect_batch", "files": [str(folder)], "out": str(tmp_path / "o"),
                                "atlas": atlas}))
        replies = worker.replies_until_final()
        found = [str(tmp_path / "o" / f"phantom{s}.mrk.json") for s in (10, 12)]
        assert [r for r in replies if r["kind"] == "item"] == [
            {"id": 2, "kind": "item", "name": f"phantom{s}", "file": f} for s, f in zip((10, 12), found)]
        assert replies[-1] == {"id": 2, "kind": "result", "images": 2, "failed": 0,
                               "written": [*found, str(tmp_path / "o" / "landmarks.csv")]}

        worker.send(json.dumps({"id": 3, "kind": "detect_batch", "cases": [cases[0], cases[2], cases[0]],
                                "out": str(tmp_path / "again"), "atlas": atlas}))
        while (r := worker.reply())["kind"] != "item":
            assert r["kind"] == "progress"
        worker.send(json.dumps({"kind": "cancel", "id": 3}))
        replies = worker.replies_until_final()
        assert replies[-1] == {"id": 3, "kind": "cancelled"}
        assert not [r for r in replies if r["kind"] == "item" and r["index"] == 2], "stopped before the last image"
    finally:
        worker.process.kill()
