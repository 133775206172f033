"""MedSapiens: annotate cases from a landmark set, detect named anatomical landmarks on the current slice, a 2D
radiograph or a whole 3D volume, review the points flagged for checking, and fine-tune adapters.

The widget only wires the panel (Resources/UI/MedSapiensSlicer.ui) to MedSapiensSlicerLogic: the panel's state is
MedSapiensSlicerLib.panel.PanelState as a parameter node (every field bound to its widget), its decisions are
PanelLogic's and the MRML work MedSapiensLogic's (both tested on slicer-core). Engine work runs in a separate
process of Slicer's Python (MedSapiensSlicerLib.worker_client.EngineWorker), kept warm between clicks; a QTimer
applies its replies on the main thread (progress, result, Cancel).
"""
import dataclasses
import logging
import tempfile
import unittest
from pathlib import Path
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper, unannotatedType)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedSapiensSlicerLib.dependencies import (EngineInstaller, InstallError, add_engine_to_path, missing,
                                               slicer_version_problem)

add_engine_to_path()  # a source checkout: the engine beside the module (the extension ships it on sys.path)

from MedSapiensSlicerLib.analysis import writeAnalysisCSV  # noqa: E402
from MedSapiensSlicerLib.panel import FROM_FILE, PanelLogic, PanelState  # noqa: E402

POLL_MS = 100


class MedSapiensSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSapiens"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSapiens for 3D Slicer developers"]
        self.parent.helpText = (
            "Annotate a few cases from a landmark set (each click places the landmark the panel names), detect "
            "named anatomical landmarks on a radiograph, on the current slice of any view (including oblique "
            "reformats) or in a whole 3D volume (the atlas of a few annotated volumes), and fine-tune an adapter "
            "from a few annotated 2D cases: on the atlas of those cases (with its error measured on held-out "
            "cases), or a LoRA adapter on a model. Results go to a new markups node; the points flagged for checking "
            "are listed, least probable first, and a reviewed result can be added as a case. \"Detect on many "
            "images\" runs on every open image (a node each) or on a folder (a .mrk.json each and landmarks.csv).")
        self.parent.acknowledgementText = (
            "Method: MedSapiens (Sapiens ViT + LoRA + heatmap head). Sapiens models by Meta.")


@parameterNodeGuiConnector
class ctkPathLineEditToStrConnector(GuiConnector):
    """A path field bound to a str parameter (Slicer's own connector takes pathlib.Path, whose empty value is ".")."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        return ctkPathLineEditToStrConnector(widget) if ctkPathLineEditToStrConnector.canRepresent(widget, datatype) \
            else None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        self._widget.currentPath = value


def _annotation(f: dataclasses.Field):
    """A PanelState field's type as the parameter node wrapper takes it: an MRML node class, a str with its
    choices, a float within its range, or the plain type."""
    if "node" in f.metadata:
        return getattr(slicer, f.metadata["node"])
    if "choices" in f.metadata:
        choices = f.metadata["choices"]
        return Annotated[str, Choice(list(choices() if callable(choices) else choices))]
    if "range" in f.metadata:
        return Annotated[float, WithinRange(*f.metadata["range"])]
    return {"bool": bool, "str": str, "float": float, "int": int}[f.type]


def _parameterNodeClass():
    """The parameter node wrapper of PanelState, its one definition (MedSapiensSlicerLib/panel.py)."""
    fields = dataclasses.fields(PanelState)
    namespace = {f.name: f.default for f in fields if f.default is not None}
    namespace["__annotations__"] = {f.name: _annotation(f) for f in fields}
    return parameterNodeWrapper(type("MedSapiensSlicerParameterNode", (), namespace))


MedSapiensSlicerParameterNode = _parameterNodeClass()


class MedSapiensSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._parameterObserver = None
        self.job = None  # the engine request running now (MedSapiensSlicerLib.worker_client.Job)
        self._label = ""
        self.analysisRows = None  # the analysis table's rows (MedSapiensSlicerLib.analysis.AnalysisRow)
        self.reviewRows = []  # the review list's rows (MedSapiensSlicerLib.review.ReviewRow)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSapiensSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSapiensSlicerLogic()
        self.logic.onCasesChanged = self._showCases
        self.logic.onPointsChanged = self._showPoints  # a landmark placed, a result point moved
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.installer = EngineInstaller()
        self.ui.learnUnannotatedCheckBox.toolTip = self.logic.learnUnannotatedTip()
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.detectAllButton.connect("clicked(bool)", self.onDetectAll)
        self.ui.detectFolderButton.connect("clicked(bool)", self.onDetectFolder)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.annotateButton.connect("clicked(bool)", self.onAnnotate)
        self.ui.skipLandmarkButton.connect("clicked(bool)", self.onSkipLandmark)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.reviewTable.connect("cellClicked(int,int)", self.onReviewPointClicked)
        self.ui.reviewTable.horizontalHeader().setStretchLastSection(True)
        self.ui.addReviewedCaseButton.connect("clicked(bool)", self.onAddReviewedCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.casesTable.horizontalHeader().setStretchLastSection(True)
        self.logic.onAnalysisChanged = self.showAnalysis  # a traced point moved
        self.ui.exportAnalysisButton.connect("clicked(bool)", self.onExportAnalysis)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.analysisTable.horizontalHeader().setStretchLastSection(True)
        self.ui.analysisWidget.visible = False
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.cleanup)
        self.initializeParameterNode()
        versionProblem = slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
        if versionProblem:
            logging.warning(versionProblem)
            self.ui.statusLabel.text = versionProblem

    def cleanup(self) -> None:
        """Module closed or reloaded, or Slicer quitting: stop polling, end the engine worker, stop observing."""
        self.timer.stop()
        self.job = None
        self.setParameterNode(None)
        self.logic.onCasesChanged = self.logic.onAnalysisChanged = self.logic.onPointsChanged = None  # going away
        self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, node: Optional[MedSapiensSlicerParameterNode]) -> None:
        """Bind the panel to `node` (every field through connectGui) and redraw what depends on it."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNode.RemoveObserver(self._parameterObserver)
        self._parameterNode, self._parameterNodeGuiTag, self._parameterObserver = node, None, None
        if node:
            self._parameterNodeGuiTag = node.connectGui(self.ui)
            self._parameterObserver = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._showState)
            self._showState()

    def _showState(self, caller=None, event=None) -> None:
        """The options that apply to the chosen model and view, the atlas adapter's estimate, the case table."""
        p = self._parameterNode
        options = self.logic.atlasOptions(p)
        self.ui.atlasDeformableCheckBox.enabled = options.deformable
        self.ui.learnUnannotatedCheckBox.enabled = options.learnUnannotated
        self.ui.useAtlasAdapterCheckBox.enabled = options.useAdapter
        self.ui.useAtlasAdapterCheckBox.toolTip = options.useAdapterTip
        info = self.logic.adapterInfo(p.atlasAdapter)
        self.ui.adapterEstimateLabel.text = self.logic.adapterSummary(info)
        self.ui.adapterEstimateLabel.toolTip = self.logic.adapterLandmarks(info)  # per landmark
        self.ui.landmarkSetPathLineEdit.enabled = p.landmarkSet == FROM_FILE
        self.ui.landmarkNamesLabel.text = self.logic.modelLandmarksLine(p)
        self._showCases()
        self.logic.followPoints(p)
        self._showPoints()
        with slicer.util.tryWithErrorDisplay("Cephalometric tracing failed."):
            self.logic.showTracing(p)
        self.showAnalysis()

    def _showCases(self) -> None:
        rows = self.logic.caseTable(self._parameterNode) if self._parameterNode else []
        self.ui.casesTable.setRowCount(len(rows))
        for r, cells in enumerate(rows):
            for c, text in enumerate(cells):
                self.ui.casesTable.setItem(r, c, qt.QTableWidgetItem(text))

    def _showPoints(self) -> None:
        """The landmark to place next (and the set's picture), and the result's points to check."""
        p = self._parameterNode
        if not p:
            return
        self.ui.nextLandmarkLabel.text = self.logic.placementLine(p)
        picture = self.logic.templatePicture(p)
        self.ui.landmarkPictureLabel.visible = bool(picture)
        if picture:
            self.ui.landmarkPictureLabel.setPixmap(qt.QPixmap(picture).scaledToWidth(240, qt.Qt.SmoothTransformation))
        self.reviewRows = self.logic.reviewRows(p)
        self.ui.reviewWidget.visible = p.outputMarkups is not None
        self.ui.reviewLabel.text = self.logic.reviewLine(self.reviewRows)
        self.ui.reviewTable.setRowCount(len(self.reviewRows))
        for r, row in enumerate(self.reviewRows):
            for c, text in enumerate(row.cells()):
                self.ui.reviewTable.setItem(r, c, qt.QTableWidgetItem(text))

    def _engineReady(self) -> bool:
        """True when the engine's packages are installed; otherwise asks once and installs them (one at a time)."""
        if self.installer.busy:
            self.ui.statusLabel.text = "Python packages are being installed; try again when that is done."
            return False
        if not self.installer.missing():
            return True
        self.ui.statusLabel.text = "Setting up the engine's Python packages..."
        try:
            ready = self.installer.ensure()
        except InstallError as e:
            self.ui.statusLabel.text = f"Install failed: {e}"
            slicer.util.errorDisplay(f"MedSapiens set-up failed: {e}", windowTitle="MedSapiens set-up")
            return False
        self.ui.statusLabel.text = "Python packages installed." if ready else "Nothing was installed."
        return ready

    # ------------------------------------------------------------------------------------------------ actions
    def onDetect(self) -> None:
        self._run("Detecting", self.logic.startDetectFor)

    def onDetectAll(self) -> None:
        self._run("Detecting on all open images", self.logic.startDetectAllFor)

    def onDetectFolder(self) -> None:
        self._run("Detecting on the folder", self.logic.startDetectFolderFor)

    def onFinetune(self) -> None:
        self._run("Fine-tuning", self.logic.startFinetuneFor)

    def _run(self, label: str, start) -> None:
        """Ask before a download, then start the job in the engine worker."""
        if self.job or not self._engineReady():
            return
        with slicer.util.tryWithErrorDisplay(f"{label} failed.", waitCursor=True):
            question = self.logic.downloadQuestion(self._parameterNode)
            if question and not slicer.util.confirmOkCancelDisplay(question, windowTitle="MedSapiens model download"):
                return
            self._start(start(self._parameterNode), label)

    def onAnnotate(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot annotate this image.", waitCursor=True):
            self.logic.annotate(p)
            slicer.util.setSliceViewerLayers(background=p.inputVolume, fit=True)
            self._showPoints()

    def onSkipLandmark(self) -> None:
        self.ui.nextLandmarkLabel.text = self.logic.skipLandmark(self._parameterNode)

    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot add this case.", waitCursor=True):
            self.ui.statusLabel.text = self.logic.addCaseFor(self._parameterNode)

    def onReviewPointClicked(self, row: int, column: int) -> None:
        if 0 <= row < len(self.reviewRows):
            self.logic.jumpToPoint(self._parameterNode, self.reviewRows[row].index)

    def onAddReviewedCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot add this result as a case.", waitCursor=True):
            self.ui.statusLabel.text = self.logic.addReviewedCase(self._parameterNode)

    def onRemoveCase(self) -> None:
        self.logic.removeCases({i.row() for i in self.ui.casesTable.selectedIndexes()})

    def onCancel(self) -> None:
        if self.job:
            self.logic.cancel(self.job)
            self.ui.statusLabel.text = "Cancelling..."

    # ------------------------------------------------------------------------------- cephalometric analysis
    def showAnalysis(self) -> None:
        """The chosen analysis's table of the result node, shown when its landmarks are the ISBI cephalometric ones.

        Needs only numpy and the engine's pure-Python analysis, so it runs before any engine install.
        """
        self.analysisRows = None
        if self._parameterNode:
            with slicer.util.tryWithErrorDisplay("Cephalometric analysis failed."):
                self.analysisRows = self.logic.analysisTable(self._parameterNode)
        rows = self.analysisRows or []
        self.ui.analysisWidget.visible = bool(rows)
        self.ui.analysisTable.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row.cells()):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(f"{row.description}; landmarks {row.landmarks}")
                self.ui.analysisTable.setItem(r, c, item)

    def onExportAnalysis(self) -> None:
        node = self._parameterNode.outputMarkups if self._parameterNode else None
        self.showAnalysis()  # the points as they are now
        if not self.analysisRows:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export cephalometric analysis",
                                              f"{node.GetName()} analysis.csv", "CSV files (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not write the analysis.", waitCursor=True):
                writeAnalysisCSV(self.analysisRows, node.GetName(), path)
                self.ui.statusLabel.text = f"Analysis saved to {path}."

    def onSaveReport(self) -> None:
        """Ask where, then let the engine worker draw the report (HTML and PDF) of the points as they are now."""
        node = self._parameterNode.outputMarkups if self._parameterNode else None
        if node is None or self.job or not self._engineReady():
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save cephalometric report",
                                              f"{node.GetName()} report.html", "HTML files (*.html)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not make the report.", waitCursor=True):
                self._start(self.logic.startReportFor(self._parameterNode, path), "Writing the report")

    # ---------------------------------------------------------------------------------- engine worker requests
    def _start(self, job, label) -> None:
        self.job, self._label = job, label
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.enabled = True
        self._enableActions(False)
        self.ui.statusLabel.text = f"{label}..."
        self.timer.start()
        self.onPoll()  # a request the worker refused at once (it could not start) ends here

    def _enableActions(self, enabled: bool) -> None:
        """The buttons that start engine work: one job at a time."""
        for button in (self.ui.detectButton, self.ui.detectAllButton, self.ui.detectFolderButton,
                       self.ui.finetuneButton):
            button.enabled = enabled

    def onPoll(self) -> None:
        self.logic.poll()
        job = self.job
        if job is None:
            return
        self.ui.progressBar.setValue(int(100 * job.fraction))
        self.ui.statusLabel.text = self.logic.jobStatus(job, self._label)
        if not job.done:
            return
        self.timer.stop()
        self.job = None
        self.ui.cancelButton.enabled = False
        self._enableActions(True)
        if job.error:
            logging.error(f"MedSapiens: {job.error}")
        if job.error or job.cancelled:
            self.ui.progressBar.setValue(0)
        with slicer.util.tryWithErrorDisplay("Could not store the result.", waitCursor=True):
            status = self.logic.finishJob(job, self._parameterNode)
            self.ui.statusLabel.text = status if job.error or job.cancelled else f"{status} ({job.elapsed:.1f} s)"


class MedSapiensSlicerLogic(ScriptedLoadableModuleLogic, PanelLogic):
    """The module's logic: PanelLogic on slicer.mrmlScene, with the module's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        PanelLogic.__init__(self, slicer.mrmlScene, markupsLogic=slicer.modules.markups.logic())

    def getParameterNode(self):
        return MedSapiensSlicerParameterNode(super().getParameterNode())


class MedSapiensSlicerTest(ScriptedLoadableModuleTest):
    """The logic scenarios inside Slicer: exact geometry on an oblique reformat, an atlas detection in the engine
    worker, and the clinician's session (MedSapiensSlicerLib/scenario.py, which pytest runs on slicer-core too).

    Installs nothing: a scenario that needs the engine's Python packages is skipped, with a message, where they
    are missing. Run by "Reload and Test" (runTest) or by slicer.testing.runUnitTest (each test_ method).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_oblique_slice_geometry, self.test_atlas_detection_writes_new_node,
                     self.test_clinicians_session):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as e:
                self.delayDisplay(f"Skipped {test.__name__}: {e}")

    def _needEngine(self):
        absent = missing()
        if absent:
            self.skipTest("the engine's Python packages are not installed (" + ", ".join(map(str, absent)) +
                          "); the module installs them on first use")

    def _blobVolume(self, points):
        import numpy as np

        ijk_to_ras = np.array([[-0.9, 0, 0, 20], [0, -0.9, 0, 25], [0, 0, 1.2, -30], [0, 0, 0, 1]])
        k, j, i = np.meshgrid(np.arange(40), np.arange(50), np.arange(60), indexing="ij")
        ras = np.stack([i, j, k, np.ones_like(i)], -1) @ ijk_to_ras.T
        values = sum(1000 * np.exp(-((ras[..., :3] - p) ** 2).sum(-1) / (2 * 1.6 ** 2)) for p in points)
        node = slicer.util.addVolumeFromArray(values.astype("float32"), ijk_to_ras)
        return node

    def test_oblique_slice_geometry(self):
        import numpy as np

        from medsapiens import Landmarks

        points = np.array([[-5.0, 3.0, -7.0], [6.0, -4.0, -5.0], [1.0, 8.0, -9.0]])
        normal = np.cross(points[1] - points[0], points[2] - points[0])
        volume = self._blobVolume(points)
        sliceNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode", "TestPlane")  # works without views
        sliceNode.SetFieldOfView(100, 100, 1)
        sliceNode.SetSliceToRASByNTP(*normal, *(points[1] - points[0]), *points.mean(axis=0), 0)
        sliceNode.UpdateMatrices()
        logic = MedSapiensSlicerLogic()
        case, geometry = logic.caseFromSlice(sliceNode, volume)
        image = case.image.astype(float)
        found = []
        for _ in range(3):
            y, x = np.unravel_index(int(image.argmax()), image.shape)
            found.append([x, y])
            image[max(0, y - 6):y + 7, max(0, x - 6):x + 7] = -np.inf
        node = logic.writeLandmarks(Landmarks(["a", "b", "c"], np.array(found, float)), geometry)
        ras = np.array([node.GetNthControlPointPositionWorld(i) for i in range(3)])
        distance = np.linalg.norm(ras[:, None] - points[None], axis=-1).min(axis=0)
        self.assertLess(distance.max(), 1.0)  # whole-pixel peaks: within one voxel
        self.delayDisplay("Oblique slice geometry OK")

    def test_atlas_detection_writes_new_node(self):
        self._needEngine()
        import numpy as np

        from medsapiens import api

        def addPhantom(seed):
            case = api.phantom_case(seed)
            ijk_to_ras = np.diag([-case.spacing[0], -case.spacing[1], 1.0, 1.0])
            volume = slicer.util.addVolumeFromArray(np.asarray(case.image, dtype="float32")[None], ijk_to_ras)
            return case, volume, ijk_to_ras

        logic = MedSapiensSlicerLogic()
        for seed in range(2):  # two annotated atlas cases in the table
            case, volume, ijk_to_ras = addPhantom(seed)
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"atlas {seed}")
            for name, (x, y) in zip(case.landmarks.names, case.landmarks.points):
                points.AddControlPoint(vtk.vtkVector3d(*(ijk_to_ras @ [x, y, 0, 1])[:3]), name)
            logic.addCase(volume, points)
        target, volume, _ = addPhantom(100)
        user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mine")
        user.AddControlPoint(vtk.vtkVector3d(1, 2, 0), "x")
        try:
            job = logic.wait(logic.startDetect(volume, atlas=True), timeout=300)
            self.assertIsNone(job.error)
            node = logic.finishDetect(job)
        finally:
            logic.shutdown()
        self.assertNotEqual(node.GetID(), user.GetID())
        self.assertEqual(user.GetNumberOfControlPoints(), 1)
        ras = np.array([node.GetNthControlPointPositionWorld(i) for i in range(node.GetNumberOfControlPoints())])
        truth = target.landmarks.points * target.spacing
        self.assertLess(np.median(np.linalg.norm(-ras[:, :2] - truth, axis=1)), 5.0)
        self.delayDisplay("Atlas detection in the engine worker OK")

    def test_clinicians_session(self):
        """Template annotation of 3 phantoms, Fine-tune (a few seconds of training), Detect on a 4th, the worst
        flagged point reviewed (the slice views jump to it) and corrected, Add as case, Fine-tune again, warm; each
        long step cancelled midway first. The adapter it trains is removed at the end."""
        self._needEngine()
        from MedSapiensSlicerLib.scenario import SessionScenario

        logic = MedSapiensSlicerLogic()
        p = logic.getParameterNode()
        p.adapterName = "medsapiens-self-test"
        try:
            with tempfile.TemporaryDirectory() as folder:
                out = SessionScenario(logic, p, folder, log=self.delayDisplay).run()
        finally:
            adapter = p.atlasAdapter
            logic.shutdown()
            if adapter:
                Path(adapter).unlink(missing_ok=True)
        self.delayDisplay("The clinician's session OK: " + ", ".join(f"{k} {v:.1f} s" for k, v in out.seconds.items()))
