"""Read 2D images of any common medical or plain format into a Case, and 3D volumes into a Volume, with spacing
and geometry from the file.

PNG, JPEG, TIFF, BMP, NIfTI, MHA, DICOM (a file, or a series in a folder for volumes) through SimpleITK; NRRD
through pynrrd. The pixel/voxel -> LPS matrix comes from the file's origin, direction and spacing; plain photos
get origin 0, identity axes and the given spacing, so that LPS = (x * sx, y * sy, 0) as for a PNG loaded into
Slicer.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..case import Case, Volume
from ..errors import InputError

PLAIN_FORMATS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# What a file name ends with to say its format rather than its case (compound ones first). Any other name is
# the case id as it is: a DICOM file without a suffix or named by a UID with dots, a DICOM series folder.
FORMAT_SUFFIXES = (".nii.gz", ".mrk.json", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom") + PLAIN_FORMATS


def case_id(path) -> str:
    """The case a file or folder belongs to: `001.nii.gz`, `001.mrk.json`, `001.png` and a DICOM series folder
    `001/` are all case "001"; `ceph.001.png` is "ceph.001". The one place where file names become case ids."""
    name = Path(path).name
    lower = name.lower()
    for suffix in FORMAT_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path, spacing: float | None = None) -> Case:
    """The image as a Case named by the file stem; `spacing` (mm) overrides or supplies the pixel size."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise InputError(f"{path}: spacing must be a positive number of mm, got {spacing}")
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        array, geometry = _read_nrrd(path)
    else:
        array, geometry = _read_sitk(path)
    plane, geometry = _to_2d(path, array, geometry)
    if not np.isfinite(geometry).all():
        raise InputError(f"{path}: the file's spacing or orientation is not finite (NaN or infinity)")
    sx, sy = np.linalg.norm(geometry[:3, 0]), np.linalg.norm(geometry[:3, 1])
    if not (sx > 0 and sy > 0):
        raise InputError(f"{path}: the file's pixel spacing is zero")
    try:
        case = Case(plane, (sx, sy), name=case_id(path), pixel_to_lps=geometry)
    except InputError as e:  # the Case names itself by its id; here the file is what the user knows
        raise InputError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
    return case if spacing is None else with_spacing(case, spacing)


def image_files(paths) -> list[Path]:
    """Files as given; a folder stands for the image files in it (sorted by name; markups files skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.lower().endswith(".mrk.json")
                            and p.name.lower().endswith(FORMAT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such image file or folder")
    return files


def with_spacing(case: Case, spacing: float) -> Case:
    """The case with square pixels of `spacing` mm, keeping its origin and directions (the file's own sizes go)."""
    geometry = case.pixel_to_lps.copy()
    geometry[:3, 0] *= spacing / case.spacing[0]
    geometry[:3, 1] *= spacing / case.spacing[1]
    return Case(case.image, (spacing, spacing), case.landmarks, case.name, geometry)


def read_volume(path) -> Volume:
    """A 3D scalar volume (NIfTI, NRRD, MHA, a DICOM file or a folder holding one DICOM series) as a Volume
    named by its case id, with the file's own index -> LPS geometry."""
    path = Path(path)
    if path.is_dir():
        array, geometry = _read_dicom_series(path)
    elif not path.is_file():
        raise InputError(f"{path}: no such volume file or DICOM folder")
    elif path.suffix.lower() in (".nrrd", ".nhdr"):
        array, geometry = _read_nrrd(path)
    else:
        array, geometry = _read_sitk(path)
    return _volume(path, array, geometry, case_id(path))


def _volume(path: Path, array: np.ndarray, geometry: np.ndarray, name: str) -> Volume:
    comps, depth, height, width = array.shape
    if depth == 1:
        raise InputError(f"{path}: a 2D image ({width} x {height}), not a volume; this detector works on volumes")
    if comps != 1:
        raise InputError(f"{path}: {comps} components per voxel; expected a scalar (grey) volume")
    if not np.isfinite(geometry).all():
        raise InputError(f"{path}: the file's spacing or orientation is not finite (NaN or infinity)")
    voxels = array[0]
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise InputError(f"{path}: the volume holds NaN or infinite values")
    if voxels.max() <= voxels.min():
        raise InputError(f"{path}: the volume is empty (every voxel is {voxels.flat[0]})")
    return Volume(voxels, geometry, name=name)


def _read_dicom_series(folder: Path, files=None):
    """The pixels and geometry of the one DICOM series in `folder`, or of the series made of `files` (in slice
    order, as dicom_series gives them)."""
    import SimpleITK as sitk

    if files is None:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise InputError(f"{folder}: no DICOM series in this folder")
        if len(series) > 1:
            raise InputError(f"{folder}: {len(series)} DICOM series in one folder; give a folder per series")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return _read_sitk(folder, reader)


def is_dicom(path: Path) -> bool:
    """A DICOM file (Part 10: "DICM" after its 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series(folder: Path) -> list[tuple[Path, str, list[Path]]]:
    """Every DICOM series in `folder` and its subfolders (a PACS export: a folder per study or series, or all in
    one): (its folder, its Series Instance UID, its files in slice order), folders in name order. Files that are
    not DICOM images (a DICOMDIR, notes) are passed over."""
    import SimpleITK as sitk

    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        by_uid: dict[str, list[Path]] = {}
        for name in sorted(names):
            uid = _series_uid(Path(root) / name)
            if uid is not None:
                by_uid.setdefault(uid, []).append(Path(root) / name)
        for uid, files in by_uid.items():
            if len(files) > 1:  # slices: GDCM orders them along the normal
                files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid)] or files
            found.append((Path(root), uid, files))
    return found


def _series_uid(path: Path) -> str | None:
    """The Series Instance UID of a DICOM image file ("" where it has none), None for anything else."""
    import SimpleITK as sitk

    if not is_dicom(path):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # a DICOMDIR or another DICOM file without an image
        return None
    return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""


def read_dicom_volume(folder: Path, files: list[Path], name: str) -> Volume:
    """One DICOM series of dicom_series as a Volume named `name`."""
    array, geometry = _read_dicom_series(folder, files)
    return _volume(folder, array, geometry, name)


def _read_sitk(path: Path, reader=None):
    import SimpleITK as sitk

    try:
        image = reader.Execute() if reader is not None else sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: not a readable image ({_why_unreadable(path, e)})") from None
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) or (y, x[, c])
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() == 1:
        array = array[..., None]
    array = np.moveaxis(array, -1, 0)  # components first
    while array.ndim < 4:
        array = array[:, None]
    geometry = np.eye(4)
    spacing = list(image.GetSpacing()) + [1.0] * (3 - dim)
    direction = np.eye(3)
    direction[:dim, :dim] = np.array(image.GetDirection()).reshape(dim, dim)
    geometry[:3, :3] = direction @ np.diag(spacing)
    geometry[:3, 3] = list(image.GetOrigin()) + [0.0] * (3 - dim)
    return array, geometry


def _why_unreadable(path: Path, error: RuntimeError) -> str:
    """ITK's complaint in the user's words: an empty file, a format it cannot read, or a damaged file."""
    text = str(error)
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if "Unable to determine ImageIO reader" in text:
        return "not an image format it reads: PNG, JPEG, TIFF, BMP, NRRD, NIfTI, MHA or DICOM"
    return "the file is damaged or cut short"


def _read_nrrd(path: Path):
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="C")
    except Exception as e:  # pynrrd raises NRRDError, ValueError, OSError... for bad files
        raise InputError(f"{path}: not a readable NRRD file ({str(e).splitlines()[0][:160]})") from None
    kinds = header.get("kinds", ["domain"] * data.ndim)
    # C order: axes reversed; component (non-domain) axis first if any
    axes_c = list(reversed(kinds))
    comp = [i for i, k in enumerate(axes_c) if k not in ("domain", "space")]
    if comp:
        data = np.moveaxis(data, comp[0], 0)
    else:
        data = data[None]
    while data.ndim < 4:
        data = data[:, None]
    geometry = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        d = np.array([row for row in directions if row is not None and not np.all(np.isnan(row))], float)
        geometry[: d.shape[1], : d.shape[0]] = d.T
    elif "spacings" in header:
        domain = [s for s, k in zip(header["spacings"], kinds) if k in ("domain", "space")]
        geometry[: len(domain), : len(domain)] = np.diag(domain)  # NaN here is refused by read_image
    origin = header.get("space origin")
    if origin is not None:
        geometry[: len(origin), 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        geometry = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry
    return data, geometry


def _to_2d(path: Path, array: np.ndarray, geometry: np.ndarray):
    """(components, z, y, x) -> (y, x) or (y, x, 3); refuses true 3D volumes."""
    comps, depth, height, width = array.shape
    if depth != 1:
        raise InputError(f"{path}: a 3D volume ({width} x {height} x {depth}); detection works on a 2D image "
                         "or on a slice chosen in the Slicer module")
    plane = array[:, 0]
    if comps == 1:
        plane = plane[0]
    elif comps in (3, 4):
        rgb = plane[:3]
        plane = rgb[0] if (rgb[0] == rgb[1]).all() and (rgb[0] == rgb[2]).all() else np.moveaxis(rgb, 0, -1)
    elif comps == 2:  # grey + alpha
        plane = plane[0]
    else:
        raise InputError(f"{path}: {comps} channels per pixel; expected grey or RGB")
    if plane.dtype.kind == "c" or plane.dtype == bool:
        raise InputError(f"{path}: unsupported pixel type {plane.dtype}")
    return np.ascontiguousarray(plane), geometry
