"""A real MRML scene from slicer-core (Slicer's libraries, no application), set up as Slicer does."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedSapiensSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # panel_screenshot

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed for the Slicer tests")


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    logics = {"Markups": slicer.vtkSlicerMarkupsLogic(), "Volumes": slicer.vtkSlicerVolumesLogic()}
    for name, logic in logics.items():
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene.logics = logics  # kept alive with the scene
    scene.app = app
    yield scene
    scene.Clear(True)
