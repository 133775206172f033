"""The panel as data and decisions: its state (`PanelState`, one definition that MedSapiensSlicer.py turns into
its parameter node, each field bound to the widget whose SlicerParameterName it is) and every choice the panel
makes (`PanelLogic`: which landmark set an annotation follows, which detector a click runs, what Fine-tune trains,
which points a review lists, which options apply, what the status line says), so that the widget only wires and
tests drive the same decisions on slicer-core.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from medsapiens import api

from .analysis import analysisRows, nodeLandmarks
from .annotation import PICTURE_ATTRIBUTE, labels, nextToPlace, placementLine, skipNext, templateNode
from .logic import SOURCE_ATTRIBUTE, WHOLE_IMAGE, WHOLE_VOLUME, MedSapiensLogic
from .observers import PointsObserver
from .review import Review, reviewRows
from .tracing import Tracing

ATLAS = "Atlas from my annotated cases"
LOCAL_FILE = "Local file"
FROM_MODEL = "Those of the model (the atlas: of my cases)"
FROM_FILE = "From a file (CSV or JSON)"
SLICE_VIEWS = ("Red", "Green", "Yellow")
VIEWS = (WHOLE_IMAGE, WHOLE_VOLUME, *SLICE_VIEWS)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TIME_BUDGET_RANGE = (30.0, 3600.0)  # s, what the panel lets a user ask for


def modelChoices() -> list[str]:
    """The model box's entries: the atlas, a local file, then the catalogue (read from its JSON, no torch)."""
    return [ATLAS, LOCAL_FILE, *api.models()]


def landmarkSetChoices() -> list[str]:
    """The landmark set box's entries: the chosen model's landmarks, the shipped sets (by title), a file."""
    return [FROM_MODEL, *api.landmark_sets().values(), FROM_FILE]


@dataclass
class PanelState:
    """What the parameter node holds. metadata: "node" (the MRML class), "choices" (a combo box's entries) or
    "range" (a spin box's bounds); a str without choices binds to a line edit or a path field."""

    inputVolume: object = field(default=None, metadata={"node": "vtkMRMLScalarVolumeNode"})
    view: str = field(default=WHOLE_IMAGE, metadata={"choices": VIEWS})
    model: str = field(default=ATLAS, metadata={"choices": modelChoices})
    atlasDeformable: bool = False
    learnUnannotated: bool = True  # fine-tuning on the atlas also learns from the scene's other 2D images
    atlasAdapter: str = ""         # the adapter last fine-tuned on the atlas (set by Fine-tune; no widget)
    useAtlasAdapter: bool = True   # Detect with the atlas uses atlasAdapter (off: the plain atlas of the table)
    modelFile: str = ""
    adapter: str = ""
    device: str = field(default="auto", metadata={"choices": DEVICES})
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    outputMarkups: object = field(default=None, metadata={"node": "vtkMRMLMarkupsFiducialNode"})
    trainingMarkups: object = field(default=None, metadata={"node": "vtkMRMLMarkupsFiducialNode"})
    timeBudget: float = field(default=api.REFINE_DEFAULTS.time_budget, metadata={"range": TIME_BUDGET_RANGE})
    adapterName: str = "my-task"
    analysis: str = field(default=api.DEFAULT_ANALYSIS, metadata={"choices": lambda: list(api.analyses())})
    showTracing: bool = True       # the chosen analysis's lines and angles over the result's points
    landmarkSet: str = field(default=FROM_MODEL, metadata={"choices": landmarkSetChoices})  # what Annotate
    landmarkSetFile: str = ""      # places and Add case checks; the file for FROM_FILE (CSV or JSON)
    batchFolder: str = ""          # Detect on a folder: its images (and every DICOM series below it) ...
    batchOutput: str = ""          # ... into this folder: <case id>.mrk.json each and landmarks.csv


PANEL_FIELDS = [f.name for f in fields(PanelState)]


@dataclass(frozen=True)
class AtlasOptions:
    """Which of the atlas's options the panel enables (they apply to the 2D atlas only), and why."""

    deformable: bool
    learnUnannotated: bool
    useAdapter: bool
    useAdapterTip: str


class PanelLogic(MedSapiensLogic):
    """The panel's decisions on top of MedSapiensLogic; `p` is the parameter node (or a PanelState)."""

    tracing = None            # the Tracing shown over the result node now
    _traced = None            # (node ID, analysis) it was made for
    onAnalysisChanged = None  # called when the traced points changed (the panel recomputes its table)
    review = None             # the Review of the result node
    placing = None            # a PointsObserver of the annotated points node
    onPointsChanged = None    # called when the annotated or the reviewed points changed (the panel redraws the
                              # landmark to place next and the review list)

    def __init__(self, scene, worker=None, markupsLogic=None):
        """markupsLogic: the application's vtkSlicerMarkupsLogic (its place mode and jumps); without it Annotate
        makes the node without starting place mode, and a review cannot jump."""
        super().__init__(scene, worker)
        self.markupsLogic = markupsLogic

    def viewFor(self, view: str):
        """What to analyse, as MedSapiensLogic takes it: None (the whole 2D image), WHOLE_VOLUME, or the slice node
        of the view with that layout name (Red, Green, Yellow)."""
        from medsapiens import InputError

        if view == WHOLE_IMAGE:
            return None
        if view == WHOLE_VOLUME:
            return WHOLE_VOLUME
        for node in self.scene.GetNodesByClass("vtkMRMLSliceNode"):
            if node.GetLayoutName() == view:
                return node
        raise InputError(f"no {view} slice view in this layout")

    def detectOptions(self, p) -> dict:
        """startDetect's options for the chosen model: with the atlas, the adapter fine-tuned on it when there is
        one and it is in use, else the atlas of the table's cases; a local file or a catalogue model."""
        from medsapiens import InputError

        if p.model == ATLAS:
            info = p.view != WHOLE_VOLUME and p.useAtlasAdapter and self.adapterInfo(p.atlasAdapter)
            if info:
                self._checkAdapterFitsTable(info)
                return {"model": None, "adapter": p.atlasAdapter}  # the adapter carries its own atlas
            return {"model": None, "atlas": True, "deformable": p.atlasDeformable and p.view != WHOLE_VOLUME}
        if p.view == WHOLE_VOLUME:  # said here, before any download question (startDetect refuses it too)
            raise InputError("a whole volume is detected by the atlas of your annotated volumes; choose the atlas")
        model = p.modelFile if p.model == LOCAL_FILE else p.model
        if not model:
            raise InputError("choose the model file")
        return {"model": model, "adapter": p.adapter or None, "device": p.device, "precision": p.precision}

    def _checkAdapterFitsTable(self, info) -> None:
        """One line where the table's cases are of other landmarks than the adapter in use (it would detect its
        own landmarks on an image of another task)."""
        from medsapiens import InputError

        names = [n for row in self.cases[:1] for n in labels(self.scene.GetNodeByID(row.markupsID))]
        if names and set(names) != set(info["landmark_names"]):
            raise InputError(f"the fine-tuned adapter finds {_names(info['landmark_names'])}, but the table's cases "
                             f"have {_names(names)}: fine-tune again, or clear \"Use my fine-tuned adapter\"")

    def downloadQuestion(self, p) -> str | None:
        """What to ask before a click downloads a catalogue model (the worker downloads it, with progress), or
        None when nothing needs downloading."""
        model = self.detectOptions(p)["model"]
        needed = api.needs_download(model) if model else None
        if not needed:
            return None
        return "Download\n" + "\n".join(f"{e.display}: {e.source.url}" for e in needed) + "?"

    def startDetectFor(self, p):
        """Detect with the panel's choices on its input volume and view."""
        return self.startDetect(p.inputVolume, self.viewFor(p.view), **self.detectOptions(p))

    def startDetectAllFor(self, p):
        """Detect with the panel's choices on every open image (batchImages): each whole 2D image, or with
        "Whole volume (3D)" each whole volume; a new markups node per image."""
        from medsapiens import InputError

        if p.view not in (WHOLE_IMAGE, WHOLE_VOLUME):
            raise InputError(f"Detect on all open images takes whole images: choose \"{WHOLE_IMAGE}\" or "
                             f"\"{WHOLE_VOLUME}\" under Analyse")
        volumes = p.view == WHOLE_VOLUME
        nodes = self.batchImages(volumes)
        if not nodes:
            raise InputError(f"no open {'3D volumes' if volumes else '2D images'} to detect on besides the "
                             "table's annotated ones")
        return self.startDetectBatch(nodes, volumes, **self.detectOptions(p))

    def startDetectFolderFor(self, p):
        """Detect with the panel's choices on the images of a folder, into an output folder (.mrk.json files and
        landmarks.csv, as the command line writes them)."""
        from medsapiens import InputError

        if not p.batchFolder:
            raise InputError("choose the folder of images to detect on")
        if not p.batchOutput:
            raise InputError("choose an output folder for the .mrk.json files and landmarks.csv")
        return self.startDetectFolder([p.batchFolder], p.batchOutput, **self.detectOptions(p))

    def startFinetuneFor(self, p, **settings):
        """Fine-tune on the table's cases: with the atlas chosen, a refiner on top of the atlas of the cases
        (learning from the scene's other 2D images where asked); with a model, LoRA on it. settings: more engine
        settings by name (the panel gives none)."""
        if p.model == ATLAS:
            unannotated = self.unannotatedImages() if p.learnUnannotated else []
            return self.startFinetune(None, self.adapterPath(p.adapterName, atlas=True),
                                      time_budget=float(p.timeBudget), deformable=p.atlasDeformable,
                                      unannotated=unannotated, **settings)
        return self.startFinetune(self.detectOptions(p)["model"], self.adapterPath(p.adapterName, atlas=False),
                                  device=p.device, time_budget=float(p.timeBudget), **settings)

    def finishJob(self, job, p) -> str:
        """Take a finished job's result into the scene and the panel state; the status line to show."""
        if job.kind == "detect_batch":
            return self.finishBatch(job, p)
        if job.cancelled:
            return "Cancelled; nothing was changed."
        if job.error:
            return f"Error: {job.error}"
        if job.kind == "finetune" and "info" in job.result:  # on the atlas: Detect with the atlas uses it now
            p.atlasAdapter, p.useAtlasAdapter = job.result["adapter"], True
            return f"Adapter saved to {job.result['adapter']}; Detect with the atlas uses it."
        if job.kind == "report":
            self._removeFiles(job)
            return f"Report saved to {' and '.join(job.result['files'])}."
        if job.kind == "finetune":
            p.adapter = job.result["adapter"]
            return f"Adapter saved to {job.result['adapter']} and selected."
        node = self.finishDetect(job)
        p.outputMarkups = node
        self.followPoints(p)
        return self.placedSummary(node)

    def finishBatch(self, job, p) -> str:
        """A finished, failed or cancelled batch: the result shows its first new node; the status line says what
        was made, then names each image that failed, a line each. What was done before a Cancel is kept."""
        context = job.context
        nodes = [n for n in map(self.scene.GetNodeByID, context["nodes"]) if n is not None]  # (not deleted since)
        if nodes:
            p.outputMarkups = nodes[0]
            self.followPoints(p)
        if "images" in context:  # the open images: a new node each
            done = len(nodes)
            made = kept = f"{_count(done, 'new markups node')} ({', '.join(n.GetName() for n in nodes[:3])}" \
                          f"{', ...' * (done > 3)})"
        else:  # a folder: .mrk.json files, and landmarks.csv at the end
            done = len(context["written"])
            made = f"{_count(done, '.mrk.json file')} and landmarks.csv in {context['out']}" if done else \
                "nothing written"
            kept = f"the .mrk.json {'file' if done == 1 else 'files'} in {context['out']} (no landmarks.csv)"
        if job.cancelled:
            status = f"Cancelled after {_count(done, 'image')}; kept: {kept}." if done else \
                "Cancelled; nothing was changed."
        elif job.error:
            status = f"Error: {job.error}" + (f"; kept: {kept}." if done else "")
        else:
            status = f"Detected on {done} of {_count(job.result['images'] + context['unsent'], 'image')}: {made}."
        return "\n".join([status, *(f"Not detected: {line}" for line in context["errors"])])

    # ---------------------------------------------------------------------------------- annotate, add cases
    def landmarkSetFor(self, p):
        """The landmark set chosen in the panel (medsapiens.landmark_sets.LandmarkSet): a shipped one, a file's, or
        the chosen model's (modelLandmarkSet; None where it is not known)."""
        from medsapiens import InputError

        if p.landmarkSet == FROM_FILE:
            if not p.landmarkSetFile:
                raise InputError("choose the landmark set's file (CSV name,description, or JSON)")
            return api.landmark_set(p.landmarkSetFile)
        if p.landmarkSet != FROM_MODEL:
            return api.landmark_set(next(n for n, title in api.landmark_sets().items() if title == p.landmarkSet))
        return self.modelLandmarkSet(p)

    def modelLandmarkSet(self, p):
        """The chosen model's landmarks: with the atlas, the adapter's in use, else those of the table's cases (None
        while it is empty); a model file's or a catalogue model's (None where only loading it would tell)."""
        from medsapiens import InputError

        options = self.detectOptions(p)
        if options.get("atlas"):
            names = dict.fromkeys(n for row in self.cases for n in labels(self.scene.GetNodeByID(row.markupsID)))
            return api.landmark_set(list(names), "my cases") if names else None
        try:
            return api.landmark_set(options["model"] or options["adapter"])
        except InputError:
            return None  # e.g. a checkpoint that names its landmarks only once loaded

    def modelLandmarksLine(self, p) -> str:
        """What the 'Landmarks:' row shows: the chosen model's landmarks, or why they are not known yet."""
        from medsapiens import InputError

        try:
            found = self.modelLandmarkSet(p)
        except InputError as e:  # no model file chosen, an adapter for other landmarks: said where Detect says it
            return f"not known: {e}"
        if found is not None:
            return f"{len(found.names)}: {_names(found.names)}"
        return "those of your cases (none yet)" if p.model == ATLAS else "known once the model is loaded"

    def annotate(self, p):
        """Annotate this image: a NEW markups node holding the chosen set's landmarks unplaced, in order (see
        annotation.py), chosen as the annotated points, with Slicer's place mode started on it."""
        from medsapiens import InputError

        if p.inputVolume is None:
            raise InputError("choose the image to annotate as the input volume first")
        landmarkSet = self.landmarkSetFor(p)
        if landmarkSet is None:
            raise InputError("the chosen model's landmarks are not known yet (the atlas has no cases, or the model "
                             "names them only once loaded): choose a landmark set or a file")
        node = templateNode(self.scene, landmarkSet, f"{p.inputVolume.GetName()} points")
        p.trainingMarkups = node
        self.followPoints(p)
        if self.markupsLogic is not None:
            self.markupsLogic.SetActiveList(node)
            self.markupsLogic.StartPlaceMode(True)
        return node

    def placementLine(self, p) -> str:
        """The landmark to place next in the annotated points and its description, or what is placed."""
        return placementLine(p.trainingMarkups)

    def skipLandmark(self, p) -> str:
        """Leave the landmark to place next unplaced (missing) and go on to the next one; the placement line."""
        if p.trainingMarkups is not None:
            skipNext(p.trainingMarkups)
        return self.placementLine(p)

    @staticmethod
    def templatePicture(p) -> str:
        """The reference picture of the set the annotated points follow, or ""."""
        node = p.trainingMarkups
        return (node.GetAttribute(PICTURE_ATTRIBUTE) or "") if node is not None else ""

    def addCaseFor(self, p) -> str:
        """Add case: the annotated points on the input volume as the panel's view shows it, checked first against
        the chosen landmark set (checkLandmarks). Returns the status line."""
        self.checkLandmarks(p, p.trainingMarkups)
        row = self.addCase(p.inputVolume, p.trainingMarkups, self.viewFor(p.view))
        return f"Case added: {row.case.name}, {len(self.cases)} in the table."

    def checkLandmarks(self, p, node) -> None:
        """One line when the node's labels repeat a landmark, name one the chosen set lacks, or are fewer than its
        landmarks (an unplaced or skipped point counts: it is a missing landmark). With the model's landmarks
        chosen and none known (the first case of the atlas), only repeats are refused."""
        from medsapiens import InputError

        if node is None:
            return  # addCase says what to choose
        try:
            expected = self.landmarkSetFor(p)
        except InputError:
            if p.landmarkSet != FROM_MODEL:
                raise
            expected = None  # no model file chosen yet: nothing to check against
        api.check_landmark_names(labels(node), node.GetName(), expected)

    # ------------------------------------------------------------------------------------------------ review
    def followPoints(self, p) -> None:
        """Watch the annotated points (the landmark to place next) and review the result node (review.py), each
        made once per node; onPointsChanged hears of every change of their points."""
        self.placing = self._follow(self.placing, p.trainingMarkups, PointsObserver)
        self.review = self._follow(self.review, p.outputMarkups, Review)

    def _follow(self, current, node, kind):
        if current is not None and node is not None and current.node.GetID() == node.GetID():
            return current
        if current is not None:
            current.stop()
        return kind(node, self._pointsChanged) if node is not None else None

    def _pointsChanged(self) -> None:
        """Leave place mode once the annotated points are all placed or skipped; tell the panel."""
        node = self.placing.node if self.placing else None
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        if (node is not None and interaction is not None and nextToPlace(node) < 0 and self.markupsLogic is not None
                and self.markupsLogic.GetActiveListID() == node.GetID()
                and interaction.GetCurrentInteractionMode() == interaction.Place):
            interaction.SwitchToViewTransformMode()
        if self.onPointsChanged:
            self.onPointsChanged()

    @staticmethod
    def reviewRows(p) -> list:
        """The result's points to check (and those corrected), the least probable first (review.ReviewRow)."""
        return reviewRows(p.outputMarkups)

    @staticmethod
    def reviewLine(rows) -> str:
        """What the review list's heading says for these rows."""
        if not rows:
            return "No point of this result is flagged for checking."
        return "Points to check, least probable first: click one to go to it, and drag it where it belongs."

    def jumpToPoint(self, p, index: int) -> None:
        """Centre the slice views on point `index` of the result (Slicer's markups logic jumps them) and make it
        the node's active point."""
        node = p.outputMarkups
        self.markupsLogic.JumpSlicesToNthPointInMarkup(node.GetID(), index, True)
        if node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetActiveControlPoint(index)

    def addReviewedCase(self, p) -> str:
        """Add as case: the result node as reviewed, a case on the image it was detected on with that image's
        geometry (addDetectedCase), checked like Add case. The status line names the flagged points left as they
        were detected."""
        from medsapiens import InputError

        node = p.outputMarkups
        if node is None:
            raise InputError("no result to add yet: Detect first")
        self.checkLandmarks(p, node)
        row = self.addDetectedCase(node)
        kept = [r.name for r in reviewRows(node) if not r.corrected]
        kept = f" Flagged and not moved (kept as detected): {', '.join(kept)}." if kept else ""
        return f"Case added: {row.case.name}, {len(self.cases)} in the table.{kept}"

    def shutdown(self) -> None:
        for watch in (self.placing, self.review):
            if watch is not None:
                watch.stop()
        self.placing = self.review = None
        super().shutdown()

    # --------------------------------------------------------------------------------------- analysis, tracing
    def analysisTable(self, p):
        """The rows of the chosen analysis of the result node's points as they are now (None: not analysable)."""
        return analysisRows(p.outputMarkups, analysis=p.analysis)

    def showTracing(self, p) -> None:
        """The tracing of the chosen analysis over the result node: made once per node and analysis (the old one
        removed), shown or hidden with showTracing; none for a node the analysis cannot read."""
        node = p.outputMarkups
        key = (node.GetID() if node else None, p.analysis)
        if key != self._traced:
            if self.tracing:
                self.tracing.remove()
            self.tracing, self._traced = None, key
            if nodeLandmarks(node) is not None:
                self.tracing = Tracing(node, api.tracing(p.analysis), p.analysis)
                self.tracing.onChanged = lambda: self.onAnalysisChanged and self.onAnalysisChanged()
        if self.tracing:
            self.tracing.setVisible(p.showTracing)

    def landmarkSource(self, p) -> str:
        """Where the result's points came from, for the report: the detector the node records (with an atlas
        adapter's held-out error), or annotated by hand."""
        source = p.outputMarkups.GetAttribute(SOURCE_ATTRIBUTE) or ""
        if not source:
            return f"annotated ({p.outputMarkups.GetName()})"
        info = self.adapterInfo(p.atlasAdapter)
        if info and source.endswith(f"adapter {Path(info['path']).name}"):
            source += (f", held-out error {info['adapter_mre_mm']:.2f} mm (atlas {info['atlas_mre_mm']:.2f} mm; "
                       f"{info['method']}, {info['cases_estimated']} cases)")
        return f"detected: {source}"

    def startReportFor(self, p, path):
        """Send the image the result was detected on (else the input image on the panel's view) and the result's
        points as they are now to the worker, which writes the report (HTML and PDF) of the chosen analysis to
        `path`."""
        from medsapiens import InputError

        case, geometry = self.detectedOn(p.outputMarkups) or self.caseFor(p.inputVolume, self.viewFor(p.view))
        found = nodeLandmarks(p.outputMarkups, geometry)
        if found is None:
            raise InputError("the result's points are not the ISBI cephalometric landmarks")
        image = self._worker().writeCase(replace(case, landmarks=found[0]), "report")
        return self._worker().submit("report", {"files": [image]}, case=image, out=str(path), analysis=p.analysis,
                                     title=p.outputMarkups.GetName(), source=self.landmarkSource(p))

    @staticmethod
    def placedSummary(node) -> str:
        names = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
        missing = [n for i, n in enumerate(names) if node.GetNthControlPointPositionStatus(i) == node.PositionMissing]
        notFound = f" Not found: {', '.join(missing)}." if missing else ""
        return f"{len(names) - len(missing)} of {len(names)} landmarks placed in '{node.GetName()}'.{notFound}"

    @staticmethod
    def setPointsLocked(node, locked: bool) -> None:
        """Lock or unlock every point of a result node (Detect locks the points it trusts; unlocking lets the user
        drag them), leaving the node itself unlocked."""
        wasModifying = node.StartModify()
        node.SetLocked(False)
        for i in range(node.GetNumberOfControlPoints()):
            node.SetNthControlPointLocked(i, locked)
        node.EndModify(wasModifying)

    def atlasOptions(self, p) -> AtlasOptions:
        """The B-spline stage, the fine-tuned adapter and learning from unannotated images apply to the 2D atlas."""
        atlas2D = p.model == ATLAS and p.view != WHOLE_VOLUME
        info = self.adapterInfo(p.atlasAdapter)
        tip = (f"Detect with the atlas uses {info['path']}: its own atlas cases, refined. Off: the plain atlas of "
               "the table's cases." if info else "Fine-tune with the atlas chosen to make an adapter.")
        return AtlasOptions(atlas2D, atlas2D, atlas2D and info is not None, tip)

    def caseTable(self, p) -> list[tuple[str, str, str, str]]:
        """The case table's rows: volume, points, plane, and "seen" where the atlas adapter was trained on it."""
        seen = self.casesSeen(self.adapterInfo(p.atlasAdapter))
        return [(self.scene.GetNodeByID(row.volumeID).GetName(), self.scene.GetNodeByID(row.markupsID).GetName(),
                 row.plane, "seen" if s else "") for row, s in zip(self.cases, seen)]

    @staticmethod
    def jobStatus(job, label: str) -> str:
        return f"{label}: {job.message or 'starting the engine'}, {job.elapsed:.0f} s"

    @staticmethod
    def learnUnannotatedTip() -> str:
        most = api.REFINE_DEFAULTS.max_unannotated
        return (f"Atlas only: the atlas of your cases labels every other open 2D image (about 2.5 s each, at most "
                f"{most}), and the refiner learns from those labels too. It does not change your images or points.")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _names(names, shown: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
