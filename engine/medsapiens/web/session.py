"""One browser session, without any web code: the Slicer panel's logic (MedSapiensSlicerLib's PanelLogic and
MedSapiensLogic, as they run in Slicer) on this session's own MRML scene, cases, folder and engine worker process.

The page (app.py) only wires its controls to these methods and shows what they return. The panel's state is
the module's own PanelState; the decisions are PanelLogic's. What is web-only is here: files arrive by upload
(uploads.py) or from the server folder named at start, results are offered for download, and the slice view
shows the chosen image with the points that belong to it (those uploaded with it and those detected on it).

Issue 21's template / review list and issue 22's report each become one method here calling PanelLogic or api,
and one control in app.py (see the places named there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medsapiens import InputError, api

from . import use_slicer_lib
from .uploads import IMAGE, UploadFolder, content_type, display_name

use_slicer_lib()

from MedSapiensSlicerLib.analysis import analysisRows, writeAnalysisCSV  # noqa: E402
from MedSapiensSlicerLib.panel import VIEWS, PanelLogic, PanelState, modelChoices  # noqa: E402

LABELS = {"detect": "Detecting", "finetune": "Fine-tuning"}


@dataclass(frozen=True)
class PointRow:
    """A result point as the page lists it: label, world RAS (mm), description (confidence)."""

    label: str
    ras: tuple[float, float, float]
    description: str


class WebSession:
    def __init__(self, slicer_app, folder: Path, data_dir: Path | None = None, settings=api.WEB_DEFAULTS):
        """slicer_app: trame-slicer's SlicerApp (this session's scene, readers and views); folder: this session's
        own temporary folder; data_dir: a server folder whose images the page may open by name."""
        self.app, self.scene = slicer_app, slicer_app.scene
        # its engine worker process starts with the first request; the markups logic places and jumps (PanelLogic's
        # annotate, jumpToPoint), for the template and the review list of issue 21 when the page gets them
        self.logic = PanelLogic(self.scene, markupsLogic=slicer_app.markups_logic)
        self.p = PanelState()
        self.uploads = UploadFolder(Path(folder) / "uploads", settings.upload_mb)
        self.data_dir = Path(data_dir) if data_dir else None
        self.job = None
        self.status = "Upload an image and its points (.mrk.json), or open an image of the server's folder."
        self.shown: dict[str, list[str]] = {}  # volume ID -> IDs of the markups that belong with it
        self.pointsVisible = True

    # ------------------------------------------------------------------------------------------------ files
    def upload(self, files) -> str:
        """Check, store and open uploaded files ((client name, bytes) pairs); the status line. A refused file is
        one line naming it; the others are opened. An image and a points file uploaded together belong together:
        they become the input volume and the annotated points."""
        opened, refused, images, markups = [], [], [], []
        for client_name, content in files:
            try:
                stored = self.uploads.store(client_name, content)
                node = self._open(stored.path, stored.name, stored.kind)
            except InputError as e:
                refused.append(str(e))
                continue
            (images if stored.kind == IMAGE else markups).append(node)
            opened.append(stored.name)
        self._select(images, markups)
        self.status = "; ".join(refused) if refused else f"Opened {', '.join(opened)}." if opened else self.status
        return self.status

    def serverFiles(self) -> list[str]:
        """The names of the images in the server's folder (given at start); the page chooses among these only."""
        if self.data_dir is None or not self.data_dir.is_dir():
            return []
        return sorted(f.name for f in self.data_dir.iterdir() if f.is_file() and f.stat().st_size
                      and _kind(f) == IMAGE)

    def openServerFile(self, name: str) -> str:
        if name not in self.serverFiles():  # a name from the list the server made, never a path from the client
            self.status = f"{display_name(name)}: not an image of the server's folder"
            return self.status
        try:
            self._select([self._open(self.data_dir / name, name, IMAGE)], [])
            self.status = f"Opened {name}."
        except InputError as e:
            self.status = str(e)
        return self.status

    def _open(self, path: Path, name: str, kind: str):
        stem = name[:-len(".mrk.json")] if name.endswith(".mrk.json") else Path(name).stem.removesuffix(".nii")
        if kind == IMAGE:
            nodes = self.app.io_manager.load_volumes(str(path))
            if not nodes:
                raise InputError(f"{name}: Slicer could not read this image")
            nodes[0].SetName(self.scene.GenerateUniqueName(stem))
            return nodes[0]
        nodeID = self.app.markups_logic.LoadMarkups(str(path), self.scene.GenerateUniqueName(stem))
        node = self.scene.GetNodeByID(nodeID) if nodeID else None
        if node is None:
            raise InputError(f"{name}: Slicer could not read these markups")
        return node

    def _select(self, images, markups) -> None:
        if images:
            self.p.inputVolume = images[-1]
            self.shown.setdefault(images[-1].GetID(), [])
        if markups:
            self.p.trainingMarkups = markups[-1]
        if len(images) == 1 and markups:
            self.shown[images[0].GetID()] += [m.GetID() for m in markups]
        self.show()

    def select(self, volumeID: str | None = None, markupsID: str | None = None, outputID: str | None = None):
        """The page's choice of input volume, annotated points or result node (node IDs of this scene)."""
        if volumeID:
            self.p.inputVolume = self.scene.GetNodeByID(volumeID)
        if markupsID:
            self.p.trainingMarkups = self.scene.GetNodeByID(markupsID)
        if outputID:
            self.p.outputMarkups = self.scene.GetNodeByID(outputID)
        self.show()

    def show(self) -> None:
        """The input volume in the slice view, fitted, with the points that belong to it (when shown)."""
        volume = self.p.inputVolume
        self.app.display_manager.show_volume_in_slice_background(volume)
        mine = set(self.shown.get(volume.GetID(), [])) if volume else set()
        for node in self.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(self.pointsVisible and node.GetID() in mine)
        self.app.display_manager.reset_views()

    def setPointsVisible(self, visible: bool) -> None:
        self.pointsVisible = bool(visible)
        self.show()

    # ------------------------------------------------------------------------------------------------ cases
    def addCase(self) -> str:
        try:
            row = self.logic.addCase(self.p.inputVolume, self.p.trainingMarkups, self.logic.viewFor(self.p.view))
            self.status = f"Case added: {row.case.name}, {len(self.logic.cases)} in the table."
        except InputError as e:
            self.status = str(e)
        return self.status

    def removeCase(self, index: int) -> None:
        self.logic.removeCases([index])

    # ---------------------------------------------------------------------------------------- engine jobs
    def start(self, kind: str) -> str:
        """Start Detect or Fine-tune with the panel's choices, in this session's engine worker."""
        if self.job is not None:
            return self.status
        try:
            question = self.logic.downloadQuestion(self.p)
            if question:  # a browser client does not make the server download: its operator does, once
                raise InputError(question.replace("\n", " ")[:-1] + ": download it on the server first "
                                 "(`medsapiens models`), then try again")
            start = self.logic.startDetectFor if kind == "detect" else self.logic.startFinetuneFor
            self.job, self.label = start(self.p), LABELS[kind]
            self.status = f"{self.label}..."
        except InputError as e:
            self.status = str(e)
        self.poll()  # a request the worker refused at once ends here
        return self.status

    def cancel(self) -> None:
        if self.job is not None:
            self.logic.cancel(self.job)
            self.status = "Cancelling..."

    @property
    def progress(self) -> float:
        return self.job.fraction if self.job is not None else 0.0

    def poll(self) -> bool:
        """Apply the worker's replies; True when the running job changed (the page redraws)."""
        job = self.job
        if not self.logic.poll() or job is None:
            return False
        self.status = self.logic.jobStatus(job, self.label)
        if not job.done:
            return True
        self.job = None
        try:
            self.status = self.logic.finishJob(job, self.p)
        except InputError as e:
            self.status = str(e)
        if job.kind == "detect" and self.p.outputMarkups is not None and not (job.error or job.cancelled):
            self.shown.setdefault(self.p.inputVolume.GetID(), []).append(self.p.outputMarkups.GetID())
            self.show()
        return True

    # ---------------------------------------------------------------------------------------- what it shows
    def modelChoices(self) -> list[str]:
        return modelChoices()

    @staticmethod
    def viewChoices() -> list[str]:
        return list(VIEWS)

    def nodes(self, mrmlClass: str) -> list[tuple[str, str]]:
        """(ID, name) of this scene's nodes of a class, for the page's choosers."""
        return [(n.GetID(), n.GetName()) for n in self.scene.GetNodesByClass(mrmlClass)
                if not n.IsA("vtkMRMLLabelMapVolumeNode")]

    def caseTable(self) -> list[tuple[str, str, str, str]]:
        return self.logic.caseTable(self.p)

    def points(self) -> list[PointRow]:
        node = self.p.outputMarkups
        rows = []
        for i in range(node.GetNumberOfControlPoints() if node else 0):
            ras = node.GetNthControlPointPositionWorld(i)
            rows.append(PointRow(node.GetNthControlPointLabel(i), tuple(round(v, 2) for v in ras),
                                 node.GetNthControlPointDescription(i)))
        return rows

    def setPointsEditable(self, editable: bool) -> None:
        """Unlock the result's points to drag them (Detect locks those it trusts), or lock them again."""
        if self.p.outputMarkups is not None:
            self.logic.setPointsLocked(self.p.outputMarkups, not editable)

    def analysis(self):
        """The analysis table's rows for the result (ISBI landmarks), or None."""
        return analysisRows(self.p.outputMarkups) if self.p.outputMarkups is not None else None

    def pointsFile(self) -> tuple[str, bytes]:
        """The result's points as they are now, as a Slicer markups file: (file name, content)."""
        node = self.p.outputMarkups
        if node is None:
            raise InputError("no result to download yet: Detect first")
        path = self.uploads.folder.parent / "download.mrk.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = self.scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
        try:
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise InputError(f"{node.GetName()}: could not be written")
        finally:
            self.scene.RemoveNode(storage)
        return f"{node.GetName()}.mrk.json", path.read_bytes()

    def analysisFile(self) -> tuple[str, bytes]:
        rows, node = self.analysis(), self.p.outputMarkups
        if not rows:
            raise InputError("no analysis: the result's landmarks are not the ISBI cephalometric ones")
        path = writeAnalysisCSV(rows, node.GetName(), self.uploads.folder.parent / "analysis.csv")
        return f"{node.GetName()} analysis.csv", Path(path).read_bytes()

    def shutdown(self) -> None:
        """End this session's engine worker and remove its files (the page's process is ending)."""
        self.logic.shutdown()


def _kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        suffix = content_type(f.read(1 << 16))
    return None if suffix is None else IMAGE if suffix != ".mrk.json" else "markups"
