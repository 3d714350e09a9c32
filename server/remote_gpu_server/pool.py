"""The warm pool: one started worker waiting on every free slot.

A lease takes the slot's warm worker (already started, torch imported), so
it does not pay a cold start. A worker serves one session and is never
reused: :meth:`Pool.recycle` kills it and warms a fresh one in its place. A
lease of several slots starts a worker pinned to all of them (cold), and
the single-slot workers it displaces are recycled.

Isolation: a worker taken for a user enters that user's identity (see
:meth:`.worker.Worker.enter`) before :meth:`Pool.take` returns it; a
replacement keeps its predecessor's user and session folder; the folder goes
when the lease's worker is recycled.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from remote_gpu_kernel.typing import SlotId

from .gpus import Slot
from .isolation import Isolation, Tenant
from .worker import Worker

__all__ = ["Pool"]

log = logging.getLogger("remote_gpu_server")


class Pool:
    """Call :meth:`start` first and :meth:`close` at the end."""

    def __init__(self, slots: list[Slot], startup_timeout: float = 120,
                 isolation: Isolation | None = None) -> None:
        self.slots = {s.id: s for s in slots}
        self.startup_timeout = startup_timeout
        self.isolation = isolation or Isolation.unconfined()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="rgpu-"))  # mode 0700
        self._warm: dict[SlotId, asyncio.Task[Worker]] = {}
        self._workers: set[Worker] = set()
        self._closing = False

    def start(self) -> None:
        for slot_id in self.slots:
            self._warm_up(slot_id)

    def _warm_up(self, slot_id: SlotId) -> None:
        if self._closing:
            return
        worker = self._worker([self.slots[slot_id]])
        task = asyncio.get_running_loop().create_task(self._start(worker))
        self._warm[slot_id] = task

    def _worker(self, slots: list[Slot], tenant: Tenant | None = None) -> Worker:
        return Worker(slots, self.runtime_dir, self.startup_timeout, self.isolation, tenant)

    async def _enter(self, worker: Worker, user: str, new_lease: bool = True) -> Worker:
        """``worker``, now ``user``'s (isolation hook); killed if it could not be."""
        try:
            await worker.enter(user)
        except BaseException:
            await worker.kill()
            if new_lease:
                self.isolation.release(worker.tenant)
            raise
        return worker

    async def _start(self, worker: Worker) -> Worker:
        self._workers.add(worker)
        try:
            await worker.start()
        except BaseException:
            await worker.kill()
            raise
        return worker

    def worker_pids(self, slot_id: SlotId) -> list[int]:
        """Process ids of the live workers on ``slot_id`` (warm or leased)."""
        # A worker still starting has no pid yet; a dead or killed one is dropped.
        self._workers = {w for w in self._workers if w.alive or (w.pid is None and not w.died.is_set())}
        return [w.pid for w in self._workers
                if w.alive and w.pid is not None and any(s.id == slot_id for s in w.slots)]

    async def wait_ready(self) -> None:
        """Wait until every slot's warm worker has started (for tests, benches)."""
        await asyncio.gather(*self._warm.values(), return_exceptions=True)

    def is_warm(self, slot_id: SlotId) -> bool:
        task = self._warm.get(slot_id)
        return task is not None and task.done() and task.exception() is None

    async def take(self, slot_ids: list[SlotId], user: str = "") -> Worker:
        """A started worker pinned to ``slot_ids``, made ``user``'s; the slots'
        warm workers go."""
        if len(slot_ids) == 1:
            slot_id = slot_ids[0]
            task = self._warm.pop(slot_id, None)
            if task is not None:
                try:
                    worker = await task
                    if worker.alive:
                        return await self._enter(worker, user)
                    await worker.kill()
                except Exception:
                    log.exception("warm worker for %s failed to start; starting another", slot_id)
            return await self._enter(await self._start(self._worker([self.slots[slot_id]])), user)
        for slot_id in slot_ids:
            task = self._warm.pop(slot_id, None)
            if task is not None:
                asyncio.get_running_loop().create_task(self._discard(task))
        return await self._enter(await self._start(self._worker([self.slots[s] for s in slot_ids])), user)

    async def _discard(self, task: asyncio.Task[Worker]) -> None:
        try:
            worker = await task
        except Exception:
            return
        await worker.kill()

    async def replace(self, worker: Worker) -> Worker:
        """Kill ``worker`` and start a fresh one on the same slots (its session
        goes on, with the same user and session folder)."""
        await worker.kill()
        tenant = worker.tenant
        fresh = await self._start(self._worker(worker.slots, tenant))
        return await self._enter(fresh, tenant.user, new_lease=False) if tenant is not None else fresh

    async def recycle(self, worker: Worker) -> None:
        """Kill ``worker`` (its whole process group), end its lease's session
        folder, and warm fresh ones on its slots."""
        await worker.kill()
        self.isolation.release(worker.tenant)
        for slot in worker.slots:
            self._warm_up(slot.id)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._warm.values())
        self._warm.clear()
        for task in tasks:
            await self._discard(task)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
