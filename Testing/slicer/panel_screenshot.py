"""Load the module panel (Resources/UI/MedSapiensSlicer.ui) offscreen with PySide6, for the tests of the .ui.

Slicer's own widgets (node selectors, collapsible sections, path fields) are plain Qt stand-ins of the same kind
(Slicer's Qt libraries are not on PyPI); the layout, labels and controls are the real .ui. (The Extensions Index
picture is drawn by Slicer's own slice view instead: Screenshots/make_screenshot.py.)
"""
from __future__ import annotations

import os
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
