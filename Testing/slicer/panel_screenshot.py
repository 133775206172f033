"""Render the module panel (Resources/UI/MedSapiensSlicer.ui) offscreen with PySide6 and save it as a PNG.

    python Testing/slicer/panel_screenshot.py build/panel.png

Slicer's own widgets (node selectors, collapsible sections, path fields) are drawn by plain Qt stand-ins of the
same kind (Slicer's Qt libraries are not on PyPI); the layout, labels and controls are the real .ui.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

UI = Path(__file__).resolve().parents[2] / "MedSapiensSlicer" / "Resources" / "UI" / "MedSapiensSlicer.ui"


def load_panel(ui_path: Path = UI):
    """(QApplication, the loaded panel widget) in an offscreen Qt."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Property, QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QLineEdit, QWidget

    class qMRMLWidget(QWidget):
        pass

    class qMRMLNodeComboBox(QComboBox):
        def __init__(self, parent=None):
            super().__init__(parent)
            self.addItem("(none)")

    class ctkPathLineEdit(QLineEdit):
        def __init__(self, parent=None):
            super().__init__(parent)
            self.setPlaceholderText("Choose a file...")

    class ctkCollapsibleButton(QGroupBox):
        def _text(self):
            return self.title()

        def _set_text(self, value):
            self.setTitle(value)

        text = Property(str, _text, _set_text)

    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    for cls in (qMRMLWidget, qMRMLNodeComboBox, ctkPathLineEdit, ctkCollapsibleButton):
        loader.registerCustomWidget(cls)
    f = QFile(str(ui_path))
    if not f.open(QFile.ReadOnly):
        raise OSError(f"{ui_path}: cannot open")
    panel = loader.load(f)
    f.close()
    if panel is None:
        raise RuntimeError(f"{ui_path}: {loader.errorString()}")
    return app, panel


def model_choices() -> list[str]:
    """The model box's entries as the module's parameter node fills them: atlas, local file, catalogue."""
    from MedSapiensSlicerLib.panel import modelChoices

    return modelChoices()


def screenshot(out: Path, width: int = 420) -> Path:
    from PySide6.QtWidgets import QComboBox

    _, panel = load_panel()
    panel.findChild(QComboBox, "modelComboBox").addItems(model_choices())
    panel.resize(width, panel.sizeHint().height() + 40)
    panel.show()
    image = panel.grab().toImage()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(out)):
        raise OSError(f"{out}: could not write the PNG")
    return out


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "build/panel.png")))
