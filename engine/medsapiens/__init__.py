"""MedSapiens: anatomical landmark detection with Sapiens ViTs, LoRA adapters and a weight-free atlas."""
from .case import Case, Landmarks
from .detectors import load_detector
from .errors import InputError

__all__ = ["Case", "Landmarks", "load_detector", "InputError"]
__version__ = "0.1.0"
