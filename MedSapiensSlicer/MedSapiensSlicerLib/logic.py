"""MedSapiens logic on any MRML scene: slice or 2D volume -> engine Case, whole 3D volume -> engine Volume, engine
results -> a new markups node.

MRML only (no Qt, no slicer.app), so it runs inside Slicer and under pytest on `slicer-core`. Engine work runs
in the worker process (worker_client.EngineWorker): an image and its landmarks are copied out of the scene into
files when a request starts, and results enter the scene when the caller's poll sees them arrive.

Annotated cases carry their own geometry: "Add case" keeps a copy of the image on the plane analysed then and
its exact pixel -> RAS matrix (parent transforms included); only the points are read again when the case is
used, projected onto that stored plane. A whole-volume case likewise keeps a copy of the voxels and their exact
voxel -> LPS matrix (world coordinates), and its points are read in 3D. A case whose volume or markups node is
deleted leaves the table.

Fine-tuning with the atlas chosen trains a patch refiner on top of the atlas of the table's (2D) cases; its
adapter carries those cases and an error estimated on held-out cases (api.adapter_info), which `adapterSummary`
words for the panel and `casesSeen` matches to the table's rows.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .analysis import PLANE_ATTRIBUTE, planeAttribute
from .geometry import PlaneGeometry, resample, slice_plane, thickness_along

SOURCE_ATTRIBUTE = "MedSapiens.Source"
WHOLE_IMAGE = "Whole 2D image"
WHOLE_VOLUME = "Whole volume (3D)"  # what to analyse: the whole volume, in 3D, instead of a slice node or 2D image


@dataclass(frozen=True)
class CaseRow:
    """One annotated case of the table: the image captured at "Add case" and the node holding its points."""

    volumeID: str
    markupsID: str
    plane: str              # what the table shows: WHOLE_IMAGE, WHOLE_VOLUME or the slice that was analysed
    case: object            # medsapiens.Case: its own copy of the pixels, spacing and pixel -> LPS matrix;
                            # medsapiens.Volume for WHOLE_VOLUME: its copy of the voxels and voxel -> LPS matrix
    geometry: PlaneGeometry | None  # None for a whole volume (its points are LPS mm)


@dataclass(frozen=True)
class Detection:
    """What a result node was detected on: the image as sent to the engine, so that "Add as case" makes the
    reviewed node a case on exactly that image and geometry, however the views moved since."""

    volumeID: str
    plane: str
    case: object  # None for a whole image or volume of a batch: read again from its node when it is added
    geometry: PlaneGeometry | None


class MedSapiensLogic:
    def __init__(self, scene, worker=None):
        """worker: an EngineWorker to share (tests); by default one is started with the first request."""
        self.scene = scene
        self.worker = worker
        self.cases: list[CaseRow] = []
        self.detections: dict[str, Detection] = {}  # result node ID -> what it was detected on
        self.onCasesChanged = None  # called after rows were added or removed (the panel redraws its table)
        self._observers = [scene.AddObserver(event, self._dropDeletedCases)
                           for event in (scene.NodeRemovedEvent, scene.EndCloseEvent)]

    # ---------------------------------------------------------------------------------------- images from MRML
    def caseFromSlice(self, sliceNode, volumeNode):
        """The image of `volumeNode` on the plane of `sliceNode` (any reformat), cut to the volume, row 0 at top.

        Returns (medsapiens.Case, PlaneGeometry); the Case holds its own copy of the raw intensities and its
        pixel -> LPS matrix (world coordinates: the volume's parent transforms are applied).
        """
        from medsapiens import Case, InputError

        image_data = self._imageData(volumeNode)
        ijk_to_ras = ijk_to_world(volumeNode)
        slice_to_ras = _vtk_to_numpy_matrix(sliceNode.GetSliceToRAS())
        try:
            pixel_to_ras, size = slice_plane(slice_to_ras, sliceNode.GetFieldOfView(), ijk_to_ras,
                                             image_data.GetDimensions())
        except ValueError as e:
            raise InputError(f"{sliceNode.GetName()}: {e} {volumeNode.GetName()}") from None
        scalars = _scalars(image_data)
        image = resample(image_data, ijk_to_ras, pixel_to_ras, size, float(scalars.min()))
        geometry = PlaneGeometry(pixel_to_ras, thickness_along(ijk_to_ras, pixel_to_ras[:3, 2]))
        case = Case(_three_channels(image).copy(), geometry.spacing, name=volumeNode.GetName(),
                    pixel_to_lps=geometry.pixel_to_lps)
        return case, geometry

    def caseFromVolume2D(self, volumeNode):
        """A single-slice volume (PNG, DICOM radiograph) as it is stored: pixel (x, y) = voxel (i = x, j = y, 0)."""
        from medsapiens import Case, InputError

        image_data = self._imageData(volumeNode)
        dims = image_data.GetDimensions()
        if dims[2] != 1:
            raise InputError(f"{volumeNode.GetName()}: a 3D volume ({dims[0]} x {dims[1]} x {dims[2]}); choose the "
                             "slice view to analyse")
        ijk_to_ras = ijk_to_world(volumeNode)
        pixel_to_ras = ijk_to_ras.copy()  # exactly the voxel grid: anisotropic spacing and directions kept
        normal = np.cross(ijk_to_ras[:3, 0], ijk_to_ras[:3, 1])
        pixel_to_ras[:3, 2] = normal / np.linalg.norm(normal)
        geometry = PlaneGeometry(pixel_to_ras, thickness_along(ijk_to_ras, pixel_to_ras[:3, 2]))
        image = _scalars(image_data)[0].copy()  # not a view of the scene's voxels, which may change meanwhile
        case = Case(_three_channels(image), geometry.spacing, name=volumeNode.GetName(),
                    pixel_to_lps=geometry.pixel_to_lps)
        return case, geometry

    def caseFromVolume3D(self, volumeNode):
        """The whole volume as an engine Volume: a copy of its voxels and their voxel -> LPS matrix in world
        coordinates (the volume's linear parent transforms applied), so points read in world RAS match it."""
        from medsapiens import InputError, Volume

        image_data = self._imageData(volumeNode)
        if image_data.GetNumberOfScalarComponents() != 1:
            raise InputError(f"{volumeNode.GetName()}: a vector (e.g. colour) volume; whole-volume detection needs "
                             "one scalar per voxel")
        if min(image_data.GetDimensions()) < 2:
            raise InputError(f"{volumeNode.GetName()}: a single-slice image; choose the whole 2D image instead")
        index_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_world(volumeNode)
        return Volume(_scalars(image_data).copy(), index_to_lps, name=volumeNode.GetName())

    def caseFor(self, volumeNode, view=None):
        """(case, geometry) for what to analyse: `view` a slice node (its current slice; caseFromSlice), None
        (the whole 2D image; caseFromVolume2D) or WHOLE_VOLUME (caseFromVolume3D; geometry None)."""
        from medsapiens import InputError

        if volumeNode is None:
            raise InputError("no input volume selected")
        if view is None:
            return self.caseFromVolume2D(volumeNode)
        if view == WHOLE_VOLUME:
            return self.caseFromVolume3D(volumeNode), None
        return self.caseFromSlice(view, volumeNode)

    # ---------------------------------------------------------------------------------------- annotated cases
    def addCase(self, volumeNode, markupsNode, view=None) -> CaseRow:
        """Capture an annotated case: the image on the plane analysed now (`view`: the slice of a slice node, None
        for the whole 2D image) with its geometry, or the whole volume (WHOLE_VOLUME), and the markups node.
        Refused at once if none of its points is on the plane (in the volume), or if it does not fit the table
        (see trainingCases)."""
        from medsapiens import InputError

        if volumeNode is None or markupsNode is None:
            raise InputError("choose the input volume and your annotated points first")
        case, geometry = self.caseFor(volumeNode, view)
        return self._addRow(volumeNode, markupsNode, _planeText(view, geometry, case), case, geometry)

    def addDetectedCase(self, markupsNode) -> CaseRow:
        """A result of Detect (reviewed and corrected where needed) as a case: its points on the image they were
        detected on, with that image's geometry; refused like addCase when it does not fit the table."""
        from medsapiens import InputError

        found = self._detectionOf(markupsNode)
        if found is None:
            raise InputError(f"{markupsNode.GetName() if markupsNode else 'result'}: not the result of a Detect on an "
                             "image still open; choose its image and points and Add case")
        detection, volumeNode = found
        return self._addRow(volumeNode, markupsNode, detection.plane, *self._caseOf(detection, volumeNode))

    def detectedOn(self, markupsNode):
        """(case, geometry) of the image a result node was detected on, or None for another node (or its image
        was closed since)."""
        found = self._detectionOf(markupsNode)
        return None if found is None else self._caseOf(*found)

    def _detectionOf(self, markupsNode):
        """(Detection, its volume node) of a result node whose image is still open, else None."""
        detection = self.detections.get(markupsNode.GetID()) if markupsNode is not None else None
        volumeNode = self.scene.GetNodeByID(detection.volumeID) if detection else None
        return None if volumeNode is None else (detection, volumeNode)

    def _caseOf(self, detection, volumeNode):
        """(case, geometry) of a detection: the case it kept, or its volume's taken again (batch results)."""
        case = detection.case or self.caseFor(volumeNode, WHOLE_VOLUME if detection.plane == WHOLE_VOLUME else None)[0]
        return case, detection.geometry

    def _addRow(self, volumeNode, markupsNode, plane: str, case, geometry) -> CaseRow:
        row = CaseRow(volumeNode.GetID(), markupsNode.GetID(), plane,
                      replace(case, name=f"{volumeNode.GetName()} ({plane})"), geometry)
        self.trainingCases([*self.cases, row])
        self.cases.append(row)
        self._casesChanged()
        return row

    def removeCases(self, indices) -> None:
        for i in sorted(set(indices), reverse=True):
            del self.cases[i]
        self._casesChanged()

    def trainingCases(self, rows=None) -> list:
        """The table's cases (or `rows`) as engine cases with landmarks (the markups' current points on each
        stored plane, or in each volume), all over the same names in the same order. 2D: a landmark one case
        lacks is missing there. Whole volumes (the 3D atlas): every markups node must hold the same landmark set
        (a point may be marked missing). 2D cases and whole volumes cannot be mixed."""
        from medsapiens import InputError, Volume, api

        rows = self.cases if rows is None else rows
        if not rows:
            raise InputError("add at least one annotated case (volume + points) to the table first")
        cases = [self.annotatedCase(row) for row in rows]
        volumes = [isinstance(c, Volume) for c in cases]
        if any(volumes) and not all(volumes):
            raise InputError("the table mixes whole volumes (3D) and 2D cases; a detection uses one kind: remove "
                             "the others")
        nodes = [replace(c, name=self.scene.GetNodeByID(r.markupsID).GetName()) for r, c in zip(rows, cases)]
        names = api.shared_landmarks(nodes, same_set=all(volumes), what="annotated volume")
        return [replace(c, landmarks=c.landmarks.subset(names)) for c in cases]

    def annotatedCase(self, row: CaseRow):
        """The row's image with its markups' points projected into its pixels, or its volume with their LPS.

        A point farther off the plane than half a slice (outside the volume), or without a defined position, is a
        missing landmark.
        """
        from medsapiens import InputError, Landmarks

        markupsNode = self.scene.GetNodeByID(row.markupsID)
        n = markupsNode.GetNumberOfControlPoints() if markupsNode else 0
        if n == 0:
            raise InputError(f"{markupsNode.GetName() if markupsNode else 'markups'}: no control points")
        names, ras, defined = [], np.zeros((n, 3)), np.zeros(n, bool)
        for i in range(n):
            names.append(markupsNode.GetNthControlPointLabel(i).strip())
            markupsNode.GetNthControlPointPositionWorld(i, ras[i])
            defined[i] = markupsNode.GetNthControlPointPositionStatus(i) == markupsNode.PositionDefined
        if any(not name for name in names):
            raise InputError(f"{markupsNode.GetName()}: every control point needs a label (the landmark name)")
        if row.geometry is None:  # a whole volume: world RAS -> the LPS of its voxel -> LPS matrix
            lps = ras * [-1.0, -1.0, 1.0]
            inside = defined & row.case.contains(lps)
            if not inside.any():
                raise InputError(f"{markupsNode.GetName()}: none of its points lies in {row.case.name}")
            lps[~inside] = np.nan
            return replace(row.case, landmarks=Landmarks(names, lps, present=inside))
        pixels, off_plane = row.geometry.to_pixel(ras)
        on_plane = defined & (off_plane <= row.geometry.thickness / 2)
        if not on_plane.any():
            raise InputError(f"{markupsNode.GetName()}: none of its points lies on the analysed plane of "
                             f"{row.case.name} (within half a slice, {row.geometry.thickness / 2:.2f} mm)")
        pixels[~on_plane] = np.nan
        return replace(row.case, landmarks=Landmarks(names, pixels, present=on_plane))

    def _dropDeletedCases(self, caller=None, event=None) -> None:
        self.detections = {k: d for k, d in self.detections.items() if self.scene.GetNodeByID(k) is not None}
        kept = [r for r in self.cases
                if self.scene.GetNodeByID(r.volumeID) is not None and self.scene.GetNodeByID(r.markupsID) is not None]
        if len(kept) != len(self.cases):
            self.cases = kept
            self._casesChanged()

    def _casesChanged(self) -> None:
        if self.onCasesChanged:
            self.onCasesChanged()

    # ----------------------------------------------------------------------------------------------- markups
    def writeLandmarks(self, landmarks, geometry: PlaneGeometry | None, name: str | None = None, source: str = ""):
        """A NEW fiducial node: one named point per landmark on the analysed plane (`geometry`; None for volume
        landmarks, which are LPS mm in world coordinates), confidence in the description.

        Points to check (Landmarks.check) are left unlocked and unselected (drawn in the display node's other
        colour) for review, the others locked; missing landmarks get position status "missing".
        """
        import vtk

        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                            self.scene.GenerateUniqueName(name or "MedSapiens landmarks"))
        node.CreateDefaultDisplayNodes()
        points = np.nan_to_num(landmarks.points)  # a missing landmark's position is marked missing below
        ras = points * [-1.0, -1.0, 1.0] if geometry is None else geometry.to_ras(points)
        wasModifying = node.StartModify()
        for i, label in enumerate(landmarks.names):
            index = node.AddControlPoint(vtk.vtkVector3d(*ras[i]), label)
            node.SetNthControlPointDescription(index, landmarks.description(i))
            trusted = bool(landmarks.present[i] and not landmarks.check[i])
            node.SetNthControlPointLocked(index, trusted)
            node.SetNthControlPointSelected(index, trusted)
            if not landmarks.present[i]:
                node.SetNthControlPointPositionMissing(index)
        node.SetAttribute(SOURCE_ATTRIBUTE, source)
        if geometry is not None:
            node.SetAttribute(PLANE_ATTRIBUTE, planeAttribute(geometry))  # for the analysis of the points later
        node.EndModify(wasModifying)
        return node

    # ------------------------------------------------------------------------------------ engine (worker process)
    def startDetect(self, volumeNode, view=None, *, model=None, adapter=None, atlas=False, deformable=False,
                    device="auto", precision="auto"):
        """Send the image (a copy, in a file) to the engine worker; returns its Job (finish it with finishDetect).

        view: what to analyse (see caseFor). model: a weight file or catalogue name (with an optional adapter
        file); adapter alone: an adapter fine-tuned on the atlas (it carries its own atlas cases); atlas=True: the
        weight-free atlas of the table's cases instead (`deformable`: with its B-spline stage). A whole volume
        (WHOLE_VOLUME) is detected by the 3D atlas of the table's whole-volume cases.
        """
        case, geometry = self.caseFor(volumeNode, view)
        fields, files, source = self._detector(view == WHOLE_VOLUME, case.name, model=model, adapter=adapter,
                                               atlas=atlas, deformable=deformable, device=device, precision=precision)
        image = self._worker().writeCase(case, "image")
        out = str(self._worker().newFile("found"))
        context = {"geometry": geometry, "name": f"{volumeNode.GetName()} landmarks", "source": source,
                   "files": [image, out, *files],
                   "detection": Detection(volumeNode.GetID(), _planeText(view, geometry, case), case, geometry)}
        return self._worker().submit("detect", context, case=image, out=out, **fields)

    def finishDetect(self, job):
        """The landmarks of a finished detection as a NEW markups node (see writeLandmarks); the logic remembers
        what it was detected on (addDetectedCase)."""
        found = self._worker().readLandmarks(job.result["landmarks"])
        self._removeFiles(job)
        node = self.writeLandmarks(found, job.context["geometry"], job.context["name"], job.context["source"])
        self.detections[node.GetID()] = job.context["detection"]
        return node

    # ------------------------------------------------------------------------------------------------ batches
    def batchImages(self, wholeVolumes: bool = False) -> list:
        """The open images a batch detects on, in scene order: every 2D image (a single-slice scalar volume), or
        with wholeVolumes every 3D volume; not label maps, not the table's annotated images."""
        in_table = {row.volumeID for row in self.cases}
        nodes = []
        for node in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            data = node.GetImageData()
            if node.GetID() in in_table or node.IsA("vtkMRMLLabelMapVolumeNode") or data is None:
                continue
            if (data.GetDimensions()[2] > 1) == wholeVolumes:
                nodes.append(node)
        return nodes

    def startDetectBatch(self, volumeNodes, wholeVolumes: bool = False, **options):
        """Detect on each of `volumeNodes` (its whole 2D image, or with wholeVolumes its whole volume) in one
        request to the engine worker: one progress bar, Cancel between images. Each image's result becomes a NEW
        markups node named after it as soon as it arrives (poll calls takeBatchResults); an image that cannot be
        sent or detected on adds its line to job.context["errors"] and the others go on. options: startDetect's
        (model, adapter, atlas, deformable, device, precision)."""
        from medsapiens import InputError

        fields, files, source = self._detector(wholeVolumes, "these images", **options)
        images, errors = [], []
        for node in volumeNodes:  # each copied out of the scene at once, so that only one is in memory here
            try:
                case, geometry = self.caseFor(node, WHOLE_VOLUME if wholeVolumes else None)
            except InputError as e:
                errors.append(str(e))
                continue
            images.append({"name": node.GetName(), "geometry": geometry, "id": node.GetID(),
                           "file": self._worker().writeCase(case, "image")})
        if not images:
            _unlink(files)
            raise InputError("; ".join(errors) or "no images to detect on")
        scratch = self._worker().newFile("found", suffix="")  # the worker writes each image's landmarks there
        context = {"images": images, "errors": errors, "unsent": len(errors), "nodes": [], "written": [],
                   "taken": 0, "source": source, "files": [i["file"] for i in images] + files, "scratch": str(scratch)}
        return self._worker().submit("detect_batch", context, cases=[i["file"] for i in images],
                                     out=str(scratch), **fields)

    def startDetectFolder(self, inputs, out, **options):
        """Detect on image files and folders (a folder: its images and every DICOM series below it) in the engine
        worker, as `medsapiens detect` does: `<case id>.mrk.json` per image and one landmarks.csv into the folder
        `out`; one progress bar, Cancel between images, a line per image that fails (job.context["errors"]).
        options: startDetect's; with the atlas, the table's kind (2D cases or whole volumes) decides."""
        fields, files, source = self._detector(None, "these images", **options)
        context = {"errors": [], "unsent": 0, "nodes": [], "written": [], "taken": 0, "source": source,
                   "files": files, "out": str(out)}
        return self._worker().submit("detect_batch", context, files=[str(p) for p in inputs], out=str(out), **fields)

    def takeBatchResults(self, job) -> list:
        """What a batch finished since the last call: each image's landmarks as a NEW markups node named after
        it, the .mrk.json files written, the lines of the images that failed (in job.context). Returns the new
        nodes."""
        context, made = job.context, []
        for item in job.items[context["taken"]:]:
            if "error" in item:
                context["errors"].append(item["error"])
            elif "file" in item:
                context["written"].append(item["file"])
            else:
                image = context["images"][item["index"]]
                found = self._worker().readLandmarks(item["landmarks"])
                Path(item["landmarks"]).unlink(missing_ok=True)
                made.append(self.writeLandmarks(found, image["geometry"], f"{image['name']} landmarks",
                                                context["source"]))
                plane = WHOLE_IMAGE if image["geometry"] is not None else WHOLE_VOLUME
                self.detections[made[-1].GetID()] = Detection(image["id"], plane, None, image["geometry"])
                context["nodes"].append(made[-1].GetID())
        context["taken"] = len(job.items)
        return made

    def _detector(self, volumes, what: str, *, model=None, adapter=None, atlas=False, deformable=False,
                  device="auto", precision="auto"):
        """(the request fields that choose the detector, the files they add, the source a result records) for
        startDetect's options; `volumes`: whether `what` is whole volumes (None: the detector decides)."""
        from medsapiens import InputError, Volume

        if volumes and not atlas:
            raise InputError("a whole volume is detected by the atlas of your annotated volumes; choose the atlas")
        atlasFiles = None
        if atlas:
            atlasCases = self.trainingCases()
            if volumes is not None and isinstance(atlasCases[0], Volume) != volumes:
                held, wanted = ("2D cases", "whole volumes (3D)") if volumes else \
                    ("whole volumes (3D)", "2D cases (a slice or a 2D image)")
                raise InputError(f"the table holds {held}; to detect on {what}, add annotated {wanted}")
            atlasFiles = self._writeCases(atlasCases)
        source = "atlas" if atlas else str(model) if model else f"atlas + adapter {Path(adapter or '').name}"
        fields = {"model": None if atlas else model, "adapter": adapter or None, "atlas": atlasFiles,
                  "deformable": bool(deformable), "device": device, "precision": precision}
        return fields, atlasFiles or [], source

    def unannotatedImages(self) -> list:
        """The scene's other 2D images (single-slice volumes, not label maps, not in the case table) as engine
        cases, when every case of the table is a whole 2D image: fine-tuning on the atlas labels them with the
        atlas and learns from them too."""
        if not self.cases or any(row.plane != WHOLE_IMAGE for row in self.cases):
            return []
        return [self.caseFromVolume2D(node)[0] for node in self.batchImages()]

    def startFinetune(self, base, out, device="auto", unannotated=(), **settings):
        """Train an adapter on the table's cases in the engine worker; the Job's result names the adapter file.

        base None: on the weight-free atlas of the cases (a patch refiner; settings: time_budget (s), steps,
        deformable, lr, ...), which also learns from `unannotated` images (engine cases, e.g. unannotatedImages())
        as the atlas labels them. The result's "info" is api.adapter_info of the new adapter (its held-out estimate,
        the cases it has seen); an adapter already at `out` for the same landmarks is the warm start (half the
        steps); a refiner worse than the atlas on held-out cases ends as a one-line error and writes nothing.
        base a model: LoRA on it (settings: time_budget (s), steps, views_per_case, lora_blocks, lr).
        `out` is written atomically at the end, so a cancelled or failed run leaves any previous file there byte
        for byte as it was.
        """
        from medsapiens import InputError, Volume

        cases = self.trainingCases()
        if isinstance(cases[0], Volume):
            raise InputError("fine-tuning learns from 2D cases; whole volumes (3D) are detected by the atlas of the "
                             "table's volumes as they are")
        if unannotated and base is not None:
            raise InputError("unannotated images are for fine-tuning on the atlas, not on a model")
        files, extra = self._writeCases(cases), self._writeCases(unannotated)
        return self._worker().submit("finetune", {"files": files + extra}, cases=files, unannotated=extra,
                                     base=None if base is None else str(base), out=str(out), device=device,
                                     settings=settings)

    def adapterPath(self, taskName: str, atlas: bool) -> Path:
        """Where Fine-tune writes its adapter, in api.adapters_dir(): `<task>.safetensors` on a base model; on the
        atlas `<task>.atlas-<8 hex>.safetensors`, the hex from the SHA256 of the table's landmark names, so each
        task and landmark set has its own file: re-training it warm-starts from it, and another landmark set
        never replaces it."""
        from medsapiens import api

        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", taskName).strip("-.") or "adapter"
        if not atlas:
            return api.adapters_dir() / f"{name}.safetensors"
        names = self.trainingCases()[0].landmarks.names
        digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:8]
        return api.adapters_dir() / f"{name}.atlas-{digest}.safetensors"

    @staticmethod
    def adapterInfo(path):
        """api.adapter_info of an adapter fine-tuned on the atlas (read from its header), or None where there is
        no such file (none trained yet, deleted, or a LoRA adapter). The header is read once per version of the
        file (a panel update asks several times; a fine-tune replaces the file, so its identity changes)."""
        if not path or not Path(path).is_file():
            return None
        stat = Path(path).stat()
        return _adapterInfo(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)

    @staticmethod
    def adapterSummary(info) -> str:
        """The estimate as the panel shows it, only figures measured on held-out cases: the refiner's error and
        the atlas's, the method and number of cases, and how many landmarks the detector refines (elsewhere it
        keeps the atlas's answer: the held-out cases showed the atlas better there beyond chance; that choice was
        made on the same cases, so no error is claimed for the mix)."""
        if not info:
            return ""
        mm = lambda v: "n/a" if v is None else f"{v:.2f} mm"  # noqa: E731
        warm = ", continued from the previous adapter" if info.get("warm_started") else ""
        more = info.get("unannotated_images", 0)
        more = f", also on {more} unannotated images labelled by the atlas" if more else ""
        return (f"Expected error on unseen cases: adapter {mm(info['adapter_mre_mm'])}, atlas "
                f"{mm(info['atlas_mre_mm'])} ({info['method']}, {info['cases_estimated']} cases); refined landmarks: "
                f"{len(info['refined_landmarks'])} of {len(info['landmark_names'])}. Trained {info['steps']} steps in "
                f"{info['train_seconds']:.0f} s{more}{warm}.{MedSapiensLogic._stageSummary(info.get('atlas_stage'))}"
                f"{MedSapiensLogic._reviewSummary(info.get('review'))}")

    @staticmethod
    def _stageSummary(stage) -> str:
        """' The atlas's B-spline stage (flexible anatomy) was kept: 2.70 mm against 3.41 mm without it on 3
        held-out cases.' (empty where it was not tried or not kept)."""
        if not stage or not stage["bspline"]:
            return ""
        return (f" The atlas's B-spline stage (flexible anatomy) was kept: {stage['bspline_mm']:.2f} mm against "
                f"{stage['affine_mm']:.2f} mm without it on {stage['cases']} held-out cases.")

    @staticmethod
    def _reviewSummary(review) -> str:
        """' Points with P(within 2 mm) < 0.42 are flagged "check": on the held-out cases 24 % of the points,
        with 5 of 8 errors over 3 mm among them.' (empty for adapters from before calibration)."""
        if not review:
            return ""
        gross = review["gross_errors"]
        caught = round((review["gross_caught"] or 0) * gross)
        return (f" Points with P(within 2 mm) < {review['review_below']:.2f} are flagged \"check\": on the held-out "
                f"cases {100 * review['flagged']:.0f} % of the points, with {caught} of {gross} errors over 3 mm "
                "among them.")

    @staticmethod
    def adapterLandmarks(info) -> str:
        """The held-out estimate per landmark, one line each (the panel's tooltip on the estimate)."""
        if not info:
            return ""
        mm = lambda v: "n/a" if v is None else f"{v:.2f} mm"  # noqa: E731
        refined = set(info["refined_landmarks"])
        return "\n".join(f"{name}: adapter {mm(e['refined_mm'])}, atlas {mm(e['atlas_mm'])}"
                         f"{' (refined)' if name in refined else ' (atlas kept)'}"
                         for name, e in info["per_landmark"].items())

    def casesSeen(self, info) -> list:
        """Per table row, True when the adapter (api.adapter_info) has seen that case.

        The key is exact: api.case_checksum (SHA256 of the grey image as the refiner stores it and of the points
        over the adapter's landmarks) of the row's case as it would be sent to the worker now (its stored image,
        its markups' points projected now), against the checksums the adapter recorded for its cases. A point
        moved since the training, or a row whose points cannot be read, makes the row unseen; whole-volume rows are
        never seen (adapters learn from 2D cases).
        """
        from medsapiens import InputError, Volume, api

        if not info:
            return [False] * len(self.cases)
        known = {c["sha256"] for c in info["cases"]}
        seen = []
        for row in self.cases:
            if isinstance(row.case, Volume):  # adapters are fine-tuned on 2D cases only
                seen.append(False)
                continue
            try:
                seen.append(api.case_checksum(self.annotatedCase(row), info["landmark_names"]) in known)
            except InputError:
                seen.append(False)
        return seen

    def poll(self) -> list:
        """Apply the worker's replies (call often from the main thread); returns the jobs that changed."""
        if self.worker is None:
            return []
        changed = self.worker.poll()
        for job in changed:
            if job.kind == "detect_batch":
                self.takeBatchResults(job)
            if job.done and not (job.kind == "detect" and job.result):  # finishDetect still reads a detection's
                self._removeFiles(job)
        return changed

    def wait(self, job, timeout: float = 600.0, step=None):
        """Poll until `job` is done (tests and the self-test; the panel polls from its timer instead).

        step: called between polls instead of sleeping 20 ms (a test harness can hold the GIL there).
        """
        import time

        deadline = time.monotonic() + timeout
        while not job.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not answer within {timeout:.0f} s")
            step() if step else time.sleep(0.02)
            self.poll()
        return job

    def cancel(self, job) -> None:
        if self.worker is not None:
            self.worker.cancel(job)

    def shutdown(self) -> None:
        """End the worker process, remove this session's files and stop watching the scene (module closed or
        reloaded, Slicer quitting)."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        if self.worker is not None:
            self.worker.shutdown()

    def _worker(self):
        if self.worker is None:
            from .worker_client import EngineWorker

            self.worker = EngineWorker()
        return self.worker

    def _writeCases(self, cases) -> list:
        return [self._worker().writeCase(case) for case in cases]

    @staticmethod
    def _removeFiles(job) -> None:
        """The copies a job sent to the worker, and the folder it answered in (never a folder the user chose)."""
        import shutil

        _unlink((job.context or {}).get("files", []))
        if (job.context or {}).get("scratch"):
            shutil.rmtree(job.context["scratch"], ignore_errors=True)

    # --------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _imageData(volumeNode):
        from medsapiens import InputError

        image_data = volumeNode.GetImageData() if volumeNode is not None else None
        if image_data is None or image_data.GetNumberOfPoints() == 0:
            raise InputError(f"{volumeNode.GetName() if volumeNode else 'volume'}: holds no image data")
        return image_data


def ijk_to_world(volumeNode) -> np.ndarray:
    """The volume's IJK -> RAS with its parent transforms applied (as if hardened into a copy)."""
    from medsapiens import InputError

    ijk_to_ras = _matrix(volumeNode.GetIJKToRASMatrix)
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{volumeNode.GetName()}: it lies under a non-linear transform ({parent.GetName()}); "
                         "harden the transform first")
    return _matrix(parent.GetMatrixTransformToWorld) @ ijk_to_ras


def _planeText(view, geometry: PlaneGeometry | None, case) -> str:
    """What was analysed, as the case table shows it (see caseFor for `view`)."""
    if view is None:
        return WHOLE_IMAGE
    if view == WHOLE_VOLUME:
        return WHOLE_VOLUME
    return _describe_plane(view, geometry, case.size)


def _unlink(files) -> None:
    for f in files:
        Path(f).unlink(missing_ok=True)


def _describe_plane(sliceNode, geometry: PlaneGeometry, size) -> str:
    """The analysed slice as the table shows it: its view and the RAS of the image centre."""
    centre = geometry.to_ras([[(size[0] - 1) / 2, (size[1] - 1) / 2]])[0]
    return f"{sliceNode.GetName()} slice at R {centre[0]:.1f}, A {centre[1]:.1f}, S {centre[2]:.1f}"


def _vtk_to_numpy_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _matrix(getter) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    getter(m)
    return _vtk_to_numpy_matrix(m)


def _scalars(image_data) -> np.ndarray:
    """(K, J, I[, C]) array of a vtkImageData's scalars."""
    from vtk.util.numpy_support import vtk_to_numpy

    dims = image_data.GetDimensions()
    comps = image_data.GetNumberOfScalarComponents()
    a = vtk_to_numpy(image_data.GetPointData().GetScalars())
    return a.reshape(dims[2], dims[1], dims[0], comps) if comps > 1 else a.reshape(dims[2], dims[1], dims[0])


def _three_channels(image: np.ndarray) -> np.ndarray:
    """Grey stays grey; RGB(A) vector volumes keep their first three components."""
    return image[..., :3] if image.ndim == 3 and image.shape[2] >= 3 else image[..., 0] if image.ndim == 3 else image


@functools.lru_cache(maxsize=8)
def _adapterInfo(path: str, inode: int, mtime_ns: int, size: int):
    """MedSapiensLogic.adapterInfo for one version of the file (the key's last three fields name it)."""
    from medsapiens import InputError, api

    try:
        return api.adapter_info(path)
    except InputError:
        return None
