"""MedSapiens: anatomical landmark detection with Sapiens ViTs, LoRA adapters and a weight-free atlas.

`medsapiens.api` is the door to every job (detect, fine-tune, train, evaluate, analyse, models). The package root
holds the data shapes and errors every layer shares (plain numpy, no torch), and `load_detector` (api's, imported
on first use), so that code which only builds cases (the Slicer module's own process) stays light.
"""
from .case import Case, Landmarks, Volume
from .errors import Cancelled, InputError, NotBetter

__all__ = ["Case", "Volume", "Landmarks", "load_detector", "InputError", "Cancelled", "NotBetter"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_detector":
        from .api import load_detector

        return load_detector
    raise AttributeError(f"module 'medsapiens' has no attribute {name!r}")
