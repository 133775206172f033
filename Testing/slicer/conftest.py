"""The Slicer module's folder (and the panel screenshot helper) on sys.path, one engine worker process shared by
the tests (as the module keeps one warm); the `scene` fixture is in ../conftest.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSapiensSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # panel_screenshot

pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed for the Slicer tests")


@pytest.fixture(scope="session")
def engine_worker():
    from MedSapiensSlicerLib.worker_client import EngineWorker

    worker = EngineWorker()
    yield worker
    worker.shutdown()
