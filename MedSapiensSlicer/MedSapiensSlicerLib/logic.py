"""MedSapiens logic on any MRML scene: slice or 2D volume -> engine Case, engine results -> a new markups node.

MRML only (no Qt, no slicer.app), so it runs inside Slicer and under pytest on `slicer-core`. Engine calls that
take long (`detector.detect`, `finetune`) hold no MRML objects and may run on a worker thread; nodes are read
before and written after, on the caller's thread.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .analysis import PLANE_ATTRIBUTE, planeAttribute
from .geometry import PlaneGeometry, resample, slice_plane, thickness_along

LOW_CONFIDENCE = 0.5
SOURCE_ATTRIBUTE = "MedSapiens.Source"


class MedSapiensLogic:
    def __init__(self, scene):
        self.scene = scene

    # ---------------------------------------------------------------------------------------- images from MRML
    def caseFromSlice(self, sliceNode, volumeNode):
        """The image of `volumeNode` on the plane of `sliceNode` (any reformat), cut to the volume, row 0 at top.

        Returns (medsapiens.Case, PlaneGeometry); the Case carries raw intensities and its pixel -> LPS matrix.
        """
        from medsapiens import Case, InputError

        image_data = self._imageData(volumeNode)
        ijk_to_ras = _matrix(volumeNode.GetIJKToRASMatrix)
        slice_to_ras = _vtk_to_numpy_matrix(sliceNode.GetSliceToRAS())
        try:
            pixel_to_ras, size = slice_plane(slice_to_ras, sliceNode.GetFieldOfView(), ijk_to_ras,
                                             image_data.GetDimensions())
        except ValueError as e:
            raise InputError(f"{sliceNode.GetName()}: {e} {volumeNode.GetName()}") from None
        scalars = _scalars(image_data)
        image = resample(image_data, ijk_to_ras, pixel_to_ras, size, float(scalars.min()))
        geometry = PlaneGeometry(pixel_to_ras, thickness_along(ijk_to_ras, pixel_to_ras[:3, 2]))
        case = Case(_three_channels(image), geometry.spacing, name=volumeNode.GetName(),
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
        ijk_to_ras = _matrix(volumeNode.GetIJKToRASMatrix)
        pixel_to_ras = ijk_to_ras.copy()  # exactly the voxel grid: anisotropic spacing and directions kept
        normal = np.cross(ijk_to_ras[:3, 0], ijk_to_ras[:3, 1])
        pixel_to_ras[:3, 2] = normal / np.linalg.norm(normal)
        geometry = PlaneGeometry(pixel_to_ras, thickness_along(ijk_to_ras, pixel_to_ras[:3, 2]))
        image = _scalars(image_data)[0]
        case = Case(_three_channels(image), geometry.spacing, name=volumeNode.GetName(),
                    pixel_to_lps=geometry.pixel_to_lps)
        return case, geometry

    def caseFor(self, volumeNode, sliceNode=None):
        """caseFromVolume2D for a single-slice volume without a view, else caseFromSlice."""
        from medsapiens import InputError

        if volumeNode is None:
            raise InputError("no input volume selected")
        if sliceNode is None:
            return self.caseFromVolume2D(volumeNode)
        return self.caseFromSlice(sliceNode, volumeNode)

    # ----------------------------------------------------------------------------------------------- markups
    def writeLandmarks(self, landmarks, geometry: PlaneGeometry, name: str | None = None, source: str = ""):
        """A NEW fiducial node: one named point per landmark on the analysed plane, confidence in the description.

        Confident points are locked; low-confidence ones are left unlocked and unselected (drawn in the
        display node's other colour) for review; missing landmarks get position status "missing".
        """
        import vtk

        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                            self.scene.GenerateUniqueName(name or "MedSapiens landmarks"))
        node.CreateDefaultDisplayNodes()
        ras = geometry.to_ras(np.nan_to_num(landmarks.points))
        wasModifying = node.StartModify()
        for i, label in enumerate(landmarks.names):
            index = node.AddControlPoint(vtk.vtkVector3d(*ras[i]), label)
            confidence = float(landmarks.confidence[i])
            node.SetNthControlPointDescription(index, f"confidence {confidence:.3f}")
            confident = bool(landmarks.present[i]) and confidence >= LOW_CONFIDENCE
            node.SetNthControlPointLocked(index, confident)
            node.SetNthControlPointSelected(index, confident)
            if not landmarks.present[i]:
                node.SetNthControlPointPositionMissing(index)
        node.SetAttribute(SOURCE_ATTRIBUTE, source)
        node.SetAttribute(PLANE_ATTRIBUTE, planeAttribute(geometry))  # for the analysis of the points later
        node.EndModify(wasModifying)
        return node

    def trainingCase(self, volumeNode, markupsNode, sliceNode=None):
        """An annotated engine Case: the image (as caseFor) with the markups' points projected into its pixels.

        A point farther off the plane than half a slice, or without a defined position, is a missing landmark.
        """
        from medsapiens import InputError, Landmarks

        case, geometry = self.caseFor(volumeNode, sliceNode)
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
        pixels, off_plane = geometry.to_pixel(ras)
        on_plane = defined & (off_plane <= geometry.thickness / 2)
        if not on_plane.any():
            raise InputError(f"{markupsNode.GetName()}: none of its points lies on the analysed slice of "
                             f"{volumeNode.GetName()} (within half a slice, {geometry.thickness / 2:.2f} mm)")
        pixels[~on_plane] = np.nan
        case.landmarks = Landmarks(names, pixels, present=on_plane)
        return case

    # -------------------------------------------------------------------------------------------- engine calls
    def detect(self, volumeNode, detector, sliceNode=None, name=None):
        """Detect on the slice (or 2D volume) and write a new markups node; synchronous (see the module docstring)."""
        case, geometry = self.caseFor(volumeNode, sliceNode)
        found = detector.detect(case)
        return self.writeLandmarks(found, geometry, name or f"{volumeNode.GetName()} landmarks",
                                   source=type(detector).__name__)

    @staticmethod
    def finetune(cases, base, out, progress=None, cancel=None, **settings):
        """Train an adapter on engine cases (from trainingCase); touches no MRML, so it may run on a worker thread.

        settings: time_budget (s), steps, views_per_case, lora_blocks, lr, input_hw, device. Returns the path.
        """
        from dataclasses import replace

        from medsapiens.training.loops import FINETUNE_DEFAULTS, FinetuneSettings, finetune

        device = settings.pop("device", None)
        ft = {k: settings.pop(k) for k in ("views_per_case", "lora_blocks") if k in settings}
        return finetune(base, cases, out, settings=FinetuneSettings(replace(FINETUNE_DEFAULTS, **settings), **ft),
                        device=device, progress=progress, cancel=cancel)

    @staticmethod
    def userModelsDir() -> Path:
        """Where adapters trained in Slicer are kept (beside the download cache)."""
        from medsapiens.models.catalogue import cache_dir

        path = Path(cache_dir()).parent / "adapters"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _imageData(volumeNode):
        from medsapiens import InputError

        image_data = volumeNode.GetImageData() if volumeNode is not None else None
        if image_data is None or image_data.GetNumberOfPoints() == 0:
            raise InputError(f"{volumeNode.GetName() if volumeNode else 'volume'}: holds no image data")
        return image_data


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
