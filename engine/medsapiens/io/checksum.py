"""SHA256 of files, streamed: how downloads, added models and adapter bases are identified."""
from __future__ import annotations

import hashlib
import os


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
