"""The clinician's session as one scenario, for the module's self-test (MedSapiensSlicerTest, in Slicer) and for
pytest (Testing/slicer/test_session.py, on slicer-core), both driving the panel's PanelLogic as its buttons do:

annotate 3 phantom radiographs from a landmark set file (one landmark skipped), Fine-tune on the atlas with a
short budget, Detect on a 4th image, review the worst flagged point (the slice views jump to it) and move it
where it belongs, Add as case, and Fine-tune again, warm; each long step is first cancelled in its middle, and
leaves nothing changed. Points are placed by Slicer's own placement code: what place mode runs on each click
(the markups display node's UpdateActiveControlPointWorld) fills the landmark the panel names next.

MRML only, with the engine's phantom images (api.phantom_case), so it needs no data set and no view.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .annotation import labels, nextToPlace
from .panel import FROM_FILE

# The flow, not the accuracy: a few seconds of training per fine-tune on 2 cores, kept even if not better; the
# affine atlas (the B-spline stage would find the phantom's points so well that none is left to review)
FAST = {"steps": 40, "batch": 16, "patch": 32, "width": 8, "keep_worse": True, "try_deformable": False}
ANNOTATED, TARGET = (0, 1, 2), 100  # phantom seeds
SKIPPED = "C2"  # the landmark "not visible" on the second image


def expect(condition, message: str) -> None:
    """An assertion that holds under python -O too."""
    if not condition:
        raise AssertionError(message)


@dataclass
class SessionResult:
    """What the scenario did, for the harness to look at further."""

    cases: list = field(default_factory=list)  # the annotated nodes, in order
    result: object = None                      # the result node of Detect, as reviewed
    corrected: int = -1                        # the index of the point moved in the review
    jumped: list = field(default_factory=list)  # (slice node name, its centre after the jump, the point's RAS)
    first: dict | None = None                  # api.adapter_info of the first and the warm fine-tune
    warm: dict | None = None
    cancelled: list = field(default_factory=list)  # the message each long step was cancelled at
    seconds: dict = field(default_factory=dict)


class SessionScenario:
    """The session on `logic` (a PanelLogic with the application's markups logic) and `p` (its parameter node, or
    a PanelState). log(line): progress lines (the self-test's delayDisplay, or print)."""

    def __init__(self, logic, p, folder, log=print, timeout: float = 600.0):
        self.logic, self.p, self.folder, self.log, self.timeout = logic, p, Path(folder), log, timeout
        self.truth = {}  # volume node ID -> the phantom's true points in world RAS, by name
        self.out = SessionResult()

    def run(self) -> SessionResult:
        logic, p = self.logic, self.p
        p.landmarkSet, p.landmarkSetFile = FROM_FILE, str(self.landmarkSetFile())
        for k, seed in enumerate(ANNOTATED):
            self.annotate(self.addPhantom(seed), skip=SKIPPED if k == 1 else None)
        expect(len(logic.cases) == 3, f"3 cases in the table, not {len(logic.cases)}")
        self.out.first = self.finetune(warm=False)
        self.detect(self.addPhantom(TARGET))
        self.review()
        line = logic.addReviewedCase(p)
        expect(line.startswith("Case added: ") and len(logic.cases) == 4, line)
        self.log(line)
        self.out.warm = self.finetune(warm=True)
        return self.out

    # ------------------------------------------------------------------------------------------------ steps
    def landmarkSetFile(self) -> Path:
        """The phantom's landmarks as a user's landmark set: name,description."""
        from medsapiens import api

        names = api.phantom_case(0).landmarks.names
        path = self.folder / "phantom landmarks.csv"
        path.write_text("name,description\n" + "".join(f"{n},\"the phantom's {n.lower()}, where it is drawn\"\n"
                                                       for n in names), encoding="utf-8")
        return path

    def addPhantom(self, seed: int):
        """A phantom radiograph as a single-slice volume (LPS = (x sx, y sy, 0)), and its true points in RAS."""
        import slicer
        import vtk
        from medsapiens import api

        case = api.phantom_case(seed)
        sx, sy = case.spacing
        volume = self.logic.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", case.name)
        ijkToRAS = vtk.vtkMatrix4x4()
        ijkToRAS.SetElement(0, 0, -sx)
        ijkToRAS.SetElement(1, 1, -sy)
        volume.SetIJKToRASMatrix(ijkToRAS)
        slicer.util.updateVolumeFromArray(volume, np.asarray(case.image)[None])
        volume.CreateDefaultDisplayNodes()
        points = np.column_stack([-case.landmarks.points[:, 0] * sx, -case.landmarks.points[:, 1] * sy,
                                  np.zeros(len(case.landmarks))])
        self.truth[volume.GetID()] = dict(zip(case.landmarks.names, points))
        return volume

    def annotate(self, volume, skip: str | None = None) -> None:
        """Annotate this image, then click each landmark the panel names (skipping `skip`), then Add case."""
        logic, p = self.logic, self.p
        p.inputVolume = volume
        node = logic.annotate(p)
        truth = self.truth[volume.GetID()]
        expect(labels(node) == list(truth), f"the template's names in order: {labels(node)}")
        while nextToPlace(node) >= 0:
            name = labels(node)[nextToPlace(node)]
            expect(logic.placementLine(p).startswith(f"Place {name} "), logic.placementLine(p))
            if name == skip:
                logic.skipLandmark(p)
            else:
                place(node, truth[name])
        expect(node.GetNumberOfControlPoints() == len(truth), "no stray point")
        self.out.cases.append(node)
        self.log(logic.addCaseFor(p))

    def finetune(self, warm: bool) -> dict:
        """Cancel a fine-tune while it trains (the adapter file stays as it was), then run it through."""
        logic, p = self.logic, self.p
        p.timeBudget = 30.0
        path = Path(p.atlasAdapter) if p.atlasAdapter else None
        before = path.read_bytes() if path else None
        self.cancelMidway(logic.startFinetuneFor(p, **FAST), "training network")
        expect((path.read_bytes() if path else None) == before, "a cancelled fine-tune left the adapter as it was")
        t0 = time.monotonic()
        job = logic.wait(logic.startFinetuneFor(p, **FAST), self.timeout)
        self.log(logic.finishJob(job, p))
        expect(job.error is None and not job.cancelled, f"fine-tune: {job.error}")
        info = logic.adapterInfo(p.atlasAdapter)
        expect(bool(info["warm_started"]) == warm, f"warm start: {info['warm_started']}, expected {warm}")
        expect(info["cases_estimated"] == len(logic.cases), f"{info['cases_estimated']} cases estimated")
        self.out.seconds["warm fine-tune" if warm else "fine-tune"] = time.monotonic() - t0
        return info

    def detect(self, volume) -> None:
        """Cancel a detection while the atlas registers (no node is made), then detect into a new node."""
        logic, p = self.logic, self.p
        p.inputVolume = volume
        nodes = self.logic.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")
        self.cancelMidway(logic.startDetectFor(p), "registering atlas case")
        expect(self.logic.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == nodes,
               "a cancelled detection made no node")
        t0 = time.monotonic()
        job = logic.wait(logic.startDetectFor(p), self.timeout)
        self.log(logic.finishJob(job, p))
        expect(job.error is None and p.outputMarkups is not None, f"detect: {job.error}")
        self.out.seconds["detect"] = time.monotonic() - t0
        self.out.result = p.outputMarkups

    def review(self) -> None:
        """Jump to the least probable flagged point and move it onto the truth: the row then says corrected."""
        logic, p = self.logic, self.p
        rows = logic.reviewRows(p)
        expect(rows and not any(r.corrected for r in rows), f"flagged points to review: {rows}")
        worst, node = rows[0], p.outputMarkups
        logic.jumpToPoint(p, worst.index)
        ras = np.array(node.GetNthControlPointPositionWorld(worst.index))
        for sliceNode in logic.scene.GetNodesByClass("vtkMRMLSliceNode"):
            if sliceNode.GetLayoutName() in ("Red", "Green", "Yellow"):
                m = sliceNode.GetSliceToRAS()
                centre = np.array([m.GetElement(r, 3) for r in range(3)])
                expect(np.allclose(centre, ras, atol=1e-6), f"{sliceNode.GetName()} centred on {centre}, not {ras}")
                self.out.jumped.append((sliceNode.GetLayoutName(), centre, ras))
        expect(self.out.jumped, "a slice view to jump")
        truth = self.truth[p.inputVolume.GetID()][worst.name]
        node.SetNthControlPointPositionWorld(worst.index, *truth)  # the user drags it where it belongs
        after = {r.index: r for r in logic.reviewRows(p)}
        expect(after[worst.index].corrected and after[worst.index].cells()[2] == "corrected", f"{after}")
        self.out.corrected = worst.index
        self.log(f"Reviewed {worst.name} (P {worst.probability:.2f}): moved {np.linalg.norm(truth - ras):.1f} mm")

    def cancelMidway(self, job, phase: str) -> None:
        """Cancel `job` once its progress says `phase`; it must end cancelled."""
        deadline = time.monotonic() + self.timeout
        while not job.done and not job.message.startswith(phase):
            expect(time.monotonic() < deadline, f"no '{phase}' progress within {self.timeout:.0f} s")
            time.sleep(0.01)
            self.logic.poll()
        at = job.message
        self.logic.cancel(job)
        self.logic.wait(job, self.timeout)
        expect(job.cancelled and job.result is None, f"cancelled at '{at}': {job.error or 'it finished first'}")
        expect(self.logic.finishJob(job, self.p) == "Cancelled; nothing was changed.", "the status line")
        self.out.cancelled.append(at)


def place(node, ras) -> int:
    """One click of Slicer's place mode at `ras` on `node`: the preview the mouse moves (the next unplaced point,
    chosen by the markups display node as the points widget asks it), then the click that defines it. Returns the
    index placed."""
    import slicer

    event = slicer.vtkMRMLInteractionEventData()
    event.SetWorldPosition(list(map(float, ras)))
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    display = node.GetDisplayNode()
    index = display.UpdateActiveControlPointWorld(node.GetControlPointPlacementStartIndex(), event, identity, "", "",
                                                  node.PositionPreview)
    return display.UpdateActiveControlPointWorld(index, event, identity, "", "", node.PositionDefined)
