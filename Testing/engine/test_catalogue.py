"""The downloader against a local HTTP server with plain URLs: cache, checksum, pinning, offline mode.
(The Google Drive flow, zip members and resume: test_release_models.py.)"""
import hashlib
import http.server
import json
import threading
from functools import partial

import pytest
import torch
from medsapiens import InputError, load_detector
from medsapiens.models.download import resolve
from medsapiens.models.sapiens import SapiensPose


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def hub_model(server, tmp_path, monkeypatch):
    root, url = server
    torch.manual_seed(0)
    model = SapiensPose("micro", 4, (16, 12))
    path = root / "sapiens_micro_pose.pth"  # the official pose layout
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDSAPIENS_OFFLINE", raising=False)

    def make_catalogue(sha256):
        entry = {"name": "micro-pose", "display": "micro pose", "source": {"kind": "http",
                 "url": f"{url}/sapiens_micro_pose.pth"}, "sha256": sha256 or "pin-on-first-download",
                 "layout": "pose", "landmark_sets": ["abcd"]}
        cat = tmp_path / f"models-{sha256 or 'unpinned'}.json"
        cat.write_text(json.dumps({"landmark_sets": {"abcd": {"names": list("ABCD")}}, "models": [entry]}))
        monkeypatch.setenv("MEDSAPIENS_CATALOGUE", str(cat))

    return make_catalogue, digest, tmp_path / "cache"


def test_download_verify_and_reuse(hub_model, capsys):
    make_catalogue, digest, cache = hub_model
    make_catalogue(digest)
    from medsapiens.cli import _Bar

    bar = _Bar()  # the command line's bar
    path = resolve("micro-pose", progress=bar)[0]
    bar.close()
    assert path == cache / "micro-pose" / "sapiens_micro_pose.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert "downloading micro-pose" in capsys.readouterr().err  # progress bar on stderr
    mtime = path.stat().st_mtime_ns
    assert resolve("micro-pose")[0] == path and path.stat().st_mtime_ns == mtime  # cached


def test_a_cached_model_is_hashed_once_per_process_and_again_when_it_changes(hub_model, monkeypatch):
    """Loading a 1 GB model again must not read it all again: its SHA256 is checked once, and again only when the
    file changed on disk; and a detector stays loaded for its resolved file."""
    from medsapiens import api
    from medsapiens.io import checksum

    make_catalogue, digest, cache = hub_model
    make_catalogue(digest)
    path = resolve("micro-pose")[0]
    hashed = []
    real = checksum._digest  # what reads the whole file
    monkeypatch.setattr(checksum, "_digest", lambda p: hashed.append(p) or real(p))
    first = api.load_detector("micro-pose", input_size=(256, 192))
    assert api.load_detector("micro-pose", input_size=(256, 192)) is first and resolve("micro-pose")[0] == path
    assert hashed == [], "verified at download, not again"
    path.write_bytes(path.read_bytes())  # rewritten: a new modification time
    resolve("micro-pose")
    assert hashed == [path]


def test_checksum_mismatch_discards_the_file(hub_model):
    make_catalogue, digest, cache = hub_model
    make_catalogue("0" * 64)
    with pytest.raises(InputError, match="SHA256"):
        resolve("micro-pose")
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing half-written or unverified left


def test_unpinned_entry_is_pinned_at_first_download(hub_model):
    make_catalogue, digest, cache = hub_model
    make_catalogue(None)
    path = resolve("micro-pose")[0]
    pin = path.with_name(path.name + ".sha256")
    assert pin.read_text().strip() == digest
    path.write_bytes(path.read_bytes()[:-10])  # tampered afterwards
    with pytest.raises(InputError, match="does not match"):
        resolve("micro-pose")[0]


def test_offline_mode_and_local_files(hub_model, monkeypatch, server):
    make_catalogue, digest, cache = hub_model
    monkeypatch.setenv("MEDSAPIENS_OFFLINE", "1")
    make_catalogue(digest)
    with pytest.raises(InputError, match="MEDSAPIENS_OFFLINE"):
        resolve("micro-pose")
    local = server[0] / "sapiens_micro_pose.pth"
    assert resolve(str(local)) == (local, None)  # a local file needs no network
    detector = load_detector(local, input_size=(256, 192))
    assert detector.names == ["L0", "L1", "L2", "L3"]


def test_unknown_name_lists_the_catalogue():
    with pytest.raises(InputError, match="sapiens-0.3b-pretrain"):
        resolve("no-such-model")


def test_progress_callback_reports_bytes(hub_model, capsys):
    """The Slicer panel drives its progress bar from a callback instead of the stderr bar."""
    make_catalogue, digest, cache = hub_model
    seen = []
    make_catalogue(digest)
    path, choice = resolve("micro-pose", progress=lambda p: seen.append((p.step, p.total)))
    assert choice.landmark_names == list("ABCD")
    size = path.stat().st_size
    assert seen and seen[-1] == (size, size) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert "micro-pose" not in capsys.readouterr().err
