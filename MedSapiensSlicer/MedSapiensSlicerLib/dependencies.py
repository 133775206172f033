"""First-use set-up inside Slicer: which Slicer releases are supported, and installing the engine's packages.

`EngineInstaller.ensure()` asks once (one dialog naming every package and the approximate download), then
installs torch through SlicerPyTorch's PyTorchUtils when that extension is present (it picks the build that
matches the GPU driver) and the rest with `slicer.packaging.pip_ensure` (Slicer 5.12+), else
`slicer.util.pip_install` (Slicer 5.10). Nothing is installed at import time, without asking, or twice at
once (Slicer's install dialog keeps the event loop running, so a second click can arrive during an install).

The engine package `medsapiens` ships inside the extension; in a source checkout (module added by path) the
repository's `engine/` folder is put on sys.path instead.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from subprocess import CalledProcessError

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
REQUESTER = "MedSapiens"
OLDEST_SLICER = (5, 10)  # 5.10 and 5.12 bundle Python 3.12; older releases are not tested
# Approximate download of each package with what it pulls in, shown before asking. torch: the CPU build; a
# CUDA build (what SlicerPyTorch picks where an NVIDIA driver is found) is larger.
DOWNLOAD_MB = {"torch": 200, "peft": 25, "safetensors": 1, "pynrrd": 1, "tqdm": 1, "matplotlib": 20}
TORCH_CUDA_GB = 3
# Never replaced by pip_ensure: torch comes from SlicerPyTorch (the right CUDA build), the others ship with Slicer.
KEEP_AS_INSTALLED = ["torch", "SimpleITK", "numpy"]


class InstallError(RuntimeError):
    """An install that failed; its message is one line, shown in the panel."""


def slicer_version_problem(major: int, minor: int) -> str | None:
    """A one-line message when this Slicer release is older than the oldest supported one, else None."""
    if (major, minor) >= OLDEST_SLICER:
        return None
    oldest = ".".join(map(str, OLDEST_SLICER))
    return (f"MedSapiens needs 3D Slicer {oldest} or later (this is {major}.{minor}); "
            "install a current release from download.slicer.org.")


def add_engine_to_path() -> None:
    source_engine = MODULE_DIR.parent / "engine"
    if importlib.util.find_spec("medsapiens") is None and (source_engine / "medsapiens").is_dir():
        sys.path.insert(0, str(source_engine))


def requirements(path: Path = REQUIREMENTS) -> list:
    """The requirement lines of requirements.txt as packaging Requirements."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # not every Slicer release ships `packaging` itself; its pip carries a copy
        from pip._vendor.packaging.requirements import Requirement

    return [Requirement(line.strip()) for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-"))]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(path: Path = REQUIREMENTS) -> list:
    """Requirements whose package is not installed at a version they accept (torch below the minimum included)."""
    importlib.invalidate_caches()  # see what a pip subprocess has just installed
    out = []
    for req in requirements(path):
        version = installed_version(req.name)
        if version is None or not req.specifier.contains(version, prereleases=True):
            out.append(req)
    return out


def describe(needed: list) -> str:
    """The dialog text: each package with its approximate download, and the total."""
    lines, total = [], 0
    for req in needed:
        mb = DOWNLOAD_MB.get(req.name, 5)
        total += mb
        note = (f"about {mb} MB for the CPU build, up to {TORCH_CUDA_GB} GB for a CUDA build"
                if req.name == "torch" else f"about {mb} MB")
        have = installed_version(req.name)
        lines.append(f"  {req}  ({note}{f'; {have} is installed' if have else ''})")
    cuda = f" (up to {TORCH_CUDA_GB} GB with a CUDA build of PyTorch)" if any(r.name == "torch" for r in needed) else ""
    return ("MedSapiens needs these Python packages (not installed yet, or older than it needs):\n" + "\n".join(lines) +
            f"\n\nDownload: about {total} MB{cuda}, once. Install them now?")


class EngineInstaller:
    """Installs the engine's missing packages after one question; at most one install runs at a time."""

    def __init__(self, requirements_file: Path = REQUIREMENTS):
        self.requirements_file = Path(requirements_file)
        self.busy = False

    def missing(self) -> list:
        return missing(self.requirements_file)

    def ensure(self) -> bool:
        """True when the engine's packages are there (installing them after asking); False if the user declined
        or an install is already running. Raises InstallError (one line) when the install fails."""
        if self.busy:
            return False
        needed = self.missing()
        if not needed:
            return True
        import slicer

        if not slicer.util.confirmOkCancelDisplay(describe(needed), windowTitle=f"{REQUESTER} set-up"):
            return False
        self.busy = True
        try:
            torch = [r for r in needed if r.name == "torch"]
            if torch:
                self._install_torch(torch[0])
            rest = [r for r in needed if r.name != "torch"]
            if rest:
                self._pip(rest)
        except InstallError:
            raise
        except CalledProcessError as e:
            raise InstallError(f"pip failed (exit status {e.returncode}) installing "
                               f"{', '.join(str(r) for r in needed)}; pip's log is in the Python console") from None
        except Exception as e:  # one line, whatever the installer raised
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InstallError(f"installing {', '.join(str(r) for r in needed)} failed: {first}") from None
        finally:
            self.busy = False
        still = self.missing()
        if still:
            raise InstallError("still missing after the install: " + ", ".join(
                f"{r} ({installed_version(r.name)} is installed)" if installed_version(r.name) else str(r)
                for r in still))
        return True

    def _install_torch(self, req) -> None:
        """torch through SlicerPyTorch (the build for this GPU driver) when installed, else through pip."""
        try:
            import PyTorchUtils  # a scripted module of the SlicerPyTorch extension
        except ImportError:
            self._pip([req], keep=[])
            return
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=str(req.specifier)) is None:
            raise InstallError("PyTorch was not installed (the PyTorch Utils module installed nothing)")
        version = installed_version("torch")
        if version is None or not req.specifier.contains(version, prereleases=True):
            raise InstallError(f"torch {version} is installed but MedSapiens needs {req}; update it in the "
                               "PyTorch Utils module, then restart Slicer")

    def _pip(self, reqs: list, keep: list | None = None) -> None:
        """slicer.packaging.pip_ensure (5.12+: progress dialog, keeps Slicer's own packages), else pip_install."""
        import slicer

        keep = KEEP_AS_INSTALLED if keep is None else keep
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure([str(r) for r in reqs], skip_packages=[k for k in keep if installed_version(k)]
                                 or None, prompt_install=False, requester=REQUESTER)
        else:
            slicer.util.pip_install([str(r) for r in reqs])  # a list: each requirement is one argument
