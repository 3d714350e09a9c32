"""The last few minutes of every slot's readings, for the sidebar's plots.

:class:`ReadingHistory` keeps, per slot, the time, utilization and memory in
use of each reading younger than ``window`` seconds (at the default period
of 3 s and window of 5 minutes, about 100 points a slot). Readings are
added from a worker thread and read from the event loop, so each call
holds a lock for its few list operations.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterable
from typing import Any

from remote_gpu_core.ids import SlotId

__all__ = ["DEFAULT_WINDOW", "HistoryPoint", "ReadingHistory"]

#: Seconds of readings kept per slot.
DEFAULT_WINDOW = 300.0


@dataclasses.dataclass(frozen=True)
class HistoryPoint:
    """One reading of one slot: ``time`` in seconds since the epoch; None where
    the slot could not be read (a gap in the plot)."""

    time: float
    utilization: float | None
    memory_used: int | None


class ReadingHistory:
    """Per-slot readings of the last ``window`` seconds, oldest first."""

    def __init__(self, slots: Iterable[SlotId], window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._points: dict[SlotId, collections.deque[HistoryPoint]] = {
            slot: collections.deque() for slot in slots}

    def add(self, slot: SlotId, point: HistoryPoint) -> None:
        """Append ``point`` and forget what is older than the window before it.

        A point older than the slot's last one (a clock set back) starts the
        slot's history afresh, so times always increase.
        """
        with self._lock:
            points = self._points.setdefault(slot, collections.deque())
            if points and point.time < points[-1].time:
                points.clear()
            points.append(point)
            horizon = point.time - self.window
            while points and points[0].time < horizon:
                points.popleft()

    def points(self, slot: SlotId) -> list[HistoryPoint]:
        with self._lock:
            return list(self._points.get(slot, ()))

    def as_json(self, slot: SlotId) -> dict[str, Any]:
        """The ``history`` object of a slot in ``GET /api/status``: parallel
        lists ``time``, ``utilization`` and ``memory_used``, oldest first, and
        the ``window`` they span at most, in seconds."""
        points = self.points(slot)
        return {
            "window": self.window,
            "time": [round(p.time, 1) for p in points],
            "utilization": [p.utilization for p in points],
            "memory_used": [p.memory_used for p in points],
        }
