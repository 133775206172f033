"""SHA256 of files, streamed: how downloads, added models and adapter bases are identified; and of a 2D case as
the atlas refiner stores it, which is how an adapter names the cases it has seen.

A file is hashed once per process and version on disk (its identity: device, inode, size, modification time), so
loading a 1 GB model or its base again does not read it all again."""
from __future__ import annotations

import hashlib
import os

import numpy as np

_known: dict[tuple, str] = {}  # (path, file_identity) -> SHA256 hex digest


def file_identity(path) -> tuple:
    """(device, inode, size, modification time in ns): changes whenever the file is written or replaced."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def sha256_of(path: str | os.PathLike) -> str:
    key = (os.fspath(path), file_identity(path))
    if key not in _known:
        _known[key] = _digest(path)
    return _known[key]


def remember(path, digest: str) -> None:
    """The digest of a file just written from a stream that was hashed on the way (a download)."""
    _known[(os.fspath(path), file_identity(path))] = digest


def _digest(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def case_checksum(case, names: list[str]) -> str:
    """SHA256 of a 2D case's grey image as the atlas refiner sees and stores it (the mean of to_rgb255's channels,
    rounded to 8 bits) and of its landmarks `names` (missing = -1): what "this case" means in an adapter file.

    numpy only, so an application can match its own cases to an adapter's without loading torch."""
    h = _grey_hash(case)
    h.update(np.nan_to_num(case.landmarks.subset(names).points, nan=-1.0).astype("<f8").tobytes())
    return h.hexdigest()


def image_checksum(case) -> str:
    """SHA256 of a 2D case's grey image alone (as case_checksum hashes it, and its size): an unannotated image."""
    h = _grey_hash(case)
    h.update(np.asarray(case.image.shape[:2], "<i8").tobytes())
    return h.hexdigest()


def _grey_hash(case):
    from .intensity import to_rgb255

    grey = np.round(to_rgb255(case.image).mean(axis=2).astype(np.float32)).astype(np.uint8)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(grey).tobytes())
    return h
