"""How a running cell is stopped: the stop ladder's session side.

:class:`CellStopping` is the part of :class:`~.session.Session` that stops
cells (kept here so each module has one job). The rungs:

1. An interrupt sends SIGINT (held until the cell's code has begun, see
   :meth:`CellStopping._deliver_interrupt`).
2. A cell still running ``interrupt_notice`` seconds later is told, in one
   line (a :class:`~remote_gpu_core.protocol.messages.Notice` to the cell),
   that it ignores interrupts and that the next interrupt restarts its worker.
3. That next interrupt, a cancel over HTTP (``kill_grace`` seconds after its
   own interrupt), a restart request, and a cell past its timeout
   (``kill_grace`` seconds after its interrupt) replace the worker: the pool
   kills it with the ladder of :mod:`.ladder` (SIGTERM to every process it
   started, SIGKILL after the grace) and starts a fresh one in its place.
   The cell fails with ``WorkerDied`` saying why; its job ends ``cancelled``
   (``timed_out`` for a timeout) with that reason.

The server itself stops a cell for what it did (its user's disk past the
limit, see :mod:`.disk_watch`) with the same rungs, through
:meth:`CellStopping.fail_cell`: the cell then fails with the server's
error and reason instead of ``KeyboardInterrupt``, and its job ends
``failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.ids import JobId

from ..workers.worker import Worker

if TYPE_CHECKING:
    from .session import SessionContext

__all__ = ["HELD_INTERRUPT_DELAYS", "INTERRUPT_NOTICE", "CellStopping", "RunningCell"]

log = logging.getLogger("remote_gpu_server")

#: When a held interrupt is sent, in seconds after the previous try (see _deliver_interrupt).
HELD_INTERRUPT_DELAYS = (0.1, 2.0, 3.0)
#: After an interrupt, how long a cell may still run before it is said to ignore interrupts.
INTERRUPT_NOTICE = 3.0


class _Sender(Protocol):
    async def send(self, message: m.Message) -> None: ...


@dataclasses.dataclass
class RunningCell:
    """The running cell: where its answers go, and how far the stop ladder got."""

    conn: _Sender
    req: int
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: It was told that it ignores interrupts: the next one replaces the worker.
    ignoring: bool = False
    #: ``(job state, reason)`` once the ladder stops it.
    stopping: tuple[str, str] | None = None
    #: A notice is scheduled for it (one per cell).
    noticing: bool = False
    #: ``(ename, reason)`` once the server stops it for what it did (fail_cell).
    failure: tuple[str, str] | None = None


class CellStopping:
    """The stopping half of a session; the session provides what is declared here."""

    id: str
    context: SessionContext
    released: str | None
    _worker: Worker | None
    resuming: asyncio.Future[Any] | None
    _running: RunningCell | None
    _running_job: JobId | None
    _replacing: asyncio.Task[Worker] | None
    _notice: str | None
    _interrupted: bool
    _started: bool
    _background: set[asyncio.Task[None]]

    def _restart(self, old: Worker, reason: str | None = None) -> None:
        raise NotImplementedError

    async def _await_cell(self, task: asyncio.Task[dict[str, Any]], worker: Worker,
                          timeout: float | None) -> dict[str, Any]:
        """The cell's reply; past ``timeout``: interrupt, then kill and restart."""
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return task.result()
        await worker.interrupt()
        done, _ = await asyncio.wait({task}, timeout=self.context.kill_grace)
        if done and not isinstance(task.exception(), WorkerDied):
            raise TimeoutError(f"the cell ran past its timeout of {timeout:g} s and was interrupted")
        self._notice = (
            f"The previous cell ran past its timeout of {timeout:g} s and did not stop when "
            "interrupted: its worker was restarted and the session's variables are gone."
        )
        self._restart(worker, f"the cell ran past its timeout of {timeout:g} s and did not stop "
                              "when interrupted; its worker was stopped")
        if not task.done():
            task.cancel()
        raise TimeoutError(
            f"the cell ran past its timeout of {timeout:g} s and did not stop when interrupted; "
            "its worker was killed"
        )

    async def interrupt(self, restart: bool = False) -> None:
        """Interrupt the running cell; the stop ladder's first rungs (module docstring).

        ipykernel ignores SIGINT between requests, so an interrupt that
        arrives before the cell's code has begun is held and delivered once
        the worker announces the code (``execute_input``); see
        :meth:`_deliver_interrupt`. ``restart``: restart the worker now.
        """
        if self.resuming is not None:  # waiting for a lease to resume a parked session: stop waiting
            self.resuming.cancel()
        if restart:
            await self.restart("the client asked for a restart")
            return
        cell = self._running
        if cell is None:
            return
        if cell.ignoring:
            await self.stop_cell("cancelled", "interrupted twice: the cell ignored the first interrupt, "
                                 "so its worker was restarted")
            return
        self._interrupted = True
        if self._started and self._worker is not None:
            await self._worker.interrupt()
        if not cell.noticing:
            cell.noticing = True
            self._spawn(self._notice_if_still_running(cell))

    async def _notice_if_still_running(self, cell: RunningCell) -> None:
        """Tell the cell, if it still runs a few seconds after an interrupt, what the next one does."""
        wait = self.context.interrupt_notice
        try:
            await asyncio.wait_for(cell.done.wait(), wait)
            return
        except TimeoutError:
            pass
        if self._running is not cell or cell.stopping is not None or self.released:
            return
        cell.ignoring = True
        await cell.conn.send(m.Notice(cell.req, (
            f"This cell still runs {wait:g} s after the interrupt: it ignores interrupts (or is stuck "
            "in C or CUDA code). Interrupt again to restart its worker; the session's variables "
            "will be lost.")))

    @property
    def ignoring_interrupt(self) -> bool:
        """The running cell was told that it ignores interrupts (the sidebar offers a restart)."""
        return self._running is not None and self._running.ignoring

    async def stop_cell(self, state: str, reason: str) -> None:
        """Stop the running cell with the ladder: its worker is replaced. The cell
        fails with WorkerDied saying ``reason``, its job ends ``state``; returns
        once it ended."""
        cell = self._running
        if cell is None or self.released:
            return
        if cell.stopping is None and self._worker is not None:
            cell.stopping = (state, reason)
            log.info("session %s: %s", self.id[:8], reason)
            self._restart(self._worker, f"{reason}: its variables are gone")
        await cell.done.wait()

    def fail_cell(self, ename: str, reason: str) -> None:
        """Stop the running cell for what it did: an interrupt, then the ladder if it
        still runs ``kill_grace`` seconds later; it fails with ``ename`` and
        ``reason``. Returns at once; once per cell."""
        cell = self._running
        if cell is None or cell.failure is not None or self.released:
            return
        cell.failure = (ename, reason)
        self._spawn(self._fail(cell, reason))

    async def _fail(self, cell: RunningCell, reason: str) -> None:
        await self.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(cell.done.wait()), self.context.kill_grace)
        except TimeoutError:
            if self._running is cell:
                await self.stop_cell("failed", f"{reason}; the cell did not stop when interrupted, so its "
                                     "worker was restarted")

    async def cancel(self, job: JobId, reason: str) -> bool:
        """Cancel the running cell ``job`` (over HTTP): an interrupt, then, if it still
        runs after ``kill_grace``, the ladder. False if ``job`` is not running here."""
        cell = self._running
        if cell is None or self._running_job != job:
            return False
        await self.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(cell.done.wait()), self.context.kill_grace)
        except TimeoutError:
            await self.stop_cell("cancelled", f"{reason}; the cell did not stop when interrupted, so "
                                 "its worker was restarted")
        return True

    async def restart(self, reason: str) -> None:
        """A fresh worker now, cell or not: the running cell (if any) is stopped with
        the ladder; returns once the fresh worker is there."""
        if self.released or self._worker is None:  # a parked session has no worker to restart
            return
        if self._running is not None:
            await self.stop_cell("cancelled", f"the worker was restarted ({reason})")
        else:
            self._notice = f"The worker was restarted ({reason}): the session's variables are gone."
            self._restart(self._worker, f"the worker was restarted ({reason})")
        if self._replacing is not None:
            await asyncio.shield(self._replacing)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _deliver_interrupt(self, cell: RunningCell, worker: Worker) -> None:
        """Send a held interrupt a moment after the code was announced, and again
        while the same cell keeps running.

        A SIGINT in the instant between ipykernel's ``execute_input`` and the
        start of the user's code can land in ipykernel's own handler rather
        than in the cell; the short delay keeps clear of it, and the repeats
        cover a machine too loaded for the delay to be enough.
        """
        async def deliver() -> None:
            for delay in HELD_INTERRUPT_DELAYS:
                await asyncio.sleep(delay)
                if self._running is not cell or not worker.alive:
                    return
                await worker.interrupt()

        self._spawn(deliver())
