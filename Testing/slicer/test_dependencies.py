"""The module's install flow against stand-ins of what Slicer provides: `slicer.packaging` with the 5.12
signatures (present, then absent: `slicer.util.pip_install`), SlicerPyTorch's PyTorchUtils (present, absent),
and the confirmation dialog. The stand-ins "install" by writing real package metadata into a folder on
sys.path, so the installer's own check (importlib.metadata against the requirement's version range) decides
whether an install worked, as it does in Slicer."""
import ast
import importlib
import sys
import types
from pathlib import Path
from subprocess import CalledProcessError

import pytest

import MedSapiensSlicerLib.dependencies as deps
from MedSapiensSlicerLib.dependencies import EngineInstaller, InstallError, slicer_version_problem

MODULE = Path(__file__).resolve().parents[2] / "MedSapiensSlicer"


class Site:
    """A folder on sys.path where stand-in installers put package metadata (name-version.dist-info/METADATA)."""

    def __init__(self, path: Path):
        self.path = path

    def install(self, name: str, version: str) -> None:
        info = self.path / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        importlib.invalidate_caches()


def version_for(requirement: str) -> str:
    """A version the requirement accepts (the stand-ins install that)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    return next(v for v in ("1.0", "2.5", "99.0", "100.0") if req.specifier.contains(v))


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))  # first on sys.path: its metadata wins, as a fresh install would
    return Site(folder)


@pytest.fixture
def slicer_app(monkeypatch, site):
    """slicer.util's dialog and pip_install as Slicer has them, recording what they were asked."""
    import slicer

    calls = {"dialogs": [], "pip_install": [], "site": site}
    answer = {"ok": True}

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        calls["dialogs"].append(text)
        return answer["ok"]

    def pip_install(requirements):
        calls["pip_install"].append(requirements)
        for r in requirements:
            site.install(r.split(">")[0].split("=")[0], version_for(r))

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirmOkCancelDisplay, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    monkeypatch.delitem(sys.modules, "PyTorchUtils", raising=False)
    return calls, answer


def packaging_512(site, calls, behaviour=None):
    """A stand-in `slicer.packaging` with Slicer 5.12's signatures; pip_ensure installs what it is given."""
    module = types.ModuleType("slicer.packaging")
    calls["pip_ensure"] = []

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        calls["pip_ensure"].append({"requirements": list(requirements), "skip_packages": skip_packages,
                                    "prompt_install": prompt_install, "requester": requester})
        if behaviour:
            return behaviour()
        for r in requirements:
            site.install(r.split(">")[0].split("=")[0], version_for(r))
        return [] if skip_packages else None

    def pip_check(req, _seen=None):
        raise AssertionError("not used: the installer checks versions itself")

    def load_requirements(path):
        raise AssertionError("not used")

    module.pip_ensure, module.pip_check, module.load_requirements = pip_ensure, pip_check, load_requirements
    return module


def use_packaging(monkeypatch, module):
    import slicer

    monkeypatch.setitem(sys.modules, "slicer.packaging", module)
    monkeypatch.setattr(slicer, "packaging", module, raising=False)


def pytorch_utils(site, calls, version="99.0"):
    """A stand-in SlicerPyTorch: installTorch(askConfirmation, ..., torchVersionRequirement) installs `version`."""
    calls["installTorch"] = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls["installTorch"].append({"askConfirmation": askConfirmation,
                                          "torchVersionRequirement": torchVersionRequirement})
            site.install("torch", version)
            return types.SimpleNamespace(__version__=version)

    module = types.ModuleType("PyTorchUtils")
    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    return module


def requirements_file(tmp_path, *lines) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("# test\n" + "\n".join(lines) + "\n")
    return path


def test_missing_checks_installed_versions_against_the_requirements(tmp_path, site):
    path = requirements_file(tmp_path, "numpy>=1.0", "numpy-but-not-installed>=1.0", "pytest>=999")
    assert [str(r) for r in deps.missing(path)] == ["numpy-but-not-installed>=1.0", "pytest>=999"]
    site.install("numpy-but-not-installed", "1.2")
    assert [str(r) for r in deps.missing(path)] == ["pytest>=999"]
    # the module's own list is what this test environment was installed from
    assert deps.missing() == []


def test_missing_works_without_the_packaging_distribution(tmp_path, site, monkeypatch):
    """A Slicer without `packaging` itself still has pip, whose vendored copy reads the requirements."""
    for name in ("packaging", "packaging.requirements"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as where it is not installed
    path = requirements_file(tmp_path, "numpy>=1.0", "numpy-but-not-installed>=1.0")
    assert [str(r) for r in deps.missing(path)] == ["numpy-but-not-installed>=1.0"]


def test_requirements_agree_with_the_engine_package():
    """requirements.txt names the engine's dependencies with the same minimum versions, less what Slicer bundles."""
    import tomllib

    from packaging.requirements import Requirement

    engine = {Requirement(r).name: str(Requirement(r).specifier) for r in
              tomllib.loads((MODULE.parent / "pyproject.toml").read_text())["project"]["dependencies"]}
    module = {r.name: str(r.specifier) for r in deps.requirements()}
    assert module == {k: v for k, v in engine.items() if k not in ("numpy", "SimpleITK")}
    assert module["torch"]  # the torch minimum comes from here


def test_declined_dialog_installs_nothing(tmp_path, site, slicer_app, monkeypatch):
    calls, answer = slicer_app
    use_packaging(monkeypatch, packaging_512(site, calls))
    answer["ok"] = False
    installer = EngineInstaller(requirements_file(tmp_path, "fake-peft>=0.12"))
    assert installer.ensure() is False
    assert len(calls["dialogs"]) == 1 and calls["pip_ensure"] == [] and calls["pip_install"] == []
    assert [str(r) for r in installer.missing()] == ["fake-peft>=0.12"]


def test_asks_once_then_installs_with_pip_ensure(tmp_path, site, slicer_app, monkeypatch):
    calls, _ = slicer_app
    use_packaging(monkeypatch, packaging_512(site, calls))
    installer = EngineInstaller(requirements_file(tmp_path, "fake-peft>=0.12", "fake-nrrd>=1.0", "numpy>=1.0"))
    assert installer.ensure() is True
    dialog, = calls["dialogs"]
    assert "fake-peft>=0.12" in dialog and "fake-nrrd>=1.0" in dialog and "numpy" not in dialog and "MB" in dialog
    call, = calls["pip_ensure"]
    assert call["requirements"] == ["fake-peft>=0.12", "fake-nrrd>=1.0"]
    assert call["prompt_install"] is False and call["requester"] == "MedSapiens"  # our one dialog was the question
    assert {"torch", "numpy", "SimpleITK"} <= set(call["skip_packages"])  # Slicer's own and SlicerPyTorch's kept
    assert calls["pip_install"] == [] and installer.missing() == []
    assert installer.ensure() is True and len(calls["dialogs"]) == 1  # nothing left to ask about


def test_falls_back_to_pip_install_without_slicer_packaging(tmp_path, site, slicer_app):
    calls, _ = slicer_app
    import slicer

    assert not hasattr(slicer, "packaging")  # slicer-core, like Slicer 5.10, has none
    installer = EngineInstaller(requirements_file(tmp_path, "fake-peft>=0.12", "fake-tqdm>=4.60"))
    assert installer.ensure() is True
    assert calls["pip_install"] == [["fake-peft>=0.12", "fake-tqdm>=4.60"]]  # one argument per requirement


def test_torch_through_pytorchutils_with_the_engine_minimum(tmp_path, site, slicer_app, monkeypatch):
    calls, _ = slicer_app
    use_packaging(monkeypatch, packaging_512(site, calls))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils(site, calls, version="99.0"))
    installer = EngineInstaller(requirements_file(tmp_path, "torch>=99", "fake-peft>=0.12"))
    assert "CUDA" in deps.describe(installer.missing())
    assert installer.ensure() is True
    assert calls["installTorch"] == [{"askConfirmation": False, "torchVersionRequirement": ">=99"}]
    assert [c["requirements"] for c in calls["pip_ensure"]] == [["fake-peft>=0.12"]]  # torch is not pip's
    assert len(calls["dialogs"]) == 1


def test_torch_below_the_minimum_after_pytorchutils_is_one_line(tmp_path, site, slicer_app, monkeypatch):
    calls, _ = slicer_app
    use_packaging(monkeypatch, packaging_512(site, calls))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils(site, calls, version="98.1"))
    installer = EngineInstaller(requirements_file(tmp_path, "torch>=99", "fake-peft>=0.12"))
    with pytest.raises(InstallError) as e:
        installer.ensure()
    assert str(e.value) == ("torch 98.1 is installed but MedSapiens needs torch>=99; update it in the PyTorch Utils "
                            "module, then restart Slicer")
    assert calls["pip_ensure"] == [] and installer.busy is False


def test_torch_through_pip_without_pytorchutils(tmp_path, site, slicer_app, monkeypatch):
    calls, _ = slicer_app
    use_packaging(monkeypatch, packaging_512(site, calls))
    installer = EngineInstaller(requirements_file(tmp_path, "torch>=99", "fake-peft>=0.12"))
    assert installer.ensure() is True
    torch_call, rest = calls["pip_ensure"]
    assert torch_call["requirements"] == ["torch>=99"] and torch_call["skip_packages"] is None
    assert rest["requirements"] == ["fake-peft>=0.12"] and "torch" in rest["skip_packages"]


def test_one_install_at_a_time(tmp_path, site, slicer_app, monkeypatch):
    """Slicer's install dialog runs the event loop: a second click arrives while pip_ensure is still working."""
    calls, _ = slicer_app
    installer = EngineInstaller(requirements_file(tmp_path, "fake-peft>=0.12"))
    nested = []

    def second_click_during_install():
        nested.append(installer.ensure())
        site.install("fake-peft", "0.13")

    use_packaging(monkeypatch, packaging_512(site, calls, behaviour=second_click_during_install))
    assert installer.ensure() is True
    assert nested == [False] and len(calls["pip_ensure"]) == 1 and len(calls["dialogs"]) == 1
    assert installer.busy is False


def test_failed_install_is_one_line_and_frees_the_installer(tmp_path, site, slicer_app, monkeypatch):
    calls, _ = slicer_app

    def pip_fails():
        raise CalledProcessError(1, "pip install")

    use_packaging(monkeypatch, packaging_512(site, calls, behaviour=pip_fails))
    installer = EngineInstaller(requirements_file(tmp_path, "fake-peft>=0.12"))
    with pytest.raises(InstallError) as e:
        installer.ensure()
    assert str(e.value) == ("pip failed (exit status 1) installing fake-peft>=0.12; pip's log is in the Python "
                            "console")
    assert installer.busy is False

    use_packaging(monkeypatch, packaging_512(site, calls, behaviour=lambda: None))  # pip "succeeds", installs nothing
    with pytest.raises(InstallError, match=r"^still missing after the install: fake-peft>=0.12$"):
        installer.ensure()


def test_slicer_version_check():
    assert slicer_version_problem(5, 10) is None and slicer_version_problem(5, 12) is None
    assert slicer_version_problem(6, 0) is None
    message = slicer_version_problem(5, 8)
    assert message == ("MedSapiens needs 3D Slicer 5.10 or later (this is 5.8); install a current release from "
                       "download.slicer.org.")


def _calls_in(node) -> set:
    return {(c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", ""))
            for c in ast.walk(node) if isinstance(c, ast.Call)}


def test_nothing_installs_from_add_case_or_the_self_test():
    tree = ast.parse((MODULE / "MedSapiensSlicer.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    widget = {f.name: f for f in classes["MedSapiensSlicerWidget"].body if isinstance(f, ast.FunctionDef)}
    installing = {"ensure", "_engineReady", "pip_install", "pip_ensure", "installTorch"}
    assert not _calls_in(widget["onAddCase"]) & installing
    assert not _calls_in(classes["MedSapiensSlicerTest"]) & installing
    selftest = {f.name: f for f in classes["MedSapiensSlicerTest"].body if isinstance(f, ast.FunctionDef)}
    assert "_needEngine" in _calls_in(selftest["test_atlas_detection_writes_new_node"])  # skipped without torch
    assert "_needEngine" not in _calls_in(selftest["test_oblique_slice_geometry"])  # needs no torch: always runs
    assert "_engineReady" in _calls_in(widget["_run"])  # Detect and Fine-tune set the engine up first
    assert "_run" in _calls_in(widget["onDetect"]) and "_run" in _calls_in(widget["onFinetune"])
    assert "slicer_version_problem" in _calls_in(widget["setup"])
