"""The Slicer module's folder (and the panel screenshot helper) on sys.path; the `scene` fixture is in ../conftest.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSapiensSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # panel_screenshot

pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed for the Slicer tests")
