"""MedSapiens: anatomical landmark detection with Sapiens ViTs, LoRA adapters and a weight-free atlas.

`medsapiens.api` is the door to every job (detect, fine-tune, train, evaluate, analyse, models). The package root
holds the data shapes and errors every layer shares (plain numpy, no torch), and `load_detector` (api's, imported
on first use), so that code which only builds cases (the Slicer module's own process) stays light.
"""
import os

# Torch's OpenMP threads wait for work by spinning. When the other cores are busy (Slicer drawing, another job),
# that spinning took ten times the work itself for the atlas's and the refiner's small tensors; passive waiting
# lets the waiting thread sleep (benchmarks/threads.py). It must be set before torch loads; a value set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .case import Case, Landmarks, Volume  # noqa: E402
from .errors import Cancelled, InputError, NotBetter  # noqa: E402

__all__ = ["Case", "Volume", "Landmarks", "load_detector", "InputError", "Cancelled", "NotBetter"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_detector":
        from .api import load_detector

        return load_detector
    raise AttributeError(f"module 'medsapiens' has no attribute {name!r}")
