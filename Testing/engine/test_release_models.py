"""The released MedSapiens models, end to end against a local stand-in for Google Drive and Hugging Face.

The test writes a release like the authors' (checkpoints saved through mmengine's own API, zipped under
`checkpoints/med_sapien/...`, a flat pretrain base), serves it with a Drive-like confirm page, and runs the
real catalogue entries on a shared cephalogram. The model is the micro architecture fitted to case 001
(conftest): its backbone is split into a base and LoRA matrices, so the LoRA path carries real weights.
"""
import argparse
import subprocess
import sys

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

INPUT = (256, 192)  # the size the micro model was fitted at


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
    assert g.source.member == "checkpoints/med_sapien/best_EPE_epoch_199.pth" and g.base == "sapiens-0.3b-pretrain"
    assert "1Nxes7MczB3dNvA2JMtGXcSEUEk8gQg4F" in g.source.url  # the authors' Google Drive file
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
    assert path == cached_path(choice.entry) and sha256_of(path) == release["sha"]["generalist"]
    assert "SHA256" in capsys.readouterr().err  # pinned at first download, and said so
    # one download installs every model of the zip (each pinned); the zip itself is not kept
    assert sha256_of(cached_path(catalogue()["medsapiens-head"])) == release["sha"]["head"]
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
    hub.pin(**{"medsapiens-generalist": release["sha"]["head"]})  # the zip's generalist will not match
    with pytest.raises(InputError, match="SHA256 .* expects"):
        resolve("medsapiens-generalist")
    assert not cached_path(catalogue()["medsapiens-generalist"]).exists()

    hub.pin(**{"medsapiens-generalist": release["sha"]["generalist"]})
    data = bytearray(release["zip"].read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a member
    hub.state["files"][release["drive_id"]] = bytes(data)
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


@pytest.mark.slow
def test_mmengine_checkpoint_loads_safely_and_agrees_to_0_px(release, ceph):
    written = read_checkpoint(release["files"]["head"])
    assert written.layout == "medsapiens" and written.landmark_names == [f"L{i}" for i in range(19)]
    case = ceph.case(1)
    found = {}
    for label, path in (("mmengine", release["files"]["head"]), ("bare", release["bare"])):
        detector = load_detector(path, base=release["base"], input_size=INPUT, flip_test=False)
        found[label] = detector.detect(case).points
    assert np.array_equal(found["mmengine"], found["bare"])
    # reading needs no mmengine: its records come back as inert stand-ins
    code = ("import sys; from medsapiens.models.checkpoints import read_checkpoint; "
            f"c = read_checkpoint({str(release['files']['head'])!r}); assert 'mmengine' not in sys.modules, 'imported'")
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
    ckpt = read_checkpoint(release["files"]["generalist"])
    base = read_checkpoint(release["base"])
    whole, head = build_model(ckpt, base), build_model(ckpt, base, channels=range(19))
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(head(x), whole(x)[:, :19], atol=1e-6)
    with pytest.raises(InputError, match="88 outputs"):
        build_model(ckpt, base, channels=[90])
