"""One browser session, without any web code: the Slicer panel's logic (MedSapiensSlicerLib's PanelLogic and
MedSapiensLogic, as they run in Slicer) on this session's own MRML scene, cases, folder and engine worker process.

The page (app.py) only wires its controls to these methods and shows what they return. The panel's state is
the module's own PanelState; the decisions are PanelLogic's: the landmark set an annotation follows, the landmark
to place next, the name check of Add case, the review list and its jump, Add as case, the analysis table, and the
report, which the engine worker draws. What is web-only is here: files arrive by upload (uploads.py) or from the
server folder named at start, results are offered for download, and the slice view shows the chosen image with
the points that belong to it (those uploaded with it, annotated on it and detected on it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from medsapiens import InputError, api
from medsapiens.errors import short_list

from . import use_slicer_lib
from .uploads import IMAGE, UploadFolder, content_type, display_name

use_slicer_lib()

from MedSapiensSlicerLib.analysis import writeAnalysisCSV  # noqa: E402
from MedSapiensSlicerLib.annotation import nextToPlace  # noqa: E402
from MedSapiensSlicerLib.panel import (  # noqa: E402
    FROM_FILE,
    VIEWS,
    PanelLogic,
    PanelState,
    landmarkSetChoices,
    modelChoices,
)

LABELS = {"detect": "Detecting", "finetune": "Fine-tuning"}
VOLUME, POINTS = "vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode"  # what the page chooses among
REPORT_SUFFIXES = ("html", "pdf")  # the report's files


@dataclass(frozen=True)
class PointRow:
    """A result point as the page lists it: label, world RAS (mm; None for a landmark missing or not placed yet),
    description (confidence)."""

    label: str
    ras: tuple[float, float, float] | None
    description: str
    missing: bool = False  # marked missing (not found, or skipped), rather than not placed yet

    def cells(self) -> list[str]:
        """Landmark, R, A, S, description: the text of the points table's columns."""
        where = [f"{c:.1f}" for c in self.ras] if self.ras else ["missing" if self.missing else "not placed", "", ""]
        return [self.label, *where, self.description]


@dataclass(frozen=True)
class Report:
    """A report the worker drew: its HTML file (the PDF beside it), of which points, node and analysis."""

    html: Path
    nodeID: str
    points: list
    analysis: str


class WebSession:
    def __init__(self, slicer_app, folder: Path, data_dir: Path | None = None, settings=api.WEB_DEFAULTS):
        """slicer_app: trame-slicer's SlicerApp (this session's scene, readers and views); folder: this session's
        own temporary folder; data_dir: a server folder whose images the page may open by name."""
        self.app, self.scene = slicer_app, slicer_app.scene
        # its engine worker process starts with the first request; the markups logic places and jumps (PanelLogic's
        # annotate starts Slicer's place mode through the interaction node of this scene; jumpToPoint)
        self.logic = PanelLogic(self.scene, markupsLogic=slicer_app.markups_logic)
        self.p = PanelState()
        self.uploads = UploadFolder(Path(folder) / "uploads", settings.upload_mb)
        self.data_dir = Path(data_dir) if data_dir else None
        self.job = None
        self.status = "Upload an image and its points (.mrk.json), or open an image of the server's folder."
        self.shown: dict[str, list[str]] = {}  # volume ID -> IDs of the markups that belong with it
        self.pointsVisible = True
        self.report: Report | None = None        # the last report the worker drew
        self._reportAsked: Report | None = None  # the one it draws now

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
        """The page's choice of input volume, annotated points or result node: IDs of this scene's nodes as nodes()
        offers them; any other ID changes nothing."""
        for field, nodeID, mrmlClass in (("inputVolume", volumeID, VOLUME), ("trainingMarkups", markupsID, POINTS),
                                         ("outputMarkups", outputID, POINTS)):
            if nodeID in [i for i, _ in self.nodes(mrmlClass)]:
                setattr(self.p, field, self.scene.GetNodeByID(nodeID))
        self.logic.followPoints(self.p)  # the landmark to place next and the review follow the chosen nodes
        self.show()

    def show(self) -> None:
        """The input volume in the slice view, fitted, with the points that belong to it (when shown)."""
        self.app.display_manager.show_volume_in_slice_background(self.p.inputVolume)
        self._showPoints()
        self.app.display_manager.reset_views()

    def _showPoints(self) -> None:
        """The points that belong to the input volume, and the chosen analysis's tracing over the result's points
        (PanelLogic.showTracing) where they are on it; shown when the page says so."""
        volume, output = self.p.inputVolume, self.p.outputMarkups
        mine = set(self.shown.get(volume.GetID(), [])) if volume else set()
        for node in self.scene.GetNodesByClass(POINTS):
            if node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(self.pointsVisible and node.GetID() in mine)
        self.logic.showTracing(self.p)
        if self.logic.tracing is not None:
            self.logic.tracing.setVisible(self.p.showTracing and self.pointsVisible and output.GetID() in mine)

    def setPointsVisible(self, visible: bool) -> None:
        self.pointsVisible = bool(visible)
        self._showPoints()  # the view stays where it is

    def setTracingVisible(self, visible: bool) -> None:
        self.p.showTracing = bool(visible)
        self._showPoints()

    # -------------------------------------------------------------------------------------- annotate, cases
    @staticmethod
    def landmarkSetChoices() -> list[str]:
        return landmarkSetChoices()

    def chooseLandmarkSet(self, choice: str) -> None:
        """The landmark set that Annotate places and Add case checks: one of landmarkSetChoices() (the file's for
        FROM_FILE is uploaded with uploadLandmarkSet); any other text from the page changes nothing."""
        if choice in landmarkSetChoices():
            self.p.landmarkSet = choice

    def uploadLandmarkSet(self, client_name, content: bytes) -> str:
        """A landmark set file, checked like every upload, then read by the engine; it becomes the chosen set. A
        file that is not one is refused in one line naming it, nothing of it is kept, and the choice stays."""
        try:
            stored = self.uploads.store(client_name, content, landmark_set=True)
        except InputError as e:
            self.status = str(e)
            return self.status
        try:
            landmarkSet = api.landmark_set(stored.path)
        except InputError as e:
            self.uploads.remove(stored)
            self.status = str(e).replace(str(stored.path), stored.name)  # the server's path is none of its business
            return self.status
        self.p.landmarkSet, self.p.landmarkSetFile = FROM_FILE, str(stored.path)
        names = landmarkSet.names
        self.status = f"Landmark set {stored.name}: {len(names)} landmarks ({short_list(names)})."
        return self.status

    def annotate(self) -> str:
        """Annotate this image: a new node holding the chosen set's landmarks unplaced, shown on the image, and
        Slicer's place mode started on it (PanelLogic.annotate), so clicks in the view place them in order."""
        try:
            node = self.logic.annotate(self.p)
        except InputError as e:
            self.status = str(e)
            return self.status
        self.shown.setdefault(self.p.inputVolume.GetID(), []).append(node.GetID())
        self.show()
        self.status = f"Annotating '{node.GetName()}': click each landmark named below in the view."
        return self.status

    def placementLine(self) -> str:
        """The landmark to place next in the annotated points and its description, or what is placed."""
        return self.logic.placementLine(self.p)

    def placing(self) -> bool:
        """Whether the annotated points have a landmark left to place (or skip)."""
        node = self.p.trainingMarkups
        return node is not None and nextToPlace(node) >= 0

    def skipLandmark(self) -> str:
        return self.logic.skipLandmark(self.p)

    def addCase(self) -> str:
        """Add case: the annotated points on the input volume, their names checked against the chosen set."""
        return self._say(self.logic.addCaseFor, self.p)

    def removeCase(self, index: int) -> None:
        if isinstance(index, int) and 0 <= index < len(self.logic.cases):
            self.logic.removeCases([index])

    # ----------------------------------------------------------------------------------------------- review
    def reviewRows(self) -> list:
        """The result's points to check (and those corrected), the least probable first (review.ReviewRow)."""
        return self.logic.reviewRows(self.p)

    def reviewLine(self, rows) -> str:
        return self.logic.reviewLine(rows) if self.p.outputMarkups is not None else ""

    def jumpToPoint(self, index: int) -> None:
        """Centre the slice view on point `index` of the result and make it the active point (a row's click)."""
        node = self.p.outputMarkups
        if node is not None and isinstance(index, int) and 0 <= index < node.GetNumberOfControlPoints():
            self.logic.jumpToPoint(self.p, index)

    def addReviewedCase(self) -> str:
        """Add as case: the result as reviewed, on the image it was detected on."""
        return self._say(self.logic.addReviewedCase, self.p)

    def _say(self, action, *args) -> str:
        """The status line an action returns, or its one-line refusal."""
        try:
            self.status = action(*args)
        except InputError as e:
            self.status = str(e)
        return self.status

    # ---------------------------------------------------------------------------------------- engine jobs
    def start(self, kind: str) -> str:
        """Start Detect or Fine-tune (kind "detect" or "finetune"; anything else changes nothing) with the panel's
        choices, in this session's engine worker."""
        if kind not in list(LABELS):  # a list: what the page sends may be anything, unhashable too
            return self.status

        def request():
            question = self.logic.downloadQuestion(self.p)
            if question:  # a browser client does not make the server download: its operator does, once
                raise InputError(question.replace("\n", " ")[:-1] + ": download it on the server first "
                                 "(`medsapiens models`), then try again")
            return (self.logic.startDetectFor if kind == "detect" else self.logic.startFinetuneFor)(self.p)

        return self._start(LABELS[kind], request)

    def startReport(self) -> str:
        """Let the engine worker draw the report (HTML with the picture, and PDF) of the chosen analysis of the
        result's points as they are now, on the image they belong to; reportFile gives it once done."""

        def request():
            node, volume = self.p.outputMarkups, self.p.inputVolume
            if node is None:
                raise InputError("no result to report yet: Detect first")
            if volume is not None and node.GetID() not in self.shown.get(volume.GetID(), []):
                raise InputError(f"'{node.GetName()}' does not belong to {volume.GetName()}: choose the image its "
                                 "points are on as the input volume")
            job = self.logic.startReportFor(self.p, self.uploads.folder.parent / "report" / "report.html")
            self._reportAsked = Report(Path(), node.GetID(), self.points(), self.p.analysis)
            return job

        return self._start("Writing the report", request)

    def _start(self, label: str, request) -> str:
        """Send a request (a function returning the engine worker's job) unless a job runs; the status line."""
        if self.job is not None:
            return self.status
        try:
            self.job, self.label = request(), label
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
        if job.error or job.cancelled:
            return True
        if job.kind == "detect" and self.p.outputMarkups is not None:
            self.shown.setdefault(self.p.inputVolume.GetID(), []).append(self.p.outputMarkups.GetID())
            self.show()
        if job.kind == "report":  # where the files are on the server is no business of the page
            self.report = replace(self._reportAsked, html=Path(job.result["files"][0]))
            self.status = (f"The report of '{self.scene.GetNodeByID(self.report.nodeID).GetName()}' "
                           f"({api.analyses()[self.report.analysis]}) is ready to download.")
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
            status = node.GetNthControlPointPositionStatus(i)
            ras = node.GetNthControlPointPositionWorld(i) if status == node.PositionDefined else None
            rows.append(PointRow(node.GetNthControlPointLabel(i), ras and tuple(round(v, 2) for v in ras),
                                 node.GetNthControlPointDescription(i), status == node.PositionMissing))
        return rows

    def setPointsEditable(self, editable: bool) -> None:
        """Unlock the result's points to drag them (Detect locks those it trusts), or lock them again."""
        if self.p.outputMarkups is not None:
            self.logic.setPointsLocked(self.p.outputMarkups, not editable)

    @staticmethod
    def analysisChoices() -> dict[str, str]:
        """The analyses to choose from: name -> title."""
        return api.analyses()

    def chooseAnalysis(self, name: str) -> None:
        """The analysis of the table and the report: a name of analysisChoices(); other text changes nothing."""
        if name in list(api.analyses()):
            self.p.analysis = name
            self._showPoints()  # its tracing

    def analysis(self):
        """The chosen analysis's rows for the result's points as they are now (ISBI landmarks), or None."""
        return self.logic.analysisTable(self.p)

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

    def reportReady(self) -> bool:
        """Whether the last report drawn is of the result's points as they are now, in the chosen analysis."""
        node, report = self.p.outputMarkups, self.report
        return (report is not None and node is not None and report.nodeID == node.GetID()
                and report.analysis == self.p.analysis and report.points == self.points())

    def reportFile(self, suffix: str) -> tuple[str, bytes]:
        """The report as drawn (suffix "html" or "pdf"): (file name, content)."""
        if suffix not in REPORT_SUFFIXES or not self.reportReady():
            raise InputError("no report of the result's points as they are now: make the report first")
        name = self.scene.GetNodeByID(self.report.nodeID).GetName()
        return f"{name} report.{suffix}", self.report.html.with_suffix(f".{suffix}").read_bytes()

    def shutdown(self) -> None:
        """End this session's engine worker and remove its files (the page's process is ending)."""
        self.logic.shutdown()


def _kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        suffix = content_type(f.read(1 << 16))
    return None if suffix is None else IMAGE if suffix != ".mrk.json" else "markups"
