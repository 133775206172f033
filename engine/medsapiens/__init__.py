"""MedSapiens: anatomical landmark detection with Sapiens ViTs, LoRA adapters and a weight-free atlas.

The package root imports no torch: `Case`, `Volume`, `Landmarks` and `InputError` are plain numpy, and
`load_detector` is imported on first use, so that code which only builds cases (the Slicer module's main
process) stays light.
"""
from .case import Case, Landmarks, Volume
from .errors import InputError

__all__ = ["Case", "Volume", "Landmarks", "load_detector", "InputError"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_detector":
        from .detectors.factory import load_detector

        return load_detector
    raise AttributeError(f"module 'medsapiens' has no attribute {name!r}")
