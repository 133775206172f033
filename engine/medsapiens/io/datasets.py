"""Landmark data sets on disk: `landmarks.csv` (image,width,height,spacing_mm,<name>_x,<name>_y,...) for 2D
images in pixels, or (image,<name>_x,<name>_y,<name>_z,...) for volumes in LPS millimetres.

Empty cells mark missing landmarks. A detector's output adds `<name>_p,<name>_check` after each landmark's
coordinates: the calibrated P(within 2 mm) and 1 where the point should be checked (empty for a missing one). Images are read lazily, relative to the CSV's folder. `spacing_mm` is one
number, the size of the row's square pixels: it sets the spacing of plain pictures (PNG, JPEG...), and a file
that stores non-square pixels (NRRD, NIfTI, MHA, DICOM) cannot be described by it, so such a row is refused when
read and such a case when written, each with a one-line error.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..case import Case, Landmarks, Volume
from ..errors import InputError
from .atomic import atomic_write_text
from .images import PLAIN_FORMATS, case_id, read_image, read_volume, with_spacing

SQUARE_TOLERANCE = 1e-6  # relative difference of the two pixel sizes still written as one spacing_mm


@dataclass
class Row:
    image: str
    width: int | None  # None in a volume set
    height: int | None
    spacing: float | None
    landmarks: Landmarks

    @property
    def id(self) -> str:
        return case_id(self.image)


class Dataset:
    """The rows of a landmarks.csv (or of the one in a given folder); `case(i)` reads image i and checks its size."""

    def __init__(self, csv_path):
        path = Path(csv_path)
        self.path = path / "landmarks.csv" if path.is_dir() else path
        self.root = self.path.parent
        self.names, self.rows = _read_csv(self.path)
        self.dim = self.rows[0].landmarks.dim  # 2: images (pixels), 3: volumes (LPS mm)

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    def select(self, ids: list[str]) -> list[int]:
        index = {r.id: i for i, r in enumerate(self.rows)} | {r.image: i for i, r in enumerate(self.rows)}
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise InputError(f"{self.path}: no rows for {', '.join(unknown)} (ids are image stems like "
                             f"{self.rows[0].id})")
        return [index[i] for i in ids]

    def case(self, i: int) -> Case | Volume:
        row = self.rows[i]
        image_path = self.root / row.image
        if self.dim == 3:
            volume = read_volume(image_path)
            volume.landmarks = row.landmarks
            return volume
        case = read_image(image_path)
        if not image_path.name.lower().endswith(PLAIN_FORMATS) and not square_pixels(case.spacing):
            raise InputError(f"{image_path}: its pixels are {case.spacing[0]:g} x {case.spacing[1]:g} mm, which "
                             f"the one spacing_mm of {self.path} cannot describe; use .mrk.json files instead")
        case = with_spacing(case, row.spacing)
        if case.size != (row.width, row.height):
            raise InputError(f"{image_path}: image is {case.size[0]} x {case.size[1]} px but {self.path} says "
                             f"{row.width} x {row.height}")
        case.landmarks = row.landmarks
        return case


def load_cases(path, ids: list[str] | None = None) -> list[Case | Volume]:
    """Annotated cases from a landmarks.csv (all rows, or those of `ids`) or a folder of `.mrk.json` + images
    or volumes (2D cases or volumes, not both)."""
    path = Path(path)
    if path.is_dir() and not (path / "landmarks.csv").is_file():
        cases = _markups_folder(path)
        if ids:
            chosen = [c for c in cases if c.name in ids]
            unknown = sorted(set(ids) - {c.name for c in chosen})
            if unknown:
                raise InputError(f"{path}: no .mrk.json for {', '.join(unknown)}")
            cases = chosen
        return cases
    ds = Dataset(path)
    return [ds.case(i) for i in (ds.select(ids) if ids else range(len(ds)))]


def _markups_folder(folder: Path) -> list[Case | Volume]:
    from .markups import landmarks_from_markups

    cases = []
    for mrk in sorted(folder.glob("*.mrk.json")):
        stem = case_id(mrk)
        images = sorted(p for p in folder.iterdir() if case_id(p) == stem and not p.name.endswith(".mrk.json"))
        if not images:
            raise InputError(f"{mrk}: no image named {stem}.* beside it")
        case = read_case(images[0])
        case.name = stem
        case.landmarks = landmarks_from_markups(mrk, case)
        cases.append(case)
    if not cases:
        raise InputError(f"{folder}: no .mrk.json files beside images")
    if len({isinstance(c, Volume) for c in cases}) > 1:
        raise InputError(f"{folder}: mixes 2D images and 3D volumes; an atlas is one or the other")
    return cases


def read_case(path) -> Case | Volume:
    """A 2D image as a Case or a 3D volume (or DICOM series folder) as a Volume, whichever the file holds."""
    try:
        return read_image(path)
    except InputError as e:
        if "a 3D volume" not in str(e) and not Path(path).is_dir():
            raise
    return read_volume(path)


def _read_csv(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is not None and header[:1] == ["image"] and len(header) > 1 and header[1].endswith("_x") \
            and len(header) > 3 and header[3].endswith("_z"):
        return _read_volume_rows(path, header, reader)
    fixed = ["image", "width", "height", "spacing_mm"]
    if header is None or [h.strip() for h in header[:4]] != fixed:
        raise InputError(f"{path}: not a landmarks CSV: the header must start with {','.join(fixed)} (images) or "
                         "image,<name>_x,<name>_y,<name>_z (volumes)")
    names, review = _landmark_names(path, [h.strip() for h in header[4:]], "xy")
    rows = []
    for line_no, cells in _data_rows(path, header, reader):
        try:
            width, height, spacing = int(cells[1]), int(cells[2]), float(cells[3])
            landmarks = _landmarks(names, cells[4:], 2, review)
        except ValueError as e:
            raise InputError(f"{path}, line {line_no}: {e}") from None
        if not (math.isfinite(spacing) and spacing > 0):
            raise InputError(f"{path}, line {line_no}: spacing_mm must be a positive number, got {cells[3]}")
        rows.append(Row(cells[0], width, height, spacing, landmarks))
    return names, rows


def _landmarks(names: list[str], cells: list[str], dim: int, review: bool) -> Landmarks:
    """One row's landmarks from its coordinate cells (and P, check cells where the file has them)."""
    width = dim + 2 if review else dim
    values = np.array([float(c) if c.strip() else math.nan for c in cells]).reshape(-1, width)
    points = values[:, :dim]
    if not review:
        return Landmarks(names, points)
    present = np.isfinite(points).all(axis=1)
    confidence = np.where(np.isfinite(values[:, dim]), values[:, dim], present.astype(float))
    return Landmarks(names, points, confidence, present, np.nan_to_num(values[:, dim + 1]) > 0)


def _read_volume_rows(path: Path, header: list[str], reader):
    """The rows of a 3D landmarks CSV: image,<name>_x,<name>_y,<name>_z,... in LPS millimetres."""
    names, review = _landmark_names(path, [h.strip() for h in header[1:]], "xyz", allow_none=True)
    rows = []
    for line_no, cells in _data_rows(path, header, reader):
        try:
            landmarks = _landmarks(names, cells[1:], 3, review)
        except ValueError as e:
            raise InputError(f"{path}, line {line_no}: {e}") from None
        rows.append(Row(cells[0], None, None, None, landmarks))
    return names, rows


def _landmark_names(path: Path, coords: list[str], axes: str, allow_none: bool = False) -> tuple[list[str], bool]:
    """Landmark names from coordinate columns grouped as <name>_x,<name>_y(,<name>_z), each group optionally
    followed by <name>_p,<name>_check (all groups or none); and whether they are."""
    n, pattern = len(axes), ",".join(f"<name>_{a}" for a in axes)
    group = {2: "pair", 3: "triple"}[n]
    review = len(coords) > n + 1 and coords[n].endswith("_p") and coords[n + 1].endswith("_check")
    width = n + 2 if review else n
    if len(coords) % width or not (coords or allow_none):
        raise InputError(f"{path}: landmark columns must come in {pattern} {group}s"
                         + (" each followed by <name>_p,<name>_check" if review else ""))
    names = []
    for i in range(0, len(coords), width):
        cols = coords[i:i + n]
        if not all(c.endswith(f"_{a}") for c, a in zip(cols, axes)) or len({c[:-2] for c in cols}) != 1:
            raise InputError(f"{path}: columns {','.join(cols)} are not a {pattern} {group}")
        name = cols[0][:-2]
        if review and coords[i + n:i + width] != [f"{name}_p", f"{name}_check"]:
            raise InputError(f"{path}: columns {','.join(coords[i + n:i + width])} should be {name}_p,{name}_check")
        names.append(name)
    return names, review


def _data_rows(path: Path, header: list[str], reader):
    """(line number, cells) of each non-blank row, which must have the header's width; at least one."""
    count = 0
    for line_no, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise InputError(f"{path}, line {line_no}: {len(cells)} cells, the header has {len(header)}")
        count += 1
        yield line_no, cells
    if not count:
        raise InputError(f"{path}: no data rows")


def volume_landmarks_csv(rows: list[tuple[str, Landmarks]], review: bool = False) -> str:
    """3D CSV text (image,<name>_x,<name>_y,<name>_z,..., LPS mm) for (image, landmarks) rows of one set; review:
    each landmark's P and check flag too (a detector's output)."""
    names = rows[0][1].names
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image"] + _header(names, "xyz", review))
    for image, lm in rows:
        if lm.names != names:
            raise ValueError("all rows of a landmarks CSV need the same landmark names")
        writer.writerow([image] + _cells(lm, "{:.4f}", review))
    return out.getvalue()


def _header(names: list[str], axes: str, review: bool) -> list[str]:
    more = ("p", "check") if review else ()
    return [f"{n}_{a}" for n in names for a in (*axes, *more)]


def _cells(lm: Landmarks, number: str, review: bool) -> list[str]:
    """A row's landmark cells: coordinates (and P, check), empty for a missing landmark."""
    cells = []
    for i, (p, ok) in enumerate(zip(lm.points, lm.present)):
        cells += [number.format(v) for v in p] if ok else [""] * lm.dim
        if review:
            cells += [f"{lm.confidence[i]:.3f}", "1" if lm.check[i] else "0"] if ok else ["", ""]
    return cells


def square_pixels(spacing) -> bool:
    """True when (sx, sy) is one size: what the one spacing_mm of a landmarks CSV can describe."""
    sx, sy = spacing
    return abs(sx - sy) <= SQUARE_TOLERANCE * max(sx, sy)


def landmarks_csv(rows: list[tuple[str, int, int, tuple[float, float], Landmarks]], review: bool = False) -> str:
    """CSV text for (image, width, height, (sx, sy) mm, landmarks) rows; all rows must share one landmark set and
    have square pixels (spacing_mm is one number: InputError otherwise); review: each landmark's P and check flag
    too (a detector's output)."""
    names = rows[0][4].names
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "width", "height", "spacing_mm"] + _header(names, "xy", review))
    for image, width, height, spacing, lm in rows:
        if lm.names != names:
            raise ValueError("all rows of a landmarks CSV need the same landmark names")
        if not square_pixels(spacing):
            raise InputError(f"{image}: its pixels are {spacing[0]:g} x {spacing[1]:g} mm, which the one "
                             "spacing_mm of a landmarks CSV cannot describe")
        writer.writerow([image, width, height, f"{spacing[0]:.6g}"] + _cells(lm, "{:.3f}", review))
    return out.getvalue()


def write_landmarks_csv(path, rows, review: bool = False) -> Path:
    return atomic_write_text(path, landmarks_csv(rows, review))


def landmark_sets(path) -> list[tuple[str, Landmarks, tuple[float, float]]]:
    """(image, landmarks in pixels, spacing) per image of a landmarks.csv or of a folder (its landmarks.csv, else
    its `.mrk.json` + image pairs). A CSV is read without its images; a `.mrk.json` needs its image's pixel grid.
    """
    path = Path(path)
    if path.is_dir() and not (path / "landmarks.csv").is_file():
        return [(c.name, c.landmarks, c.spacing) for c in load_cases(path)]
    return [(r.image, r.landmarks, (r.spacing, r.spacing)) for r in Dataset(path).rows]


def write_volume_landmarks_csv(path, rows, review: bool = False) -> Path:
    return atomic_write_text(path, volume_landmarks_csv(rows, review))
