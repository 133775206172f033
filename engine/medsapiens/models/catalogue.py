"""What models exist: the shipped catalogue (models.json beside this file) plus the models a user added.

A name may carry a landmark set: `medsapiens-generalist:head` is the generalist restricted to the head's 19
channels. This module only describes models; download.py fetches them, checkpoints.py reads them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..io.atomic import atomic_write_text

PIN_ON_FIRST_DOWNLOAD = "pin-on-first-download"
SOURCE_KINDS = ("http", "google-drive", "local")


@dataclass(frozen=True)
class HeadLandmarks:
    """The landmarks of one group of a model's heatmap channels (a generalist model has several: head, hand,
    ...), in channel order, with the left/right pairs a flip test swaps. What a person annotates is a
    landmark_sets.LandmarkSet; this is what a catalogue model outputs."""
    name: str
    display: str
    names: list[str]
    flip_pairs: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """Where the file comes from: a plain URL, a Google Drive file (confirm page flow), or a user's own file.

    member: the file inside a zip download (matched by its full path, or as the end of one).
    """
    kind: str
    url: str = ""
    member: str | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    display: str
    source: Source
    sha256: str  # hex digest of the kept file, or PIN_ON_FIRST_DOWNLOAD
    layout: str | None  # None: recognised from the file (models a user added)
    base: str | None = None
    landmark_sets: tuple[HeadLandmarks, ...] = ()
    input_hw: tuple[int, int] | None = None
    sigma: float | None = None
    flip_test: bool = False

    @property
    def filename(self) -> str:
        """The kept file's name: the zip member's or the URL's last part."""
        return Path(self.source.member or self.source.url.split("?")[0]).name

    @property
    def landmark_names(self) -> list[str] | None:
        return [n for s in self.landmark_sets for n in s.names] if self.landmark_sets else None


@dataclass(frozen=True)
class Choice:
    """A catalogue model, optionally restricted to one landmark set: what `detect NAME[:SET]` runs."""
    entry: Entry
    landmark_set: HeadLandmarks | None = None

    @property
    def name(self) -> str:
        return f"{self.entry.name}:{self.landmark_set.name}" if self.landmark_set else self.entry.name

    @property
    def display(self) -> str:
        if self.landmark_set is None:
            return self.entry.display
        return f"{self.entry.display.split(' (')[0]}, {self.landmark_set.display}"

    @property
    def channels(self) -> list[int] | None:
        """The head channels of the chosen set (None: all)."""
        if self.landmark_set is None:
            return None
        start = 0
        for s in self.entry.landmark_sets:
            if s is self.landmark_set:
                return list(range(start, start + len(s.names)))
            start += len(s.names)
        raise AssertionError("set not in its entry")

    @property
    def landmark_names(self) -> list[str] | None:
        return list(self.landmark_set.names) if self.landmark_set else self.entry.landmark_names

    @property
    def flip_pairs(self) -> list[tuple[int, int]]:
        sets = [self.landmark_set] if self.landmark_set else self.entry.landmark_sets
        pairs, start = [], 0
        for s in sets:
            pairs += [(start + a, start + b) for a, b in s.flip_pairs]
            start += len(s.names)
        return pairs


def cache_dir() -> Path:
    """Per-user folder of downloaded and added models ($MEDSAPIENS_CACHE, else ~/.cache/medsapiens/models)."""
    if os.environ.get("MEDSAPIENS_CACHE"):
        return Path(os.environ["MEDSAPIENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medsapiens" / "models"


def user_catalogue_path() -> Path:
    return cache_dir() / "user_models.json"


def catalogue() -> dict[str, Entry]:
    """The shipped entries (or those of $MEDSAPIENS_CATALOGUE, a site's own mirror), then the user's added models."""
    mirror = os.environ.get("MEDSAPIENS_CATALOGUE")
    source = Path(mirror) if mirror else resources.files("medsapiens.models") / "models.json"
    entries = _parse(json.loads(source.read_text(encoding="utf-8")), str(source))
    user = user_catalogue_path()
    if user.is_file():
        entries.update({k: v for k, v in _parse(json.loads(user.read_text(encoding="utf-8")), str(user)).items()
                        if k not in entries})
    return entries


def _parse(data: dict, where: str) -> dict[str, Entry]:
    sets = {name: HeadLandmarks(name, s.get("display", name), list(s["names"]),
                              [tuple(p) for p in s.get("flip_pairs", [])])
            for name, s in data.get("landmark_sets", {}).items()}
    entries = {}
    for m in data["models"]:
        sha = m.get("sha256")
        if sha != PIN_ON_FIRST_DOWNLOAD and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise InputError(f"{where}: model {m.get('name')}: sha256 must be a hex digest or "
                             f"{PIN_ON_FIRST_DOWNLOAD!r}, not {sha!r}")
        source = Source(**m["source"])
        if source.kind not in SOURCE_KINDS:
            raise InputError(f"{where}: model {m['name']}: unknown source kind {source.kind!r}")
        entries[m["name"]] = Entry(
            m["name"], m.get("display", m["name"]), source, sha, m["layout"], m.get("base"),
            tuple(sets[s] for s in m.get("landmark_sets", [])),
            tuple(m["input_hw"]) if m.get("input_hw") else None, m.get("sigma"), bool(m.get("flip_test", False)))
    return entries


def register_user_model(name: str, url: str, sha256: str) -> Entry:
    """Record a model the user added from a local file (layout: recognised from the file when it is read)."""
    record = {"name": name, "display": name, "source": {"kind": "local", "url": url}, "sha256": sha256,
              "layout": None}
    path = user_catalogue_path()
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"models": []}
    data["models"] = [m for m in data["models"] if m["name"] != name] + [record]
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return _parse({"models": [record]}, str(path))[name]


def lookup(name: str) -> Choice | None:
    """The catalogue choice `NAME` or `NAME:SET`; None when `name` is not a catalogue name."""
    entries = catalogue()
    entry_name, _, set_name = name.partition(":")
    entry = entries.get(entry_name)
    if entry is None:
        return None
    if not set_name:
        return Choice(entry)
    chosen = [s for s in entry.landmark_sets if s.name == set_name]
    if not chosen:
        have = ", ".join(s.name for s in entry.landmark_sets) or "none"
        raise InputError(f"{name}: {entry.name} has no landmark set {set_name!r} (its sets: {have})")
    return Choice(entry, chosen[0])


def choices() -> list[Choice]:
    """Every model to pick from: each entry (bases included: they are what fine-tuning starts from), and each
    landmark set of a multi-set entry."""
    out = []
    for entry in catalogue().values():
        out.append(Choice(entry))
        if len(entry.landmark_sets) > 1:
            out += [Choice(entry, s) for s in entry.landmark_sets]
    return out
