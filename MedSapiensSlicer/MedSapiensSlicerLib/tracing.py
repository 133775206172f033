"""The tracing of an analysis over a landmarks node: its lines and angles as markups line and angle nodes in one
subject-hierarchy folder, shown and hidden together, and tied to the landmarks: an observer of the landmarks node
moves them as soon as a point moves (and hides one whose landmark goes missing), then tells the panel, which
recomputes its table.

MRML only. What is drawn comes from the engine (`api.tracing`): 2 points for a line, 3 for an angle (vertex in the
middle), each a landmark name or a tuple of names for their midpoint. The tracing's nodes are locked: they follow
the landmarks and are not moved themselves.
"""
from __future__ import annotations

import numpy as np

from .observers import PointsObserver

TRACING_ATTRIBUTE = "MedSapiens.TracingOf"  # on each tracing node: the ID of the landmarks node it follows


def _names(spec) -> tuple:
    return tuple(spec) if isinstance(spec, tuple) else (spec,)


def itemName(item) -> str:
    """'S-N-A' for an angle, 'Po-Or' for a line, '(U6+L6)-(UIT+LIT)' where a point is a midpoint."""
    return "-".join(s if isinstance(s, str) else f"({'+'.join(s)})" for s in item)


class Tracing:
    """The line and angle nodes of `drawn` over `markupsNode` (items naming labels the node lacks are left out)."""

    def __init__(self, markupsNode, drawn, name: str):
        import slicer

        self.markupsNode = markupsNode
        self.onChanged = None  # called after the tracing followed a change of the landmarks
        scene = markupsNode.GetScene()
        self._hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        self.folder = self._hierarchy.CreateFolderItem(self._hierarchy.GetSceneItemID(),
                                                       f"{markupsNode.GetName()} {name} tracing")
        labels = set(self._labels())
        self.items = []  # (item, node)
        for item in dict.fromkeys(drawn):
            if not all(n in labels for spec in item for n in _names(spec)):
                continue
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode" if len(item) == 2 else "vtkMRMLMarkupsAngleNode",
                                           itemName(item))
            node.CreateDefaultDisplayNodes()
            node.SetLocked(True)
            node.SetAttribute(TRACING_ATTRIBUTE, markupsNode.GetID())
            self._intoFolder(node)
            self.items.append((item, node))
        self._visible = True
        self._observer = PointsObserver(markupsNode, self._follow)
        self.update()

    def _intoFolder(self, node) -> None:
        """Slicer's subject hierarchy logic gives every new node an item; a bare MRML scene (slicer-core) does not."""
        item = self._hierarchy.GetItemByDataNode(node)
        if item:
            self._hierarchy.SetItemParent(item, self.folder)
        else:
            self._hierarchy.CreateItem(self.folder, node)

    def _labels(self) -> list[str]:
        node = self.markupsNode
        return [node.GetNthControlPointLabel(i).strip() for i in range(node.GetNumberOfControlPoints())]

    def _positions(self) -> dict:
        """label -> world RAS of the landmarks node's defined points."""
        node, out = self.markupsNode, {}
        for i, label in enumerate(self._labels()):
            if node.GetNthControlPointPositionStatus(i) == node.PositionDefined:
                ras = np.zeros(3)
                node.GetNthControlPointPositionWorld(i, ras)
                out[label] = ras
        return out

    def update(self) -> None:
        """Put every line and angle where its landmarks are now; hide those with a landmark missing."""
        positions = self._positions()
        for item, node in self.items:
            names = [_names(spec) for spec in item]
            complete = all(n in positions for spec in names for n in spec)
            if complete:
                points = [np.mean([positions[n] for n in spec], axis=0) for spec in names]
                if node.GetNumberOfControlPoints() != len(points):
                    node.RemoveAllControlPoints()
                    for p in points:
                        node.AddControlPointWorld(*p)
                else:
                    for i, p in enumerate(points):
                        node.SetNthControlPointPositionWorld(i, *p)
            node.GetDisplayNode().SetVisibility(self._visible and complete)

    def setVisible(self, visible: bool) -> None:
        """Show or hide the whole tracing (a line whose landmark is missing stays hidden)."""
        self._visible = bool(visible)
        self.update()

    def _follow(self) -> None:
        self.update()
        if self.onChanged:
            self.onChanged()

    def remove(self) -> None:
        """Stop following the landmarks and take the tracing's nodes and folder out of the scene."""
        self._observer.stop()
        scene = self.markupsNode.GetScene()
        for _, node in self.items:
            if scene is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        self.items = []
        self._hierarchy.RemoveItem(self.folder)
