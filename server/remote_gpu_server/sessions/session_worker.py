"""The worker a session holds: across its deaths and restarts, and none while parked.

A session has one worker at a time. When it dies, or the session restarts
it (a timeout, a CUDA error, an interrupt it ignored, a restart request),
the pool starts a fresh one in its place (once per worker, however many
causes meet), and the session's next request waits for it; the fresh
worker inherits the comms of the old one as dead. A worker whose node went
away cannot be replaced there: the session is told it is lost instead. A
parked session holds no worker until it resumes with a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.ids import SlotId

from ..environments import DEFAULT_ENVIRONMENT
from ..isolation.tenant import Tenant
from ..workers.comms import CommTable
from ..workers.worker import IopubHandler, Worker

__all__ = ["SessionWorker", "WorkerSource"]


class WorkerSource(Protocol):
    """Where a session's workers come from and go to (the warm pool)."""

    async def take(self, slot_ids: list[SlotId], user: str = "", tenant: Tenant | None = None,
                   environment: str = DEFAULT_ENVIRONMENT) -> Worker: ...

    def unknown_environment(self, name: str) -> str | None:
        """Why a lease cannot ask for environment ``name`` here, else None."""

    def cold_start(self, slot_ids: Sequence[SlotId], environment: str) -> str | None:
        """What a lease of ``slot_ids`` in ``environment`` is told when it waits for a worker to start."""

    async def replace(self, worker: Worker, reason: str | None = None) -> Worker: ...

    async def recycle(self, worker: Worker, reason: str | None = None, keep_folder: bool = False) -> None: ...


class SessionWorker:
    """One session's worker; see the module docstring.

    ``on_unrouted`` gets what each of its workers publishes under no
    request; ``on_lost`` is told, with why, that a worker's node went away.
    Call :meth:`release` when the session ends, then :meth:`recycle`.
    """

    def __init__(self, pool: WorkerSource, worker: Worker | None, *, on_unrouted: IopubHandler,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self._pool = pool
        self._worker = worker
        self._on_unrouted = on_unrouted
        self._on_lost = on_lost
        self._language_info = dict(worker.language_info) if worker is not None else {}
        self._fingerprint = dict(worker.fingerprint) if worker is not None else {}
        self._replacing: asyncio.Task[Worker] | None = None
        self._replaced: Worker | None = None  # the worker being replaced, once
        self._notice: str | None = None
        # The comms of the worker a parked session had: dead once it is restored.
        self._parked_comms: CommTable | None = None
        self._watch: asyncio.Task[None] | None = None
        #: The session was released: nothing restarts its worker any more.
        self.released = False
        if worker is not None:
            self._hold(worker)

    @property
    def current(self) -> Worker | None:
        """The worker now (one being replaced still counts until its successor is
        there); None while the session is parked."""
        return self._worker

    @property
    def language_info(self) -> dict[str, Any]:
        return self._worker.language_info if self._worker is not None else self._language_info

    @property
    def fingerprint(self) -> dict[str, str]:
        """Its worker's versions (see :mod:`remote_gpu_core.fingerprint`), the last one's while parked."""
        return self._worker.fingerprint if self._worker is not None else self._fingerprint

    def take_notice(self) -> str | None:
        """What the session's next request is told, once, about its worker (it was
        restarted, and why), if anything."""
        notice, self._notice = self._notice, None
        return notice

    def _hold(self, worker: Worker) -> None:
        worker.on_unrouted = self._on_unrouted
        self._watch = asyncio.get_running_loop().create_task(self._watch_worker(worker))

    async def _watch_worker(self, worker: Worker) -> None:
        await worker.died.wait()
        if self.released or worker is not self._worker:
            return
        if worker.lost_node and self._on_lost is not None:
            # Its slots went with the node: no fresh worker can start there.
            self._on_lost(f"node {worker.node} went away ({worker.exit_description})")
            return
        self.restart(worker, notice=(
            f"The remote worker died: {worker.exit_description}. This session was restarted "
            "with a fresh worker and its variables are gone."
        ))

    def restart(self, old: Worker, reason: str | None = None, *, notice: str | None = None) -> None:
        """Start a fresh worker in place of ``old``; requests wait for it. The old
        one's requests fail saying ``reason``; ``notice`` is what the next
        request is told.

        Once per worker: a worker that dies while it is being killed for a
        timeout is replaced once, not twice.
        """
        if notice is not None:
            self._notice = notice
        if self._replaced is old:
            return
        self._replaced = old
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()  # the old worker's death is no news any more
        self._replacing = asyncio.get_running_loop().create_task(self._pool.replace(old, reason))

    async def replaced(self) -> None:
        """Return once the fresh worker a restart asked for is there (at once if none was asked for)."""
        if self._replacing is not None:
            await asyncio.shield(self._replacing)

    async def get(self) -> Worker:
        """The worker for a request: the fresh one once a restart is done.
        Raises WorkerDied while the session is parked."""
        if self._replacing is not None:
            old = self._worker
            try:
                self._worker = await self._replacing
            finally:
                self._replacing = None
            if old is not None:
                self._worker.comms.inherit(old.comms, f"died ({old.exit_description or 'it was restarted'})")
            self._hold(self._worker)
        if self._worker is None:
            raise WorkerDied("this session is parked and was not resumed", code="worker_died")
        return self._worker

    def park(self) -> Worker:
        """The namespace is saved: hand over the worker (to be killed) and hold none
        until :meth:`unpark`."""
        worker = self._worker
        assert worker is not None and self._replacing is None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._language_info = dict(worker.language_info)
        self._fingerprint = dict(worker.fingerprint)
        self._parked_comms = worker.comms
        self._worker = None
        return worker

    def unpark(self, worker: Worker) -> None:
        """Hold ``worker`` again, a parked session's new one."""
        self._worker = worker
        self._language_info = dict(worker.language_info)
        self._fingerprint = dict(worker.fingerprint)
        if self._parked_comms is not None:
            worker.comms.inherit(self._parked_comms, "was given back when the session was parked")
            self._parked_comms = None
        self._hold(worker)

    def release(self) -> None:
        """The session ended: its worker's death is no news any more."""
        self.released = True
        if self._watch is not None:
            self._watch.cancel()

    async def recycle(self, reason: str) -> None:
        """Give the worker (or the fresh one a restart is starting) back to the pool
        to be killed; a parked session's holds none."""
        worker = self._worker
        if self._replacing is not None:
            try:
                worker = await self._replacing
            except Exception:
                pass
        if worker is not None:
            await self._pool.recycle(worker, reason)
