"""Slots and the inventory of them that a server leases.

A :class:`Slot` is one leasable unit: a GPU, or a CPU slot where there is
none. The :class:`SlotInventory` holds every slot the server knows, with
the node each is on; a discovery fills it: this host's NVML
(:func:`~.gpus.discover_slots`), or the Ray cluster's nodes
(:mod:`~remote_gpu_server.cluster.launcher`). Parts that follow the slots (the scheduler, the
warm pool, the readings) are told when slots join and when a node goes
away or comes back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from remote_gpu_core.ids import SlotId

__all__ = ["Slot", "SlotInventory", "cuda_visible_devices"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One leasable unit: a GPU, or a CPU slot where there is none."""

    id: SlotId
    kind: str  # "gpu" or "cpu"
    #: Its index on its node (the NVML index of a GPU).
    index: int
    name: str
    uuid: str = ""
    #: The node it is on; "" for this host.
    node: str = ""
    #: The pool a cluster node puts it in (its Ray resource ``pool:NAME``); None: the default.
    pool: str | None = None

    @property
    def cuda_device(self) -> str:
        """This slot's entry in ``CUDA_VISIBLE_DEVICES`` ("" for a CPU slot)."""
        if self.kind != "gpu":
            return ""
        return self.uuid or str(self.index)


def cuda_visible_devices(slots: list[Slot]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker leased ``slots``.

    A CPU-only lease gets the empty string, which hides every GPU.
    """
    return ",".join(s.cuda_device for s in slots if s.kind == "gpu")



class SlotInventory:
    """The slots, in the order they were added.

    ``on_added(slots)`` is called with slots that join after the start;
    ``on_node(node, up)`` when a node goes away (``up`` false: its slots must
    not be leased) or comes back.
    """

    def __init__(self, slots: Iterable[Slot] = ()) -> None:
        self._slots: dict[SlotId, Slot] = {}
        self._down: set[str] = set()
        self.on_added: list[Callable[[list[Slot]], None]] = []
        self.on_node: list[Callable[[str, bool], None]] = []
        self.add(slots)

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._slots.values()))

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, slot_id: SlotId) -> Slot:
        return self._slots[slot_id]

    @property
    def ids(self) -> list[SlotId]:
        return list(self._slots)

    def on(self, node: str) -> list[Slot]:
        return [s for s in self._slots.values() if s.node == node]

    def is_down(self, node: str) -> bool:
        return node in self._down

    def add(self, slots: Iterable[Slot]) -> list[Slot]:
        """Add the slots not known yet; returns them (listeners are told)."""
        new = [s for s in slots if s.id not in self._slots]
        for slot in new:
            self._slots[slot.id] = slot
        if new:
            for listener in self.on_added:
                listener(new)
        return new

    def node_down(self, node: str) -> None:
        if node not in self._down:
            self._down.add(node)
            for listener in self.on_node:
                listener(node, False)

    def node_up(self, node: str) -> None:
        if node in self._down:
            self._down.discard(node)
            for listener in self.on_node:
                listener(node, True)
