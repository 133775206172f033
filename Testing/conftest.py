"""Shared fixtures: the real data sets beside the repository, and small real models."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "ceph_hamedan" / "landmarks.csv").is_file():
        pytest.skip(f"the shared data sets are not at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def ceph(data_dir):
    from medsapiens.io.datasets import Dataset

    return Dataset(data_dir / "ceph_hamedan" / "landmarks.csv")


@pytest.fixture(scope="session")
def mouse(data_dir):
    from medsapiens.io.datasets import Dataset

    path = data_dir / "mouse_ct" / "landmarks.csv"
    if not path.is_file():
        pytest.skip("the mouse micro-CT set is not in ../shared/data")
    return Dataset(path)


def overfit(model, case, input_hw, steps=60, lr=3e-3, sigma=3.0):
    """Train `model` on one real case for a few steps (real warp, codec and loss) so its peaks mean something."""
    from medsapiens.detectors.heatmap import image_tensor, normalise
    from medsapiens.models.codec import UDPCodec
    from medsapiens.models.warp import (
        apply_affine,
        image_box,
        udp_warp_matrix,
        warp_image,
    )

    wh = input_hw[::-1]
    codec = UDPCodec(wh, (wh[0] // 4, wh[1] // 4), sigma=sigma)
    center, scale = image_box(*case.size)
    m = udp_warp_matrix(center, scale, 0.0, wh)
    x = normalise(warp_image(image_tensor(case, "cpu"), m, wh))
    target, weight = codec.encode(apply_affine(m, case.landmarks.points), case.landmarks.present)
    target, weight = torch.from_numpy(target)[None], torch.from_numpy(weight)[None, :, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = (((model(x) - target) ** 2) * weight).mean() * 1000
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def fitted_micro(ceph):
    """A micro model fitted to ceph case 001 at 256 x 192 (19 landmarks)."""
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    model = SapiensPose("micro", len(ceph.names), (16, 12))
    return overfit(model, ceph.case(0), (256, 192), steps=500, lr=2e-3)


@pytest.fixture(scope="session")
def fitted_file(tmp_path_factory, fitted_micro, ceph):
    """fitted_micro saved as this project's model file."""
    from medsapiens.models.weight_files import save_trained

    path = tmp_path_factory.mktemp("model") / "ceph_micro.safetensors"
    return save_trained(path, fitted_micro, ceph.names, (256, 192), 3.0)


@pytest.fixture(scope="session")
def micro_file(tmp_path_factory, ceph):
    """An untrained micro model for the ceph landmarks (seeded), as a model file: for tests of plumbing and
    timing, where what the weights say does not matter and training one would only cost time."""
    from medsapiens.models.weight_files import save_trained
    from medsapiens.models.sapiens import SapiensPose

    torch.manual_seed(0)
    model = SapiensPose("micro", len(ceph.names), (16, 12))
    return save_trained(tmp_path_factory.mktemp("model") / "ceph_micro_untrained.safetensors", model, ceph.names,
                        (256, 192), 3.0)


def new_scene():
    """A real MRML scene from slicer-core (Slicer's libraries, no application), with the logics Slicer sets up."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML on PyPI) is needed")
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
    return scene


@pytest.fixture
def scene():
    """new_scene(), cleared after the test."""
    scene = new_scene()
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="module")
def module_scene():
    """new_scene() shared by one test module (for a fixture that is costly to make once per test)."""
    scene = new_scene()
    yield scene
    scene.Clear(True)
