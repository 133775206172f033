"""MedSapiens: detect named anatomical landmarks on the current slice, a 2D radiograph or a whole 3D volume, and
fine-tune adapters.

The widget only wires the panel (Resources/UI/MedSapiensSlicer.ui) to MedSapiensSlicerLogic, whose behaviour
lives in MedSapiensSlicerLib.logic.MedSapiensLogic (MRML only; tested on slicer-core). Engine work runs in a
separate process of Slicer's Python (MedSapiensSlicerLib.worker_client.EngineWorker), kept warm between clicks;
a QTimer applies its replies on the main thread (progress, result, Cancel).
"""
import logging
import unittest
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedSapiensSlicerLib.analysis import analysisRows, writeAnalysisCSV
from MedSapiensSlicerLib.dependencies import (EngineInstaller, InstallError, add_engine_to_path, missing,
                                               slicer_version_problem)
from MedSapiensSlicerLib.logic import WHOLE_VOLUME as VOLUME_IN_3D
from MedSapiensSlicerLib.logic import MedSapiensLogic

WHOLE_IMAGE = "Whole 2D image"
WHOLE_VOLUME = "Whole volume (3D)"
ATLAS = "Atlas from my annotated cases"
LOCAL_FILE = "Local file"
POLL_MS = 100


class MedSapiensSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSapiens"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSapiens for 3D Slicer developers"]
        self.parent.helpText = (
            "Detect named anatomical landmarks on a radiograph, on the current slice of any view (including "
            "oblique reformats) or in a whole 3D volume (the atlas of a few annotated volumes), and fine-tune an "
            "adapter from a few annotated 2D cases: on the atlas of those cases (with its error measured on "
            "held-out cases), or a LoRA adapter on a model. Results go to a new markups node; low-confidence "
            "points are left unlocked for review.")
        self.parent.acknowledgementText = (
            "Method: MedSapiens (Sapiens ViT + LoRA + heatmap head). Sapiens models by Meta.")


@parameterNodeWrapper
class MedSapiensSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    view: Annotated[str, Choice([WHOLE_IMAGE, WHOLE_VOLUME, "Red", "Green", "Yellow"])] = WHOLE_IMAGE
    model: str = ATLAS      # a catalogue name, LOCAL_FILE or ATLAS (set from the model box by the widget)
    atlasDeformable: bool = False
    learnUnannotated: bool = True  # fine-tuning on the atlas also learns from the scene's other 2D images
    atlasAdapter: str = ""      # the adapter last fine-tuned on the atlas (set by Fine-tune)
    useAtlasAdapter: bool = True  # Detect with the atlas uses atlasAdapter (off: the plain atlas of the table)
    modelFile: str = ""
    adapter: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = "auto"
    outputMarkups: vtkMRMLMarkupsFiducialNode
    trainingMarkups: vtkMRMLMarkupsFiducialNode
    timeBudget: Annotated[float, WithinRange(30, 3600)] = 540  # s, the whole fine-tune
    adapterName: str = "my-task"


class MedSapiensSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None  # the engine request running now (MedSapiensSlicerLib.worker_client.Job)
        self.analysisRows = None  # the analysis table's rows (MedSapiensSlicerLib.analysis.AnalysisRow)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSapiensSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSapiensSlicerLogic()
        self.logic.onCasesChanged = self._showCases
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

        self.installer = EngineInstaller(on_installed=self.refreshModelChoices)
        self.refreshModelChoices()
        self.ui.modelComboBox.connect("currentTextChanged(QString)", self.onModelChanged)
        self.ui.viewComboBox.connect("currentTextChanged(QString)", lambda text: self._updateAtlasOptions())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._set("modelFile", path))
        self.ui.adapterPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._set("adapter", path))
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.casesTable.horizontalHeader().setStretchLastSection(True)
        self.ui.outputMarkupsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.showAnalysis)
        self.ui.exportAnalysisButton.connect("clicked(bool)", self.onExportAnalysis)
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
        """Module closed or reloaded, or Slicer quitting: stop polling and end the engine worker."""
        self.timer.stop()
        self.job = None
        self.logic.onCasesChanged = None  # this panel is going away
        self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, node: Optional[MedSapiensSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # the model box's entries come from the catalogue, so these three are kept by hand
            self.ui.modelComboBox.setCurrentText(node.model)
            self.ui.modelPathLineEdit.currentPath = node.modelFile
            self.ui.adapterPathLineEdit.currentPath = node.adapter
        self._showAdapter()

    def refreshModelChoices(self) -> None:
        """Fill the model box (catalogue names appear once the engine's packages are installed); keeps the choice."""
        box = self.ui.modelComboBox
        current = box.currentText
        wasBlocked = box.blockSignals(True)
        box.clear()
        box.addItems(self.logic.modelChoices())
        box.blockSignals(wasBlocked)
        if current:
            box.setCurrentText(current)

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

    def onModelChanged(self, text: str) -> None:
        self._set("model", text)
        self._updateAtlasOptions()

    def _updateAtlasOptions(self) -> None:
        """The B-spline stage, the fine-tuned adapter and learning from unannotated images are options of the 2D
        atlas only."""
        atlas2D = (self.ui.modelComboBox.currentText == ATLAS and self.ui.viewComboBox.currentText != WHOLE_VOLUME)
        self.ui.atlasDeformableCheckBox.enabled = atlas2D
        self.ui.learnUnannotatedCheckBox.enabled = atlas2D
        self._showAdapter()

    def _set(self, name: str, value: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, value)

    # ------------------------------------------------------------------------------------------------ actions
    def _view(self):
        """What to analyse, as the logic takes it: None (the whole 2D image), VOLUME_IN_3D or a slice node."""
        view = self._parameterNode.view
        if view == WHOLE_IMAGE:
            return None
        if view == WHOLE_VOLUME:
            return VOLUME_IN_3D
        return slicer.app.layoutManager().sliceWidget(view).mrmlSliceNode()

    def onDetect(self) -> None:
        if self.job or not self._engineReady():
            return
        with slicer.util.tryWithErrorDisplay("Detection failed.", waitCursor=True):
            p = self._parameterNode
            options = self.logic.detectOptions(p)
            if not self.logic.confirmDownload(options["model"]):
                return
            self._start(self.logic.startDetect(p.inputVolume, self._view(), **options), "Detecting")

    def onFinetune(self) -> None:
        if self.job or not self._engineReady():
            return
        with slicer.util.tryWithErrorDisplay("Fine-tuning failed.", waitCursor=True):
            p = self._parameterNode
            if p.model == ATLAS:  # a refiner on top of the atlas of the table's cases
                out = self.logic.adapterPath(p.adapterName, atlas=True)
                unannotated = self.logic.unannotatedImages() if p.learnUnannotated else []
                job = self.logic.startFinetune(None, out, time_budget=float(p.timeBudget),
                                               deformable=p.atlasDeformable, unannotated=unannotated)
            else:  # LoRA on the chosen model
                base = self.logic.detectOptions(p)["model"]
                if not self.logic.confirmDownload(base):
                    return
                out = self.logic.adapterPath(p.adapterName, atlas=False)
                job = self.logic.startFinetune(base, out, device=p.device, time_budget=float(p.timeBudget))
            self._start(job, "Fine-tuning")

    def onAddCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot add this case.", waitCursor=True):
            self.logic.addCase(p.inputVolume, p.trainingMarkups, self._view())  # refuses bad cases now

    def onRemoveCase(self) -> None:
        self.logic.removeCases({i.row() for i in self.ui.casesTable.selectedIndexes()})

    def _showCases(self) -> None:
        table = self.ui.casesTable
        table.setRowCount(len(self.logic.cases))
        seen = self.logic.casesSeen(self.logic.adapterInfo(self._atlasAdapter()))
        for r, row in enumerate(self.logic.cases):
            for c, text in enumerate((slicer.mrmlScene.GetNodeByID(row.volumeID).GetName(),
                                      slicer.mrmlScene.GetNodeByID(row.markupsID).GetName(), row.plane,
                                      "seen" if seen[r] else "")):
                table.setItem(r, c, qt.QTableWidgetItem(text))

    def _atlasAdapter(self) -> str:
        return self._parameterNode.atlasAdapter if self._parameterNode else ""

    def _showAdapter(self) -> None:
        """The atlas adapter's estimate, its check box (enabled when there is one) and the table's "seen" column."""
        info = self.logic.adapterInfo(self._atlasAdapter())
        self.ui.adapterEstimateLabel.text = self.logic.adapterSummary(info)
        self.ui.adapterEstimateLabel.toolTip = self.logic.adapterLandmarks(info)  # per landmark
        self.ui.useAtlasAdapterCheckBox.enabled = (info is not None and self.ui.modelComboBox.currentText == ATLAS
                                                   and self.ui.viewComboBox.currentText != WHOLE_VOLUME)
        self.ui.useAtlasAdapterCheckBox.toolTip = (
            f"Detect with the atlas uses {info['path']}: its own atlas cases, refined. Off: the plain atlas of the "
            "table's cases." if info else "Fine-tune with the atlas chosen to make an adapter.")
        self._showCases()

    # ------------------------------------------------------------------------------- cephalometric analysis
    def showAnalysis(self, node=None) -> None:
        """The analysis table of the result node, shown when its landmarks are the ISBI cephalometric ones.

        Needs only numpy and the engine's pure-Python analysis, so it runs before any engine install.
        """
        self.analysisRows = None
        if node is not None:
            with slicer.util.tryWithErrorDisplay("Cephalometric analysis failed."):
                self.analysisRows = analysisRows(node)
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
        self.showAnalysis(node)  # the points as they are now
        if not self.analysisRows:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export cephalometric analysis",
                                              f"{node.GetName()} analysis.csv", "CSV files (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not write the analysis.", waitCursor=True):
                writeAnalysisCSV(self.analysisRows, node.GetName(), path)
                self.ui.statusLabel.text = f"Analysis saved to {path}."

    # ---------------------------------------------------------------------------------- engine worker requests
    def _start(self, job, label) -> None:
        self.job, self._label = job, label
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.enabled = True
        self.ui.detectButton.enabled = self.ui.finetuneButton.enabled = False
        self.ui.statusLabel.text = f"{label}..."
        self.timer.start()
        self.onPoll()  # a request the worker refused at once (it could not start) ends here

    def onPoll(self) -> None:
        self.logic.poll()
        job = self.job
        if job is None:
            return
        self.ui.progressBar.setValue(int(100 * job.fraction))
        self.ui.statusLabel.text = f"{self._label}: {job.message or 'starting the engine'}, {job.elapsed:.0f} s"
        if not job.done:
            return
        self.timer.stop()
        self.job = None
        self.ui.cancelButton.enabled = False
        self.ui.detectButton.enabled = self.ui.finetuneButton.enabled = True
        if job.cancelled:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled; nothing was changed."
        elif job.error:
            logging.error(f"MedSapiens: {job.error}")
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = f"Error: {job.error}"
        else:
            with slicer.util.tryWithErrorDisplay("Could not store the result.", waitCursor=True):
                self.ui.statusLabel.text = f"{self._finish(job)} ({job.elapsed:.1f} s)"

    def _finish(self, job) -> str:
        if job.kind == "finetune" and "info" in job.result:  # on the atlas: Detect with the atlas uses it now
            self._parameterNode.atlasAdapter = job.result["adapter"]
            self._parameterNode.useAtlasAdapter = True
            self._showAdapter()
            return f"Adapter saved to {job.result['adapter']}; Detect with the atlas uses it."
        if job.kind == "finetune":
            self.ui.adapterPathLineEdit.currentPath = job.result["adapter"]
            return f"Adapter saved to {job.result['adapter']} and selected."
        node = self.logic.finishDetect(job)
        self._parameterNode.outputMarkups = node
        names = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
        self.ui.landmarkNamesLabel.text = ", ".join(names)
        missing = [n for i, n in enumerate(names) if node.GetNthControlPointPositionStatus(i) == node.PositionMissing]
        notFound = f" Not found: {', '.join(missing)}." if missing else ""
        return f"{len(names) - len(missing)} of {len(names)} landmarks placed in '{node.GetName()}'.{notFound}"

    def onCancel(self) -> None:
        if self.job:
            self.logic.cancel(self.job)
            self.ui.statusLabel.text = "Cancelling..."


class MedSapiensSlicerLogic(ScriptedLoadableModuleLogic, MedSapiensLogic):
    """The module's logic: MedSapiensLogic on slicer.mrmlScene, plus the panel's model choices."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        add_engine_to_path()
        MedSapiensLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return MedSapiensSlicerParameterNode(super().getParameterNode())

    def modelChoices(self) -> list:
        from medsapiens import api

        try:
            names = list(api.models())
        except ImportError:  # the engine's Python packages are not installed yet
            names = []
        return [ATLAS, LOCAL_FILE, *names]

    def detectOptions(self, p: MedSapiensSlicerParameterNode) -> dict:
        """startDetect's options for the chosen model: with the atlas, the adapter fine-tuned on it when there is
        one and it is in use, else the atlas of the table's cases; a local file or a catalogue model."""
        if p.model == ATLAS:
            if p.view != WHOLE_VOLUME and p.useAtlasAdapter and self.adapterInfo(p.atlasAdapter):
                return {"model": None, "adapter": p.atlasAdapter}  # the adapter carries its own atlas
            return {"model": None, "atlas": True, "deformable": p.atlasDeformable and p.view != WHOLE_VOLUME}
        if p.view == WHOLE_VOLUME:  # said here, before any download question (startDetect refuses it too)
            raise ValueError("a whole volume is detected by the atlas of your annotated volumes; choose the atlas")
        model = p.modelFile if p.model == LOCAL_FILE else p.model
        if not model:
            raise ValueError("choose the model file")
        return {"model": model, "adapter": p.adapter or None, "device": p.device, "precision": p.precision}

    def confirmDownload(self, model) -> bool:
        """Ask before the first download of a catalogue model (the worker downloads it, with progress)."""
        from medsapiens import api

        needed = api.needs_download(model) if model else None
        if not needed:
            return True
        what = "\n".join(f"{e.display}: {e.source.url}" for e in needed)
        return slicer.util.confirmOkCancelDisplay(f"Download\n{what}?", windowTitle="MedSapiens model download")


class MedSapiensSlicerTest(ScriptedLoadableModuleTest):
    """The logic scenarios inside Slicer: exact geometry on an oblique reformat, and an atlas detection in the
    engine worker.

    Installs nothing: a scenario that needs the engine's Python packages is skipped, with a message, where they
    are missing. Run by "Reload and Test" (runTest) or by slicer.testing.runUnitTest (each test_ method).
    """

    def setUp(self):
        add_engine_to_path()
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_oblique_slice_geometry, self.test_atlas_detection_writes_new_node):
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

        from medsapiens.phantom import phantom_case

        def addPhantom(seed):
            case = phantom_case(seed)
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
