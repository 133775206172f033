"""Uploads from a browser: checked, then stored under the session's own folder with names the server makes.

The client's file name is only ever shown (in messages, as a node name); it never becomes a path. The type comes
from the content (magic bytes, a markups document's JSON), not from the name, and the size is limited
(settings.WebSettings.upload_mb). A NRRD header that points at a separate data file is refused, since that
would make the reader open a path the client chose. A landmark set file is text (CSV or JSON) or a markups
file, and a JSON set naming a picture is refused: the picture would be a path on the server.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from medsapiens import InputError

IMAGE, MARKUPS, LANDMARK_SET = "image", "markups", "landmark set"
ACCEPTED = "an image (PNG, JPEG, NRRD, NIfTI, DICOM) or a Slicer markups file (.mrk.json)"
SET_ACCEPTED = ("a landmark set file (UTF-8 text: CSV name,description, or JSON without a \"picture\"; or a Slicer "
                "markups file)")


@dataclass(frozen=True)
class Upload:
    kind: str      # IMAGE or MARKUPS
    path: Path     # where it is stored: the session's folder, a name the server made
    name: str      # the client's name for it, cleaned, for display only


def display_name(client_name) -> str:
    """The last part of the client's name, printable characters only, at most 80: a label, never a path."""
    base = re.split(r"[\\/]", str(client_name or ""))[-1]
    return re.sub(r"[^\w .()+-]", "_", base)[:80] or "upload"


def content_type(content: bytes) -> str | None:
    """The stored file's suffix for this content, or None when it is none of the accepted kinds."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if content.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if content.startswith(b"NRRD000"):
        return ".nrrd" if _attached_nrrd(content) else None
    if content[128:132] == b"DICM":
        return ".dcm"
    if content[344:348] in (b"n+1\0", b"n+2\0"):
        return ".nii"
    if content.startswith(b"\x1f\x8b"):
        head = _gunzip_head(content, 544)
        return ".nii.gz" if head[344:348] in (b"n+1\0", b"n+2\0") else None
    return ".mrk.json" if _markups_document(content) else None


def landmark_set_type(content: bytes) -> str | None:
    """The stored file's suffix for a landmark set file (what medsapiens.landmark_sets reads by suffix): a markups
    document (.mrk.json: its names), JSON text (.json) or other text (.csv); None for anything else (an image's
    text header included), and for a JSON set naming a picture."""
    kind = content_type(content)
    if kind is not None:
        return kind if kind == ".mrk.json" else None
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    if not text.lstrip().startswith(("{", "[")):
        return ".csv"
    try:
        document = json.loads(text)
    except ValueError:
        return ".json"  # the landmark set reader says what is wrong with it
    return None if isinstance(document, dict) and "picture" in document else ".json"


def _attached_nrrd(content: bytes) -> bool:
    """True when the NRRD header holds no 'data file' field (its data follow it in the same file)."""
    header = content[:content.find(b"\n\n")] if b"\n\n" in content else content[:65536]
    return not re.search(rb"^\s*data ?file\s*:", header, re.IGNORECASE | re.MULTILINE)


def _gunzip_head(content: bytes, size: int) -> bytes:
    try:
        return zlib.decompressobj(wbits=31).decompress(content, size)
    except zlib.error:
        return b""


def _markups_document(content: bytes) -> bool:
    try:
        document = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("markups"), list)


class UploadFolder:
    """A session's uploads: each file checked, then stored as `<folder>/<n>/upload<suffix>` (a folder each, so
    Slicer's reader never takes neighbouring numbered files for one series)."""

    def __init__(self, folder: Path, limit_mb: float):
        self.folder, self.limit_mb = Path(folder), limit_mb
        self._numbers = itertools.count(1)

    def store(self, client_name, content: bytes, landmark_set: bool = False) -> Upload:
        """Check one uploaded file and store it; InputError (one line naming the file) when it is refused.
        landmark_set: a landmark set file (landmark_set_type) instead of an image or markups."""
        name = display_name(client_name)
        if not content:
            raise InputError(f"{name}: the file is empty")
        if len(content) > self.limit_mb * 1e6:
            raise InputError(f"{name}: {len(content) / 1e6:.1f} MB, more than the upload limit of "
                             f"{self.limit_mb:g} MB")
        suffix = landmark_set_type(content) if landmark_set else content_type(content)
        if suffix is None:
            raise InputError(f"{name}: not {SET_ACCEPTED if landmark_set else ACCEPTED}")
        folder = self.folder / str(next(self._numbers))
        folder.mkdir(parents=True)
        path = folder / f"{'landmark set' if landmark_set else 'upload'}{suffix}"
        path.write_bytes(content)
        return Upload(LANDMARK_SET if landmark_set else MARKUPS if suffix == ".mrk.json" else IMAGE, path, name)

    @staticmethod
    def remove(upload: Upload) -> None:
        """Forget a stored file (one its reader refused): nothing of it is kept."""
        shutil.rmtree(upload.path.parent, ignore_errors=True)

