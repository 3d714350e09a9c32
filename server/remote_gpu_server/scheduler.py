"""Who gets the next free slots: a first-come queue, as pure logic.

No I/O and no clock of its own: the server calls :meth:`FifoScheduler.submit`
when a lease is asked for, :meth:`FifoScheduler.release` when slots come
back and :meth:`FifoScheduler.cancel` when a waiting client goes away; each
returns the grants that became possible. :meth:`FifoScheduler.positions`
says where every waiting request stands, so the server can tell each client
when its position changes.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from remote_gpu_kernel.typing import SlotId

__all__ = ["FifoScheduler", "Grant", "LeaseRequestEntry"]


@dataclasses.dataclass(frozen=True)
class LeaseRequestEntry:
    """A waiting lease request; ``key`` is unique per server."""

    key: int
    user: str
    gpus: int
    submitted: float


@dataclasses.dataclass(frozen=True)
class Grant:
    request: LeaseRequestEntry
    slots: tuple[SlotId, ...]


class FifoScheduler:
    """First come, first served; a request waits until enough slots are free.

    A request for more slots than are free blocks the ones behind it (no
    overtaking), so a large request is not starved by small ones.
    """

    def __init__(self, slots: list[SlotId]) -> None:
        self._all = list(slots)
        self._free = list(slots)
        self._waiting: OrderedDict[int, LeaseRequestEntry] = OrderedDict()

    @property
    def free(self) -> list[SlotId]:
        return list(self._free)

    @property
    def waiting(self) -> list[LeaseRequestEntry]:
        return list(self._waiting.values())

    def submit(self, request: LeaseRequestEntry) -> list[Grant]:
        if request.gpus < 1:
            raise ValueError("a lease needs at least one slot")
        if request.gpus > len(self._all):
            raise ValueError(
                f"this server has {len(self._all)} slot(s); a lease of {request.gpus} can never be granted"
            )
        self._waiting[request.key] = request
        return self._grant()

    def release(self, slots: list[SlotId]) -> list[Grant]:
        for slot in slots:
            if slot not in self._all or slot in self._free:
                raise ValueError(f"slot {slot} is not leased")
            self._free.append(slot)
        self._free.sort(key=self._all.index)
        return self._grant()

    def cancel(self, key: int) -> list[Grant]:
        self._waiting.pop(key, None)
        return self._grant()

    def positions(self) -> dict[int, int]:
        """Position (1 = next) of every waiting request, by key."""
        return {key: i + 1 for i, key in enumerate(self._waiting)}

    def _grant(self) -> list[Grant]:
        grants = []
        while self._waiting:
            first = next(iter(self._waiting.values()))
            if first.gpus > len(self._free):
                break
            taken, self._free = self._free[: first.gpus], self._free[first.gpus :]
            del self._waiting[first.key]
            grants.append(Grant(first, tuple(taken)))
        return grants
