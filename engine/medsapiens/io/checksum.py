"""SHA256 of files, streamed: how downloads, added models and adapter bases are identified; and of a 2D case as
the atlas refiner stores it, which is how an adapter names the cases it has seen."""
from __future__ import annotations

import hashlib
import os

import numpy as np


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
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
