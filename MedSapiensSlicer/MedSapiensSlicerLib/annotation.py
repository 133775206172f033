"""Annotating an image from a landmark set (a template): a new markups node holding the set's names as unplaced
control points (position status undefined), in the set's order, with their descriptions.

Slicer's own place mode fills such a node in order: on each click, the markups display node places the next
point whose position is undefined (vtkMRMLMarkupsDisplayNode::UpdateActiveControlPointWorld, from the node's
placement start index, wrapping around) and passes over placed and missing ones. So a landmark that cannot be
placed is skipped by marking it missing, and it stays missing in the case (MedSapiensLogic.annotatedCase reads
defined points only). The node's number of points is fixed, so a click after the last landmark adds no stray
point. MRML only.
"""
from __future__ import annotations

SET_ATTRIBUTE = "MedSapiens.LandmarkSet"  # on a template node: the title of the set it follows
PICTURE_ATTRIBUTE = "MedSapiens.LandmarkSetPicture"  # and the set's reference picture, where it has one


def templateNode(scene, landmarkSet, name: str):
    """A NEW fiducial node: one unplaced control point per landmark of `landmarkSet` (medsapiens.landmark_sets),
    labelled with its name and described with its description."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    wasModifying = node.StartModify()
    for label, description in zip(landmarkSet.names, landmarkSet.descriptions):
        index = node.AddControlPoint(vtk.vtkVector3d(0, 0, 0), label)
        node.SetNthControlPointDescription(index, description)
        node.UnsetNthControlPointPosition(index)
    node.SetFixedNumberOfControlPoints(True)
    node.SetAttribute(SET_ATTRIBUTE, landmarkSet.title)
    if landmarkSet.picture is not None:
        node.SetAttribute(PICTURE_ATTRIBUTE, str(landmarkSet.picture))
    node.EndModify(wasModifying)
    return node


def labels(node) -> list[str]:
    return [node.GetNthControlPointLabel(i).strip() for i in range(node.GetNumberOfControlPoints())]


def nextToPlace(node) -> int:
    """The index of the point Slicer's place mode fills next (the one previewed under the mouse, else the first
    undefined one from the placement start index, wrapping around), or -1 when every point is placed or missing."""
    n = node.GetNumberOfControlPoints()
    statuses = [node.GetNthControlPointPositionStatus(i) for i in range(n)]
    if node.PositionPreview in statuses:
        return statuses.index(node.PositionPreview)
    start = node.GetControlPointPlacementStartIndex()
    start = start if 0 <= start < n else 0
    return next((i % n for i in range(start, start + n) if statuses[i % n] == node.PositionUndefined), -1)


def skipNext(node) -> int:
    """Mark the landmark to place next as missing (place mode then moves on to the one after); its index, or -1."""
    index = nextToPlace(node)
    if index >= 0:
        node.SetNthControlPointPositionMissing(index)
    return index


def placementLine(node) -> str:
    """What the panel says while a node is annotated: the landmark to place next and its description, or how many
    are placed and which are missing."""
    if node is None or node.GetNumberOfControlPoints() == 0:
        return ""
    names, index = labels(node), nextToPlace(node)
    if index >= 0:
        description = node.GetNthControlPointDescription(index)
        return (f"Place {names[index]} ({index + 1} of {len(names)}){': ' + description if description else ''}. "
                "Click it in a slice view, or Skip it if it cannot be seen.")
    missing = [name for i, name in enumerate(names) if node.GetNthControlPointPositionStatus(i) == node.PositionMissing]
    return (f"{len(names) - len(missing)} of {len(names)} landmarks placed in '{node.GetName()}'"
            f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. Add case to use them.")
