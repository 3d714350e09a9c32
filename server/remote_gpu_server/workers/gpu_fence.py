"""The GPU check: a worker found on a GPU it did not lease is stopped, and told why.

The device files are the fence (a worker can open its own GPUs' only, see
:mod:`.devices`); this check stands behind it, and holds where the files do
not (a worker that is not isolated, a hole not thought of). After every
reading (:mod:`.readings`) each process NVML lists on a GPU carries the
worker it belongs to, where it belongs to one (:mod:`.owners`).
:func:`trespasses` finds those on a GPU that is not one of their worker's:
its slots' GPUs here, or on a Ray node the GPUs Ray gave it.
:class:`GpuFence` stops each such worker at once, every process it started
(its launcher's ``halt``), with a cause of death its user sees: "it used GPU
3 (slot gpu3), which this session did not lease"; the server's log says it
too. The session goes on with a fresh worker on its own slots, as after any
death. A process that belongs to no worker is not this server's to stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterable

from remote_gpu_core.ids import SlotId

from ..gpus.readings import SlotReading
from ..gpus.slots import Slot
from .worker import Worker

__all__ = ["GpuFence", "Trespass", "trespasses"]

log = logging.getLogger("remote_gpu_server")


@dataclasses.dataclass(frozen=True)
class Trespass:
    """Process ``pid`` of ``worker`` holds ``memory`` bytes on GPU ``device`` of
    ``slot``'s node, which its lease does not hold."""

    worker: Worker
    slot: Slot
    device: int
    pid: int
    memory: int

    @property
    def cause(self) -> str:
        """The cause of death its user sees."""
        if self.slot.node:  # Ray chose the GPUs there: a slot's name does not say which
            return f"it used GPU {self.device} of node {self.worker.node}, which this session did not lease"
        return f"it used GPU {self.device} (slot {self.slot.id}), which this session did not lease"


def _gpus_of(worker: Worker) -> set[int] | None:
    """The GPUs (indices on its node) a worker was given: Ray's choice on a node (None
    where Ray did not say it by index: then nobody can tell), else its slots'."""
    devices = getattr(worker.process, "devices", None)
    if devices:
        return {int(d) for d in devices}
    if any(s.node for s in worker.slots):
        return None
    return {s.index for s in worker.slots if s.kind == "gpu"}


def trespasses(slots: Iterable[Slot], reading: Callable[[SlotId], SlotReading],
               workers: Iterable[Worker]) -> list[Trespass]:
    """The processes on a GPU of ``slots`` that belong to a worker not given that GPU."""
    by_root = {(w.slots[0].node, w.pid): w for w in workers if w.alive and w.pid is not None and w.slots}
    found: dict[tuple[str, int], Trespass] = {}
    for slot in slots:
        if slot.kind != "gpu":
            continue
        latest = reading(slot.id)
        if latest.device is None:
            continue
        for process in latest.processes:
            worker = by_root.get((slot.node, process.owner)) if process.owner is not None else None
            given = _gpus_of(worker) if worker is not None else None
            if worker is None or given is None or latest.device in given:
                continue
            found.setdefault((slot.node, process.pid),
                             Trespass(worker, slot, latest.device, process.pid, process.memory))
    return list(found.values())


class GpuFence:
    """Call :meth:`check` after each reading (on the event loop); :meth:`close` at the end.

    ``slots()`` lists the slots, ``reading(slot)`` gives a slot's latest
    reading and ``workers()`` the live workers.
    """

    def __init__(self, slots: Callable[[], Iterable[Slot]], reading: Callable[[SlotId], SlotReading],
                 workers: Callable[[], Iterable[Worker]]) -> None:
        self._slots = slots
        self._reading = reading
        self._workers = workers
        self._halted: weakref.WeakSet[Worker] = weakref.WeakSet()  # each is stopped once
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self) -> list[Trespass]:
        """Stop every worker found on a GPU it was not given; returns what was found."""
        found = trespasses(self._slots(), self._reading, self._workers())
        loop = asyncio.get_running_loop()
        for trespass in found:
            worker = trespass.worker
            if worker in self._halted:
                continue
            self._halted.add(worker)
            user = f"{worker.tenant.user}'s" if worker.tenant is not None else "a warm worker"
            log.error("worker %s (%s) on %s: its process %d holds %d MiB on GPU %d%s, which its lease does "
                      "not hold: stopping it", worker.name, user, "+".join(s.id for s in worker.slots),
                      trespass.pid, trespass.memory >> 20, trespass.device,
                      f" of node {worker.node}" if trespass.slot.node else "")
            task = loop.create_task(self._halt(worker, trespass.cause))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return found

    async def _halt(self, worker: Worker, cause: str) -> None:
        halt = getattr(worker.process, "halt", None)
        try:
            if halt is not None:
                await halt(cause)
                return
        except Exception:
            log.exception("worker %s: stopping it through its launcher failed; killing it", worker.name)
        # A launcher that cannot say why: the worker is killed all the same.
        await worker.kill(f"the worker was stopped: {cause}")

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
