"""Landmark sets: the landmarks of a task as data, in their order, with a one-line description each and optionally
a reference picture. They are the templates an annotation follows (the Slicer panel's "Annotate this image") and
what an annotated case is checked against.

The shipped sets (ISBI 2015 cephalometric, the hand set of Payer et al. 2019) are `landmark_sets.json` beside this
file, in the same form as a user's JSON set. A set is also read from a user's CSV (`name,description`), from any
model's, adapter's or annotated case's names (a catalogue model, a `.safetensors` file, a `.mrk.json`, a data
set's `landmarks.csv`), or from a list of names. Names without a description of their own take the one of a
shipped set holding all of them. Plain Python and json: no torch, no image library.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import InputError, short_list

SET_FILE_KINDS = "a landmark set (CSV name,description or JSON), a .mrk.json, a landmarks.csv or a .safetensors file"


@dataclass(frozen=True)
class LandmarkSet:
    """Ordered landmark names, a one-line description each ("" where none is known), an optional picture."""

    name: str                 # a shipped set's name (isbi2015), else where it was read from
    title: str                # what a person is shown: "ISBI 2015 cephalometric (19)"
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    picture: Path | None = None

    def description(self, name: str) -> str:
        return self.descriptions[self.names.index(name)]


@lru_cache(maxsize=1)
def shipped() -> dict[str, LandmarkSet]:
    """The sets shipped with the engine, by name."""
    source = resources.files("medsapiens") / "landmark_sets.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    return {s["name"]: _from_document(s, Path(str(source)), s["name"]) for s in data["sets"]}


def load(source, title: str | None = None) -> LandmarkSet:
    """A set from a shipped set's name, a catalogue model's name (`NAME` or `NAME:SET`), a file (see
    SET_FILE_KINDS) or a sequence of names (called `title`). One line naming the source and the problem when it
    cannot be read."""
    if not isinstance(source, (str, Path)):
        return from_names(source, title or "these points")
    text = str(source).strip()
    if text in shipped():
        return shipped()[text]
    path = Path(text).expanduser()
    if path.is_file():
        return read_file(path)
    from .models.catalogue import lookup

    choice = lookup(text) if text and not path.suffix else None
    if choice is not None:
        if not choice.landmark_names:
            raise InputError(f"{text}: the catalogue does not name this model's landmarks")
        return from_names(choice.landmark_names, choice.name)
    raise InputError(f"{text}: not a landmark set ({', '.join(shipped())}), a catalogue model or a file")


def from_names(names, title: str) -> LandmarkSet:
    """A set of these names (a model's, an adapter's, a case's), described where a shipped set holds them all."""
    names = tuple(str(n).strip() for n in names)
    _check_unique(names, title)
    known = next((s for s in shipped().values() if set(names) <= set(s.names)), None)
    descriptions = tuple(known.description(n) if known else "" for n in names)
    return LandmarkSet(title, f"{title} ({len(names)})", names, descriptions)


def read_file(path) -> LandmarkSet:
    """A set from a file: CSV `name,description` (header optional), JSON (see landmark_sets.json: a title, the
    landmarks as names or {name, description}, an optional picture beside the file), the names of a `.mrk.json`,
    of a landmarks.csv data set or of a `.safetensors` model or adapter."""
    path = Path(path)
    if path.name.endswith(".mrk.json"):
        from .io.markups import read_markups

        return from_names(read_markups(path)[0], path.name)
    if path.suffix == ".safetensors":
        from .models.weight_files import read_metadata

        meta = read_metadata(path)
        if not meta or not meta.get("landmark_names"):
            raise InputError(f"{path}: not a model or adapter file made by medsapiens (it names no landmarks)")
        return from_names(meta["landmark_names"], path.name)
    text = _text(path)
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return _from_document(document, path, path.name)
    if path.suffix == ".csv":
        return _from_csv(text, path)
    raise InputError(f"{path}: not {SET_FILE_KINDS}")


def check_names(names, what: str, expected: LandmarkSet | None = None) -> None:
    """Refuse, in one line about `what`, names that repeat a landmark or, against `expected`, hold a name it lacks
    or not all of its landmarks (a point kept unplaced or marked missing still counts; a deleted one does not)."""
    names = [str(n).strip() for n in names]
    _check_unique(names, what)
    if expected is None:
        return
    unknown = [n for n in names if n not in expected.names]
    if unknown:
        which = ", ".join(repr(n) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(f"{what}: {which} {'is not a landmark' if len(unknown) == 1 else 'are not landmarks'} of "
                         f"{expected.title} ({short_list(expected.names)})")
    absent = [n for n in expected.names if n not in names]
    if absent:
        raise InputError(f"{what}: {len(names)} points for the {len(expected.names)} landmarks of {expected.title}; "
                         f"{short_list(absent)} {'is' if len(absent) == 1 else 'are'} not there (keep a landmark "
                         "you cannot place as an unplaced or missing point instead of deleting it)")


def _check_unique(names, what: str) -> None:
    seen = {}
    for i, name in enumerate(names):
        if not name:
            raise InputError(f"{what}: point {i + 1} has no name")
        if name in seen:
            raise InputError(f"{what}: {name!r} appears twice (points {seen[name] + 1} and {i + 1}); each landmark "
                             "once")
        seen[name] = i


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None


def _from_csv(text: str, path: Path) -> LandmarkSet:
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    if rows and rows[0][0].strip().lower() == "image":  # a data set's landmarks.csv: its names
        from .io.datasets import Dataset

        return from_names(Dataset(path).names, f"{path.parent.name}/{path.name}")
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["name", "description"]:
        rows = rows[1:]
    if not rows:
        raise InputError(f"{path}: no landmarks (one line per landmark: name,description)")
    too_long = next((r for r in rows if len(r) > 2), None)
    if too_long is not None:
        raise InputError(f"{path}: {len(too_long)} columns in the line of {too_long[0].strip()!r}; a landmark set "
                         "has two, name,description (quote a description that holds a comma)")
    names = tuple(r[0].strip() for r in rows)
    _check_unique(names, str(path))
    return LandmarkSet(path.name, f"{path.stem} ({len(names)})", names,
                       tuple(r[1].strip() if len(r) > 1 else "" for r in rows))


def _from_document(document, path: Path, name: str) -> LandmarkSet:
    """One set from its JSON form: {"title", "landmarks": [name or {"name", "description"}], "picture"}."""
    landmarks = document.get("landmarks") if isinstance(document, dict) else None
    if not isinstance(landmarks, list) or not landmarks:
        raise InputError(f"{path}: a JSON landmark set needs \"landmarks\": a list of names or of "
                         "{\"name\": ..., \"description\": ...}")
    try:
        pairs = [(item, "") if isinstance(item, str) else (item["name"], item.get("description", ""))
                 for item in landmarks]
        names, descriptions = (tuple(str(v).strip() for v in column) for column in zip(*pairs))
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{path}: every landmark needs a name (a string, or an object with \"name\")") from None
    _check_unique(names, str(path))
    picture = document.get("picture")
    if picture is not None:
        picture = path.parent / str(picture)
        if not picture.is_file():
            raise InputError(f"{path}: its picture {picture} is not there")
    title = str(document.get("title") or f"{Path(name).stem} ({len(names)})")
    return LandmarkSet(name, title, names, descriptions, picture)
