"""The Slicer module's folder (and the .ui loader, panel_screenshot) on sys.path, one engine worker process
shared by the tests (as the module keeps one warm); the `scene` fixture is in ../conftest.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSapiensSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # panel_screenshot

pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed for the Slicer tests")


@pytest.fixture(scope="session")
def ceph_volume(ceph):
    """load(scene, i, folder, annotated=True): cephalogram i as a 2D NRRD loaded by Slicer's volume reader, and
    (annotated) its reference points as a markups node; (volume, points or None)."""
    import SimpleITK as sitk
    import vtk

    def load(scene, i, folder, annotated=True):
        row = ceph.rows[i]
        image = sitk.ReadImage(str(ceph.root / row.image))
        image.SetSpacing((row.spacing,) * 2)
        path = folder / f"ceph{i:03d}" / "image.nrrd"  # a folder each: Slicer reads numbered files as a series
        path.parent.mkdir(exist_ok=True)
        sitk.WriteImage(image, str(path))
        volume = scene.logics["Volumes"].AddArchetypeVolume(str(path), f"ceph{i:03d}")
        if not annotated:
            return volume, None
        marks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"points{i:03d}")
        for name, (x, y), present in zip(row.landmarks.names, row.landmarks.points, row.landmarks.present):
            if present:  # a 2D image in Slicer: LPS (x sx, y sy, 0)
                marks.AddControlPoint(vtk.vtkVector3d(-x * row.spacing, -y * row.spacing, 0), name)
        return volume, marks

    return load


@pytest.fixture(scope="session")
def engine_worker():
    from MedSapiensSlicerLib.worker_client import EngineWorker

    worker = EngineWorker()
    yield worker
    worker.shutdown()
