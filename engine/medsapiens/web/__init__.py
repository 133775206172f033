"""`medsapiens web`: the Slicer panel's session in a web browser, on Kitware's trame-slicer (the optional `web`
extra: `pip install 'medsapiens[web]'`).

- `server`: the front door (`medsapiens web`); each browser that opens it gets a session process of its own.
- `app`: one session's page (trame-slicer: Slicer's MRML scene, slice view and markups interaction, streamed).
- `session`: what the page does, without any web code: the Slicer module's PanelLogic / MedSapiensLogic on the
  session's scene and its own engine worker process (MedSapiensSlicerLib, reused as it is, not copied).
- `uploads`: every uploaded file checked and stored under server-made names.

Nothing here is imported by the engine, its CLI (other than `medsapiens web` itself) or the Slicer extension.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from medsapiens import InputError

MODULE_ENV = "MEDSAPIENS_SLICER_MODULE"  # the Slicer module's folder (MedSapiensSlicer/) where it is elsewhere


def use_slicer_lib() -> Path:
    """Put the Slicer module's folder on sys.path, so that `MedSapiensSlicerLib` imports as it does in Slicer.

    The folder is MEDSAPIENS_SLICER_MODULE where set, else MedSapiensSlicer/ of the source tree this package runs
    from (an editable install or a checkout on PYTHONPATH).
    """
    folder = Path(os.environ.get(MODULE_ENV) or Path(__file__).resolve().parents[3] / "MedSapiensSlicer")
    if not (folder / "MedSapiensSlicerLib" / "panel.py").is_file():
        raise InputError(f"{folder}: the Slicer module (MedSapiensSlicerLib) is not there; set {MODULE_ENV} to "
                         "the MedSapiensSlicer folder of a MedSapiens checkout")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder
