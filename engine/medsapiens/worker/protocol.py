"""The worker's protocol: one JSON object per line, requests on its stdin and replies on its stdout.

Requests (the client numbers them; `cancel` and `shutdown` act at once, even while a request runs):

    {"id": 1, "kind": "detect", "case": "case-1.npz", "out": "found-1.npz", "model": "ceph.safetensors",
     "adapter": null, "atlas": null, "deformable": false, "device": "auto", "precision": "fp32"}
    {"id": 2, "kind": "finetune", "cases": ["a.npz", "b.npz", "c.npz"], "base": "...", "out": "task.safetensors",
     "device": "auto", "settings": {"time_budget": 300}}       (base null: fine-tune on the atlas of the cases)
    {"id": 3, "kind": "report", "case": "case-3.npz", "out": "/path/report.html", "analysis": "steiner",
     "title": "ceph", "source": "atlas"}              (the case file carries the landmarks to report)
    {"id": 4, "kind": "detect_batch", "cases": ["a.npz", "b.npz"], "out": "found-4", "model": null,
     "adapter": "task.safetensors", "atlas": null, ...}              (the detector chosen as for detect)
    {"id": 5, "kind": "detect_batch", "files": ["/data/cephs"], "out": "/data/found", ...}
    {"kind": "cancel", "id": 2}
    {"kind": "shutdown"}

Replies: {"kind": "ready", "pid": 123} once at start; then per request any number of
{"id": 2, "kind": "progress", "fraction": 0.4, "message": "step 12, loss 0.8"} and one of
{"id": 2, "kind": "result", ...}, {"id": 2, "kind": "error", "message": "one line"}, {"id": 2, "kind": "cancelled"}.
A finetune's result: {"adapter": path}, and on the atlas also {"info": api.adapter_info(path)}; a report's:
{"files": [the HTML, the PDF]}.

A detect_batch detects on each image in turn with one detector, on the application's images ("cases": case
files) or on files and folders ("files": as `medsapiens detect` takes them, writing its .mrk.json files and
landmarks.csv into "out"). Each image's outcome is an "item" reply as soon as it is done, before the next image
starts: {"id": 4, "kind": "item", "index": 0, "landmarks": "found-4/0.npz"} (cases) or {..., "name": "001",
"file": "/data/found/001.mrk.json"} (files), or {..., "error": "one line"} for an image that failed (the
others go on). The result: {"images": N, "failed": k} (and for files "written": every file). Cancel stops
between images; the items already sent stand.

Images, volumes and landmarks travel as .npz files (arrays only, read without pickle) in a folder the client
owns; a `detect` on a volume case with volume atlas cases runs the 3D atlas.
"""
from __future__ import annotations

import json

import numpy as np

from ..case import Case, Landmarks, Volume

DETECT, DETECT_BATCH, FINETUNE, REPORT = "detect", "detect_batch", "finetune", "report"
CANCEL, SHUTDOWN = "cancel", "shutdown"
READY, PROGRESS, ITEM, RESULT, ERROR, CANCELLED = "ready", "progress", "item", "result", "error", "cancelled"
_DETECTOR = {"model": ((str, type(None)), False), "adapter": ((str, type(None)), False),
             "atlas": ((list, type(None)), False), "deformable": ((bool,), False),
             "device": ((str, type(None)), False), "precision": ((str,), False)}  # which detector, as detect says
# the fields of each request: name -> (the JSON types it may have, whether it must be there)
FIELDS = {
    DETECT: {"case": ((str,), True), "out": ((str,), True), **_DETECTOR},
    DETECT_BATCH: {"cases": ((list,), False), "files": ((list,), False), "out": ((str,), True), **_DETECTOR},
    FINETUNE: {"cases": ((list,), True), "out": ((str,), True), "base": ((str, type(None)), False),
               "unannotated": ((list,), False), "device": ((str, type(None)), False), "settings": ((dict,), False)},
    REPORT: {"case": ((str,), True), "out": ((str,), True), "analysis": ((str,), False), "title": ((str,), False),
             "source": ((str,), False)},
}


def encode(message: dict) -> str:
    """One protocol line (newline included)."""
    return json.dumps(message, separators=(",", ":")) + "\n"


def decode(line: str) -> dict:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"not JSON: {line.strip()[:80]}") from None
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise ValueError(f"not a protocol message: {line.strip()[:80]}")
    return message


def check_request(message: dict) -> None:
    """A request the worker can run, or one line saying what is wrong with it (nothing from a client is trusted)."""
    from ..errors import InputError

    kind = message["kind"]
    if kind not in FIELDS:
        raise InputError(f"unknown request {kind!r} (known: {', '.join(FIELDS)})")
    for name, (types, required) in FIELDS[kind].items():
        if name not in message:
            if required:
                raise InputError(f"{kind} request without {name!r}")
            continue
        if not isinstance(message[name], types) or isinstance(message[name], bool) and bool not in types:
            raise InputError(f"{kind} request: {name!r} is {type(message[name]).__name__}, not "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
    for name in ("cases", "unannotated", "atlas", "files"):
        if isinstance(message.get(name), list) and not all(isinstance(p, str) for p in message[name]):
            raise InputError(f"{kind} request: {name!r} must list file paths")
    if kind == DETECT_BATCH and ("cases" in message) == ("files" in message):
        raise InputError(f"{kind} request: give either 'cases' or 'files'")


def one_line(error: BaseException) -> str:
    """An error as the one line the user sees: the engine's own messages as they are, others with their type."""
    from ..errors import InputError

    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}"


def write_case(path, case: Case | Volume) -> str:
    """The case's own copy of its pixels, spacing, pixel -> LPS matrix and landmarks (if any), as one .npz; a
    Volume's voxels and index -> LPS matrix."""
    if isinstance(case, Volume):
        arrays = {"voxels": np.ascontiguousarray(case.voxels), "index_to_lps": case.index_to_lps}
    else:
        arrays = {"image": np.ascontiguousarray(case.image), "spacing": np.asarray(case.spacing),
                  "pixel_to_lps": case.pixel_to_lps}
    arrays["name"] = np.array(case.name)
    if case.landmarks is not None:
        arrays.update(_landmark_arrays(case.landmarks))
    np.savez(path, **arrays)
    return str(path)


def read_case(path) -> Case | Volume:
    """A case file written by write_case; one line for anything else."""
    from ..errors import InputError

    try:
        with np.load(path, allow_pickle=False) as f:
            landmarks = _landmarks(f) if "names" in f else None
            if "voxels" in f:
                return Volume(f["voxels"], f["index_to_lps"], landmarks, name=str(f["name"]))
            return Case(f["image"], tuple(f["spacing"]), landmarks, name=str(f["name"]),
                        pixel_to_lps=f["pixel_to_lps"])
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        reason = "no such file" if isinstance(e, FileNotFoundError) else f"not a case file ({type(e).__name__})"
        raise InputError(f"{path}: {reason}") from None


def write_landmarks(path, landmarks: Landmarks) -> str:
    np.savez(path, **_landmark_arrays(landmarks))
    return str(path)


def read_landmarks(path) -> Landmarks:
    with np.load(path, allow_pickle=False) as f:
        return _landmarks(f)


def _landmark_arrays(landmarks: Landmarks) -> dict:
    return {"names": np.array(landmarks.names, dtype=str), "points": landmarks.points,
            "confidence": landmarks.confidence, "present": landmarks.present, "check": landmarks.check}


def _landmarks(f) -> Landmarks:
    return Landmarks([str(n) for n in f["names"]], f["points"], f["confidence"], f["present"],
                     f["check"] if "check" in f else None)
