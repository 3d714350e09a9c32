"""How a running cell is stopped: the stop ladder's session side.

A session owns one :class:`CellStopper`, which knows its running cell
(:class:`RunningCell`) and its worker (:class:`~.session_worker.SessionWorker`),
and stops the cell when asked. The rungs:

1. An interrupt sends SIGINT (held until the cell's code has begun, see
   :meth:`CellStopper.code_began`).
2. A cell still running ``interrupt_notice`` seconds later is told, in one
   line (a :class:`~remote_gpu_core.protocol.messages.Notice` to the cell),
   that it ignores interrupts and that the next interrupt restarts its worker.
3. That next interrupt, a cancel over HTTP (``kill_grace`` seconds after its
   own interrupt), a restart request, and a cell past its timeout
   (``kill_grace`` seconds after its interrupt) replace the worker: the pool
   kills it with the ladder of :mod:`..processes.ladder` (SIGTERM to every process it
   started, SIGKILL after the grace) and starts a fresh one in its place.
   The cell fails with ``WorkerDied`` saying why; its job ends ``cancelled``
   (``timed_out`` for a timeout) with that reason.

The server itself stops a cell for what it did (its user's disk past the
limit, see :mod:`.disk_watch`) with the same rungs, through
:meth:`CellStopper.fail_cell`: the cell then fails with the server's
error and reason instead of ``KeyboardInterrupt``, and its job ends
``failed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.protocol import messages as m

from ..workers.worker import Worker
from .session_worker import SessionWorker

__all__ = ["HELD_INTERRUPT_DELAYS", "INTERRUPT_NOTICE", "CellStopper", "RunningCell"]

log = logging.getLogger("remote_gpu_server")

#: When a held interrupt is sent, in seconds after the previous try (see CellStopper.code_began).
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
    #: An interrupt was asked for (it is held until the code has begun).
    interrupted: bool = False
    #: Its code has begun (the worker announced it with ``execute_input``).
    started: bool = False
    #: It was told that it ignores interrupts: the next one replaces the worker.
    ignoring: bool = False
    #: ``(job state, reason)`` once the ladder stops it.
    stopping: tuple[str, str] | None = None
    #: A notice is scheduled for it (one per cell).
    noticing: bool = False
    #: ``(ename, reason)`` once the server stops it for what it did (fail_cell).
    failure: tuple[str, str] | None = None


class CellStopper:
    """Stops the running cell of one session; see the module docstring.

    ``name`` names the session in the log; ``worker`` is its worker;
    ``kill_grace`` is how long after an interrupt (of a timeout, a cancel, a
    cell stopped for what it did) its worker is replaced; ``interrupt_notice``
    how long after an interrupt a cell that still runs is said to ignore it.
    The session marks its cell with :meth:`begin` and :meth:`end`, and
    reports the start of its code with :meth:`code_began`.
    """

    def __init__(self, name: str, worker: SessionWorker, *, kill_grace: float,
                 interrupt_notice: float = INTERRUPT_NOTICE) -> None:
        self.name = name
        self.worker = worker
        self.kill_grace = kill_grace
        self.interrupt_notice = interrupt_notice
        #: The running cell, if any.
        self.cell: RunningCell | None = None
        self._background: set[asyncio.Task[None]] = set()

    def begin(self, conn: _Sender, req: int) -> RunningCell:
        """A cell starts; its answers go to ``conn`` as request ``req``."""
        self.cell = RunningCell(conn, req)
        return self.cell

    def end(self) -> None:
        """The cell ended (its job is being written)."""
        self.cell = None

    def code_began(self, cell: RunningCell, worker: Worker) -> None:
        """The worker announced ``cell``'s code (``execute_input``): an interrupt
        held until now is delivered."""
        if cell.started:
            return
        cell.started = True
        if cell.interrupted:  # asked for before the code began: deliver it now
            self._deliver_interrupt(cell, worker)

    async def await_cell(self, task: asyncio.Task[dict[str, Any]], worker: Worker,
                          timeout: float | None) -> dict[str, Any]:
        """The cell's reply; past ``timeout``: interrupt, then kill and restart."""
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return task.result()
        await worker.interrupt()
        done, _ = await asyncio.wait({task}, timeout=self.kill_grace)
        if done and not isinstance(task.exception(), WorkerDied):
            raise TimeoutError(f"the cell ran past its timeout of {timeout:g} s and was interrupted")
        self.worker.restart(worker, f"the cell ran past its timeout of {timeout:g} s and did not stop "
                                    "when interrupted; its worker was stopped", notice=(
            f"The previous cell ran past its timeout of {timeout:g} s and did not stop when "
            "interrupted: its worker was restarted and the session's variables are gone."))
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
        :meth:`code_began`. ``restart``: restart the worker now.
        """
        if restart:
            await self.restart("the client asked for a restart")
            return
        cell = self.cell
        if cell is None:
            return
        if cell.ignoring:
            await self.stop_cell("cancelled", "interrupted twice: the cell ignored the first interrupt, "
                                 "so its worker was restarted")
            return
        cell.interrupted = True
        worker = self.worker.current
        if cell.started and worker is not None:
            await worker.interrupt()
        if not cell.noticing:
            cell.noticing = True
            self._spawn(self._notice_if_still_running(cell))

    async def _notice_if_still_running(self, cell: RunningCell) -> None:
        """Tell the cell, if it still runs a few seconds after an interrupt, what the next one does."""
        wait = self.interrupt_notice
        try:
            await asyncio.wait_for(cell.done.wait(), wait)
            return
        except TimeoutError:
            pass
        if self.cell is not cell or cell.stopping is not None or self.worker.released:
            return
        cell.ignoring = True
        await cell.conn.send(m.Notice(cell.req, (
            f"This cell still runs {wait:g} s after the interrupt: it ignores interrupts (or is stuck "
            "in C or CUDA code). Interrupt again to restart its worker; the session's variables "
            "will be lost.")))

    @property
    def ignoring_interrupt(self) -> bool:
        """The running cell was told that it ignores interrupts (the sidebar offers a restart)."""
        return self.cell is not None and self.cell.ignoring

    async def stop_cell(self, state: str, reason: str) -> None:
        """Stop the running cell with the ladder: its worker is replaced. The cell
        fails with WorkerDied saying ``reason``, its job ends ``state``; returns
        once it ended."""
        cell = self.cell
        if cell is None or self.worker.released:
            return
        worker = self.worker.current
        if cell.stopping is None and worker is not None:
            cell.stopping = (state, reason)
            log.info("session %s: %s", self.name, reason)
            self.worker.restart(worker, f"{reason}: its variables are gone")
        await cell.done.wait()

    def fail_cell(self, ename: str, reason: str) -> None:
        """Stop the running cell for what it did: an interrupt, then the ladder if it
        still runs ``kill_grace`` seconds later; it fails with ``ename`` and
        ``reason``. Returns at once; once per cell."""
        cell = self.cell
        if cell is None or cell.failure is not None or self.worker.released:
            return
        cell.failure = (ename, reason)
        self._spawn(self._fail(cell, reason))

    async def _fail(self, cell: RunningCell, reason: str) -> None:
        await self.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(cell.done.wait()), self.kill_grace)
        except TimeoutError:
            if self.cell is cell:
                await self.stop_cell("failed", f"{reason}; the cell did not stop when interrupted, so its "
                                     "worker was restarted")

    async def cancel(self, reason: str) -> bool:
        """Cancel the running cell (over HTTP): an interrupt, then, if it still runs
        after ``kill_grace``, the ladder. False if no cell runs."""
        cell = self.cell
        if cell is None:
            return False
        await self.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(cell.done.wait()), self.kill_grace)
        except TimeoutError:
            await self.stop_cell("cancelled", f"{reason}; the cell did not stop when interrupted, so "
                                 "its worker was restarted")
        return True

    async def restart(self, reason: str) -> None:
        """A fresh worker now, cell or not: the running cell (if any) is stopped with
        the ladder; returns once the fresh worker is there."""
        worker = self.worker.current
        if self.worker.released or worker is None:  # a parked session has no worker to restart
            return
        if self.cell is not None:
            await self.stop_cell("cancelled", f"the worker was restarted ({reason})")
        else:
            self.worker.restart(worker, f"the worker was restarted ({reason})",
                                notice=f"The worker was restarted ({reason}): the session's variables are gone.")
        await self.worker.replaced()

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
                if self.cell is not cell or not worker.alive:
                    return
                await worker.interrupt()

        self._spawn(deliver())
