"""Watching a markups node's points: one call whenever any of them is placed, moved, skipped (marked missing),
unplaced, added or removed. The tracing follows the landmarks with it, the panel the points being annotated and
the result under review. MRML only."""
from __future__ import annotations

POINT_EVENTS = ("PointModifiedEvent", "PointPositionDefinedEvent", "PointPositionUndefinedEvent",
                "PointPositionMissingEvent", "PointPositionNonMissingEvent", "PointAddedEvent", "PointRemovedEvent")


class PointsObserver:
    """Calls `callback()` after each change of `node`'s points, until `stop()`."""

    def __init__(self, node, callback):
        self.node = node
        self.callback = callback
        self._tags = [node.AddObserver(getattr(node, event), self._changed) for event in POINT_EVENTS]

    def _changed(self, caller=None, event=None) -> None:
        self.callback()

    def stop(self) -> None:
        for tag in self._tags:
            self.node.RemoveObserver(tag)
        self._tags = []
