"""The model catalogue (models.json beside this file) and the downloader: per-user cache, progress, SHA256 check.

Offline sites set MEDSAPIENS_OFFLINE=1 (no network attempt) and pass a local file instead of a catalogue name.
Entries whose SHA256 is not pinned in the catalogue are pinned at first download: the hash is recorded next to
the cached file and every later use is checked against it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..io.atomic import atomic_write, atomic_write_text
from .adapter_file import sha256_of


@dataclass(frozen=True)
class Entry:
    name: str
    url: str
    filename: str
    sha256: str | None
    size: int | None
    layout: str
    landmarks: list[str] | None
    description: str = ""


def catalogue(path=None) -> dict[str, Entry]:
    source = Path(path) if path else resources.files("medsapiens.models") / "models.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    fields = set(Entry.__dataclass_fields__)
    return {m["name"]: Entry(**{k: v for k, v in m.items() if k in fields}) for m in data["models"]}


def cache_dir() -> Path:
    if os.environ.get("MEDSAPIENS_CACHE"):
        return Path(os.environ["MEDSAPIENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medsapiens" / "models"


def offline() -> bool:
    return os.environ.get("MEDSAPIENS_OFFLINE", "") not in ("", "0")


def resolve(model: str, progress=True, catalogue_path=None) -> Path:
    """A local file for `model`: an existing path as it is, else a catalogue name (downloaded if needed).

    progress: True for a bar on stderr, False for none, or a callable(bytes_done, bytes_total_or_None).
    """
    if Path(model).exists():
        return Path(model)
    entries = catalogue(catalogue_path)
    if model not in entries:
        raise InputError(f"{model}: neither a file nor a catalogue model (catalogue: {', '.join(entries)})")
    return fetch(entries[model], progress=progress)


def cached_path(entry: Entry) -> Path:
    return cache_dir() / entry.name / entry.filename


def fetch(entry: Entry, progress=True) -> Path:
    target = cached_path(entry)
    pin = target.with_name(target.name + ".sha256")
    expected = entry.sha256 or (pin.read_text().strip() if pin.exists() else None)
    if target.exists():
        if expected and sha256_of(target) != expected:
            raise InputError(f"{target}: cached file does not match its SHA256 {expected[:12]}...; delete it to "
                             "download again")
        return target
    if offline():
        raise InputError(f"{entry.name}: not in the cache ({target}) and MEDSAPIENS_OFFLINE is set; download "
                         f"{entry.url} elsewhere and pass the local file instead")
    digest = hashlib.sha256()

    def download(tmp):
        try:
            with urllib.request.urlopen(entry.url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or entry.size or 0) or None
                bar = _bar(total, entry.name, progress is True)
                done = 0
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
                    done += len(block)
                    if callable(progress):
                        progress(done, total)
                bar.close()
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"{entry.name}: download from {entry.url} failed ({getattr(e, 'reason', e)}); "
                             "pass a local copy of the file instead") from None
        got = digest.hexdigest()
        if expected and got != expected:
            raise InputError(f"{entry.name}: downloaded file has SHA256 {got[:12]}..., the catalogue expects "
                             f"{expected[:12]}...; the file was discarded")
        if entry.size and Path(tmp).stat().st_size != entry.size:
            raise InputError(f"{entry.name}: downloaded {Path(tmp).stat().st_size} bytes, expected {entry.size}")

    atomic_write(target, download)
    if not expected:
        atomic_write_text(pin, digest.hexdigest() + "\n")
        print(f"{entry.name}: SHA256 {digest.hexdigest()} pinned in {pin}", file=sys.stderr)
    return target


def _bar(total, label, enabled):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not enabled,
                file=sys.stderr)
