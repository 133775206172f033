"""First-use set-up inside Slicer: ask, then install torch (SlicerPyTorch when present) and the engine's needs.

slicer.pydeps.pip_ensure where Slicer has it (>= 5.11), slicer.util.pip_install before.

Nothing is installed at import time. The engine package `medsapiens` ships inside the extension; in a source
checkout (module added by path) the repository's `engine/` folder is put on sys.path instead.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
IMPORT_NAMES = {"torch": "torch", "peft": "peft", "safetensors": "safetensors", "pynrrd": "nrrd", "tqdm": "tqdm",
                "matplotlib": "matplotlib", "SimpleITK": "SimpleITK", "numpy": "numpy"}


def add_engine_to_path() -> None:
    source_engine = MODULE_DIR.parent / "engine"
    if importlib.util.find_spec("medsapiens") is None and (source_engine / "medsapiens").is_dir():
        sys.path.insert(0, str(source_engine))


def requirements() -> list[str]:
    return [line.strip() for line in REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def missing() -> list[str]:
    """Requirement lines whose package cannot be imported."""
    out = []
    for req in requirements():
        name = req.split(">")[0].split("=")[0].split("<")[0].strip()
        if importlib.util.find_spec(IMPORT_NAMES.get(name, name)) is None:
            out.append(req)
    return out


def ensure_engine(ask: bool = True) -> bool:
    """True when the engine can run; otherwise asks (in Slicer) and installs. False if the user declined."""
    add_engine_to_path()
    needed = missing()
    if not needed:
        return True
    import slicer

    if ask and not slicer.util.confirmOkCancelDisplay(
            "MedSapiens needs these Python packages, which are not installed yet:\n  " + "\n  ".join(needed) +
            "\n\nInstall them now? (PyTorch is a large download.)", windowTitle="MedSapiens set-up"):
        return False
    if any(r.startswith("torch") for r in needed):
        try:
            import PyTorchUtils  # SlicerPyTorch picks a build that matches the GPU driver

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                raise RuntimeError("PyTorch installation failed or was cancelled")
        except ImportError:
            slicer.util.pip_install(next(r for r in needed if r.startswith("torch")))
        needed = [r for r in needed if not r.startswith("torch")]
    if needed:
        try:
            import slicer.pydeps  # Slicer >= 5.11: asks nothing more, shows progress, skips bundled packages
            from packaging.requirements import Requirement

            slicer.pydeps.pip_ensure([Requirement(r) for r in needed], skip_packages=["SimpleITK", "torch", "numpy"],
                                     requester="MedSapiens")
        except ImportError:  # older Slicer
            slicer.util.pip_install(" ".join(f'"{r}"' for r in needed))
    return not missing()
