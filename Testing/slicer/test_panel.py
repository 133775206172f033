"""The Slicer module's files: the .ui loads in a real Qt (PySide6, offscreen) and holds every widget the module
names, parameter bindings match the parameter node, every file compiles and CMake ships every file."""
import ast
import py_compile
import re
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "MedSapiensSlicer"
ENGINE = MODULE.parent / "engine" / "medsapiens"
SOURCE = (MODULE / "MedSapiensSlicer.py").read_text()
UI_FILE = MODULE / "Resources" / "UI" / "MedSapiensSlicer.ui"


@pytest.fixture(scope="module")
def panel():
    pytest.importorskip("PySide6", reason="PySide6-Essentials is needed to load the .ui")
    from panel_screenshot import load_panel

    app, panel = load_panel()
    return panel


def widgets(panel) -> dict:
    from PySide6.QtWidgets import QWidget

    return {w.objectName(): w for w in panel.findChildren(QWidget) if w.objectName()}


def test_ui_holds_every_widget_the_module_uses(panel):
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert {"detectButton", "finetuneButton", "cancelButton", "progressBar", "casesTable"} <= used
    missing = used - set(widgets(panel))
    assert not missing, f"named in MedSapiensSlicer.py but not in the .ui: {sorted(missing)}"


def test_widget_kinds_fit_their_use(panel):
    from PySide6.QtWidgets import (
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QLabel,
        QLineEdit,
        QProgressBar,
        QPushButton,
        QTableWidget,
    )

    w = widgets(panel)
    kinds = {"detectButton": QPushButton, "finetuneButton": QPushButton, "cancelButton": QPushButton,
             "progressBar": QProgressBar, "casesTable": QTableWidget, "timeBudgetSpinBox": QDoubleSpinBox,
             "viewComboBox": QComboBox, "modelComboBox": QComboBox, "adapterNameLineEdit": QLineEdit,
             "inputVolumeSelector": QComboBox, "modelPathLineEdit": QLineEdit,
             "useAtlasAdapterCheckBox": QCheckBox, "adapterEstimateLabel": QLabel,
             "learnUnannotatedCheckBox": QCheckBox, "landmarkSetComboBox": QComboBox,
             "landmarkSetPathLineEdit": QLineEdit, "annotateButton": QPushButton, "skipLandmarkButton": QPushButton,
             "nextLandmarkLabel": QLabel, "reviewTable": QTableWidget, "addReviewedCaseButton": QPushButton}
    for name, kind in kinds.items():
        assert isinstance(w[name], kind), name
    assert views_of(panel) == ["Whole 2D image", "Whole volume (3D)", "Red", "Green", "Yellow"]
    assert not w["cancelButton"].isEnabled(), "Cancel is enabled only while work runs"
    assert not w["useAtlasAdapterCheckBox"].isEnabled(), "enabled once there is an adapter fine-tuned on the atlas"
    table = w["casesTable"]
    assert [table.horizontalHeaderItem(i).text() for i in range(table.columnCount())] == \
        ["Volume", "Points", "Plane", "Adapter"]  # Adapter: "seen" for the cases the atlas adapter was trained on
    review = w["reviewTable"]
    assert [review.horizontalHeaderItem(i).text() for i in range(review.columnCount())] == ["Landmark", "P", "State"]


def test_the_panel_defaults_are_the_engines_and_the_ui_holds_no_copy_of_them():
    """The time budget, its range, the unannotated images' limit: the parameter node (from the engine's settings)
    sets the widgets; the .ui holds none of these numbers."""
    from medsapiens import api
    from MedSapiensSlicerLib.panel import TIME_BUDGET_RANGE, PanelLogic, PanelState

    state = PanelState()
    assert state.timeBudget == api.REFINE_DEFAULTS.time_budget and state.learnUnannotated
    assert f"at most {api.REFINE_DEFAULTS.max_unannotated})" in PanelLogic.learnUnannotatedTip()
    ui = UI_FILE.read_text()
    for number in (api.REFINE_DEFAULTS.time_budget, *TIME_BUDGET_RANGE):
        assert f"<double>{number:.15f}</double>" not in ui
    assert f"at most {api.REFINE_DEFAULTS.max_unannotated}" not in ui


def test_every_panel_field_but_the_adapter_state_is_bound_to_one_widget(panel):
    from MedSapiensSlicerLib.panel import PANEL_FIELDS, VIEWS

    bound = [w.property("SlicerParameterName") for w in widgets(panel).values() if w.property("SlicerParameterName")]
    assert len(bound) == len(set(bound)), "one widget per parameter"
    assert set(bound) == set(PANEL_FIELDS) - {"atlasAdapter"}, "atlasAdapter is state Fine-tune sets, not a widget"
    assert tuple(views_of(panel)) == VIEWS, "the .ui's entries are the parameter's choices"


def views_of(panel) -> list:
    box = widgets(panel)["viewComboBox"]
    return [box.itemText(i) for i in range(box.count())]


def test_module_files_compile(tmp_path):
    for path in [*MODULE.rglob("*.py"), *ENGINE.glob("*.py")]:
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    tree = ast.parse(SOURCE)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"MedSapiensSlicer", "MedSapiensSlicerWidget", "MedSapiensSlicerLogic", "MedSapiensSlicerTest"} <= classes


def test_cmake_ships_every_script_and_resource():
    module_cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedSapiensSlicer")
    listed = set(re.findall(r"[\w/.]+\.(?:py|ui|png|txt|json)\b", module_cmake))
    shipped = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.is_file() and p.suffix in
               (".py", ".ui", ".png", ".txt") and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    engine = {str(p.relative_to(ENGINE.parent)) for p in ENGINE.rglob("*") if p.suffix in (".py", ".json")
              and "__pycache__" not in p.parts and "web" not in p.relative_to(ENGINE).parts}  # web: not Slicer's
    assert shipped | engine == listed
    top = (MODULE.parent / "CMakeLists.txt").read_text()
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{var} ", top), var
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(MedSapiensSlicer)" in top
