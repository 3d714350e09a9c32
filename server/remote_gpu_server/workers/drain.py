"""Draining: a slot goes back to the pool only when a killed worker really let go of it.

GPU memory is freed only when every process that holds a context on the GPU
has exited, and a process stuck in the driver (a hung kernel, a C extension
in uninterruptible sleep) can outlive SIGKILL. After every worker's kill the
pool calls :meth:`Drainer.settle` with the pids the stop ladder found
(:mod:`.ladder`): it asks, every :data:`SETTLE_POLL` seconds, whether any of
them still holds the slot (on a GPU: NVML's compute processes; on a CPU
slot: the process still exists and is no zombie; see
:meth:`.readings.Readings.holders`). While it asks, the slot is still held
by the lease that is ending, so nobody gets it.

If some still hold it after ``deadline`` seconds, the slot is **draining**,
as Slurm drains a node whose processes will not die: ``on_change(slot,
True)`` is called (the server holds it out of the scheduler with
``set_healthy(slot, False, source="draining")``), :meth:`Drainer.draining`
says since when and which pids hold how much (for ``/api/status``,
``/metrics``, ``rgpu status`` and the sidebar), and the slot is looked at
every ``period`` seconds until the last of them lets go; then
``on_change(slot, False)`` puts it back.

``check(slot)``, when given, runs after a worker's processes are gone when
its GPU reported an Xid error while it ran (see :mod:`.xid`): the GPU is
read again before anyone leases it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from remote_gpu_core.ids import SlotId

from ..gpus.readings import ProcessReading

__all__ = ["Drainer", "Draining", "HolderReader", "SETTLE_POLL"]

log = logging.getLogger("remote_gpu_server")

#: Which of some pids still hold a slot: (slot, pids) → their readings.
HolderReader = Callable[[SlotId, frozenset[int]], Awaitable[tuple[ProcessReading, ...]]]
#: How often the slots are looked at until the deadline.
SETTLE_POLL = 0.1


@dataclasses.dataclass(frozen=True)
class Draining:
    """A slot held out because processes of killed workers still hold it."""

    slot: SlotId
    since: float  # time.time()
    processes: tuple[ProcessReading, ...]

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self.processes)

    @property
    def problem(self) -> str:
        """One line for the log and ``/api/status``'s ``problem``, naming the pids."""
        return self.describe(pids=True)

    def describe(self, pids: bool) -> str:
        """:attr:`problem`, with the pids only if ``pids`` (an admin asks)."""
        ordered = sorted(self.processes, key=lambda p: p.pid)
        if pids:
            held = ", ".join(f"{p.pid}" + (f" ({p.memory / 2**20:.0f} MiB)" if p.memory else "")
                             for p in ordered)
            return (f"draining: process(es) {held} of a stopped worker still hold it; "
                    "not leased until they exit")
        memory = sum(p.memory for p in ordered)
        return (f"draining: {len(ordered)} process(es) of a stopped worker still hold it"
                + (f" ({memory / 2**20:.0f} MiB)" if memory else "") + "; not leased until they exit")

    def as_json(self, pids: bool = True) -> dict[str, object]:
        """The ``draining`` object of ``GET /api/status``; without ``pids`` (not an
        admin), ``pids`` is empty and each process's pid None."""
        return {"since": self.since, "pids": self.pids if pids else [],
                "processes": [{"pid": p.pid if pids else None, "memory": p.memory} for p in self.processes]}


class Drainer:
    """See the module docstring. Call :meth:`close` at the end."""

    def __init__(self, holders: HolderReader, on_change: Callable[[SlotId, bool], None], *,
                 deadline: float, period: float,
                 check: Callable[[SlotId], Awaitable[None]] | None = None) -> None:
        self._holders = holders
        self._on_change = on_change
        self._check = check
        self.deadline = deadline
        self.period = period
        self._draining: dict[SlotId, Draining] = {}
        self._pids: dict[SlotId, set[int]] = {}
        self._tasks: dict[SlotId, asyncio.Task[None]] = {}

    def draining(self, slot: SlotId) -> Draining | None:
        return self._draining.get(slot)

    def all(self) -> list[Draining]:
        return list(self._draining.values())

    async def _read(self, slot: SlotId, pids: frozenset[int]) -> tuple[ProcessReading, ...]:
        try:
            return await self._holders(slot, pids)
        except Exception:
            log.exception("slot %s: could not read which processes hold it", slot)
            return ()

    async def settle(self, slots: Iterable[SlotId], pids: frozenset[int],
                     check: bool = False) -> frozenset[SlotId]:
        """Wait until none of ``pids`` holds any of ``slots``, at most the deadline.

        Returns the slots still held then, which are draining now (see the
        module docstring). ``check``: read the slots' GPUs again once they are
        free (an Xid error happened under the worker).
        """
        slots = list(slots)
        waiting = list(slots)
        deadline = time.monotonic() + self.deadline
        held: dict[SlotId, tuple[ProcessReading, ...]] = {}
        while waiting and pids:
            held = {slot: found for slot in waiting if (found := await self._read(slot, pids))}
            waiting = list(held)
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(SETTLE_POLL)
        if check and self._check is not None:
            for slot in slots:
                if slot not in held:
                    await self._check(slot)
        for slot, found in held.items():
            self._hold(slot, pids, found)
        return frozenset(held)

    def _hold(self, slot: SlotId, pids: frozenset[int], found: tuple[ProcessReading, ...]) -> None:
        known = self._pids.setdefault(slot, set())
        known.update(pids)
        before = self._draining.get(slot)
        self._draining[slot] = Draining(slot, before.since if before else time.time(), found)
        if before is not None:
            return
        log.error("slot %s: %s", slot, self._draining[slot].problem)
        self._on_change(slot, True)
        self._tasks[slot] = asyncio.get_running_loop().create_task(self._watch(slot))

    async def _watch(self, slot: SlotId) -> None:
        while True:
            await asyncio.sleep(self.period)
            found = await self._read(slot, frozenset(self._pids.get(slot, ())))
            if found:
                self._draining[slot] = dataclasses.replace(self._draining[slot], processes=found)
                continue
            log.warning("slot %s is drained: the stopped worker's processes let go of it", slot)
            self._draining.pop(slot, None)
            self._pids.pop(slot, None)
            self._tasks.pop(slot, None)
            if self._check is not None:
                await self._check(slot)
            self._on_change(slot, False)
            return

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
