"""A leased session on the server: one user, its slots and its worker.

The session outlives its websocket: a client that reconnects within the
grace period finds the same worker and namespace. Requests run one at a time
(``lock``), in the order they arrived, and their answers go to the
connection that sent them (request ids are per connection).

A session owns three helpers, each given the narrow things it uses: its
worker across restarts (:mod:`.session_worker`); what it writes to the
store, its output journal and its cells' jobs (:mod:`.recorder`); and how
its running cell is stopped (interrupts, the notice that a cell ignores
them, cancels, restarts, timeouts: :mod:`.stopping`).

A session may be parked (see :mod:`.parking`): its namespace is on disk,
it holds no worker and no slot, and its next request first resumes it
through ``SessionContext.resume``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.ids import JobId, SessionId, SlotId
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import Chunks

from ..environments import DEFAULT_ENVIRONMENT
from ..store import Store
from ..store.journal import Journal
from ..workers.comms import COMM_MESSAGES
from ..workers.datachannel import TransferAborted
from ..workers.worker import DuplicateRequest, Worker
from .fetching import FileFetcher
from .parked import ParkedState
from .recorder import SessionRecorder
from .replier import Replier
from .session_worker import SessionWorker, WorkerSource
from .stopping import INTERRUPT_NOTICE, CellStopper, RunningCell

__all__ = ["Follows", "Replier", "Send", "Session", "SessionContext"]

log = logging.getLogger("remote_gpu_server")

Send = Callable[[m.Message], Awaitable[None]]
#: For a request that follows another (``after``): asked at its turn, why it
#: must not run (that one failed), or None if it may.
Follows = Callable[[], "str | None"]

#: The most names of changed fetched files one cell's request passes on to its worker.
MAX_REFETCH = 4096
#: In an error message, the marks of a CUDA error that leaves the process's
#: context unusable ("sticky" errors): the worker must be replaced.
_POISONED = ("device-side assert triggered", "an illegal memory access was encountered",
             "unspecified launch failure", "an illegal instruction was encountered",
             "misaligned address", "uncorrectable ECC error encountered")


@dataclasses.dataclass(frozen=True)
class SessionContext:
    """What a session uses of its server."""

    pool: WorkerSource
    store: Store
    journal: Journal
    #: After a cell's timeout interrupt (or a cancel's), how long before its worker is replaced.
    kill_grace: float
    #: After an interrupt, how long before a cell that still runs is said to ignore interrupts.
    interrupt_notice: float = INTERRUPT_NOTICE
    #: Resumes a parked session (lease, worker, namespace) for a request; None
    #: where the server does not park.
    resume: Callable[[Session, int, Replier | None], Awaitable[None]] | None = None
    #: ``--max-output``: bytes of one cell's output the journal keeps (None: all).
    max_output: int | None = None
    #: ``--session-cache``: bytes of pushed buffers the worker keeps by digest (0: none).
    session_cache: int = 0
    #: The versions of each environment, where the server has named ones (a client's Welcome).
    environments: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)


def _output(req: int, seq: int, jmsg: dict[str, Any]) -> m.Output:
    """The protocol's Output for a Jupyter message, with its metadata, buffers and parent id."""
    return m.Output(req, seq, jmsg["msg_type"], jmsg["content"], tuple(jmsg.get("buffers") or ()),
                    jmsg.get("metadata") or {}, str((jmsg.get("parent_header") or {}).get("msg_id") or ""))


class Session:
    """One leased session; see the module docstring.

    ``notebook`` is the path the client named in its lease request (None: a
    script); ``last_code`` is the code of the latest cell that was not silent.
    Both are for the status view (who runs what), shown to the owner only.
    """

    def __init__(self, context: SessionContext, user: str, slots: list[SlotId], worker: Worker | None,
                 notebook: str | None = None,
                 on_lost: Callable[[Session, str], None] | None = None, *,
                 parked: ParkedState | None = None, session_id: str | None = None, seq: int = 0,
                 priority: str = "normal", environment: str = DEFAULT_ENVIRONMENT) -> None:
        """``worker`` None: a session found parked at start (``parked``, its
        ``session_id`` and journal ``seq`` from the store). ``environment``:
        the one its workers run (see :mod:`..environments`)."""
        self.context = context
        self.id = SessionId(session_id or uuid.uuid4().hex)
        self.priority = priority
        self.environment = parked.environment if parked is not None else environment
        #: Set while the session is parked: it holds no worker and no slot then
        #: (``slots`` are those it had).
        self.parked = parked
        #: The lease wait of a parked session resuming (an interrupt withdraws it).
        self.resuming: asyncio.Future[Any] | None = None
        #: How many leases the session held before its current (or next) one.
        self.segments = 0
        self.user = user
        self.slots = slots
        self.notebook = notebook
        self.last_code: str | None = None
        self.lock = asyncio.Lock()
        self.last_active = time.monotonic()
        self.released: str | None = None
        # The attached connection's send, for what is not an answer to a
        # request (a release); answers go to the connection that asked.
        self.send: Send | None = None
        self.grace_handle: asyncio.TimerHandle | None = None
        # Told when the session cannot go on (its worker's node went away).
        lost = functools.partial(on_lost, self) if on_lost is not None else None
        self._worker = SessionWorker(context.pool, worker, on_unrouted=self._unrouted, on_lost=lost)
        self.recorder = SessionRecorder(context.store, context.journal, user, self.id, seq=seq,
                                        max_output=context.max_output)
        self.stopping = CellStopper(self.id[:8], self._worker, kill_grace=context.kill_grace,
                                    interrupt_notice=context.interrupt_notice)
        #: The running cell's files fetched from its notebook's folder (see :mod:`.fetching`).
        self.fetcher = FileFetcher()

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def language_info(self) -> dict[str, Any]:
        return self._worker.language_info

    @property
    def fingerprint(self) -> dict[str, str]:
        """Its worker's versions, for the lease's answer (see :mod:`remote_gpu_core.fingerprint`)."""
        return self._worker.fingerprint

    @property
    def seq(self) -> int:
        """The journal sequence number of the session's latest output."""
        return self.recorder.seq

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # -- the worker ---------------------------------------------------------

    async def worker(self) -> Worker:
        """The worker for a request (the fresh one once a restart is done); raises
        WorkerDied while the session is parked."""
        return await self._worker.get()

    async def _ready(self, req: int, conn: Replier | None) -> Worker:
        """The worker for a request, resuming the session first if it is parked."""
        if self.parked is not None and self.context.resume is not None:
            await self.context.resume(self, req, conn)
        return await self.worker()

    async def resume(self, req: int, conn: Replier | None) -> None:
        """Resume a parked session now (a Resume request); nothing if it is not parked."""
        async with self.lock:
            self.touch()
            await self._ready(req, conn)

    def park(self, state: ParkedState) -> Worker:
        """The namespace is saved: hand over the worker (to be killed) and hold
        none until :meth:`unpark`. Call under :attr:`lock`."""
        worker = self._worker.park()
        self.parked = state
        self.recorder.flush()
        return worker

    def unpark(self, worker: Worker, slots: list[SlotId]) -> None:
        """The session holds ``slots`` and ``worker`` again. Call under :attr:`lock`."""
        self.slots = list(slots)
        self.parked = None
        self.segments += 1
        self._worker.unpark(worker)

    async def prepare(self, req: int, conn: Replier) -> Worker:
        """The start of a request under :attr:`lock`: mark activity, tell
        ``conn`` the notices, return the worker (resuming a parked session,
        or the fresh one after a restart)."""
        self.touch()
        await self._notices(req, conn)
        return await self._ready(req, conn)

    async def _unrouted(self, jmsg: dict[str, Any]) -> None:
        """What the worker published under no pending request: journaled and
        sent to the attached client with ``req = 0`` and its Jupyter parent."""
        seq = self.recorder.output(None, jmsg)
        if self.send is not None:
            await self.send(_output(0, seq, jmsg))

    async def _notices(self, req: int, conn: Replier) -> None:
        notice = self._worker.take_notice()
        if notice:
            await conn.send(m.Notice(req, notice))

    # -- requests -----------------------------------------------------------

    async def _may_run(self, req: int, conn: Replier, follows: Follows | None) -> bool:
        """Under :attr:`lock`: whether request ``req`` may run; if the request it
        follows failed, it is answered ``NOT_RUN`` (and runs not)."""
        refusal = follows() if follows is not None else None
        if refusal is None:
            return True
        await conn.send(m.Error(req, m.ErrorCode.NOT_RUN, refusal))
        return False

    async def execute(self, msg: m.Execute, conn: Replier, follows: Follows | None = None) -> None:
        """Run a cell, in turn; ``follows``: it runs only if the request it follows succeeded."""
        async with self.lock:
            if not await self._may_run(msg.req, conn, follows):
                return
            worker = await self.prepare(msg.req, conn)
            if msg.refetch:  # copies of files that changed beside the notebook: fetched again when opened
                await worker.transfers.op({"op": "forget", "paths": msg.refetch[:MAX_REFETCH]})
            cell = self.stopping.begin(conn, msg.req)
            self.recorder.new_cell()
            self.fetcher.begin(worker, conn, msg.req, msg.fetch)
            try:
                await self._execute(msg, conn, worker, cell)
            finally:
                await self.fetcher.end()
                self.recorder.flush()
                cell.done.set()

    async def _execute(self, msg: m.Execute, conn: Replier, worker: Worker, cell: RunningCell) -> None:
        """The body of :meth:`execute`, under its lock."""
        if not msg.silent:
            self.last_code = msg.code
        # The job's row is written while the worker already runs the cell.
        job_task = asyncio.get_running_loop().create_task(self.recorder.create_job(msg.code, self.slots))
        job: JobId | None = None

        async def on_iopub(jmsg: dict[str, Any]) -> None:
            nonlocal job
            if job is None and not job_task.done():
                await asyncio.wait({job_task})
            job = job_task.result()
            seq = self.recorder.output(job, jmsg)
            if job is None:
                self.recorder.unrecorded_output(seq)
            if jmsg["msg_type"] == "execute_input":
                self.stopping.code_began(cell, worker)
            else:  # the client has the code already
                await conn.send(_output(msg.req, seq, jmsg))

        task = asyncio.get_running_loop().create_task(worker.execute(
            msg.code, on_iopub, silent=msg.silent, store_history=msg.store_history,
            allow_stdin=msg.allow_stdin, msg_id=msg.parent.get("msg_id"),
            execution_count=msg.execution_count or None,
        ))
        # The answer goes out before the job's last write, which stays
        # under the lock: the next request still sees the job finished.
        try:
            reply = await self.stopping.await_cell(task, worker, msg.timeout)
        except (DuplicateRequest, ValueError) as exc:  # a msg_id it may not use
            await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, str(exc)))
            await self._end_job(await job_task, "failed", str(exc))
            return
        except (WorkerDied, TimeoutError) as exc:
            died = isinstance(exc, WorkerDied)
            await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED if died else m.ErrorCode.TIMEOUT,
                                    str(exc)))
            if cell.stopping is not None:  # the ladder stopped it: cancelled, and why
                await self._end_job(await job_task, *cell.stopping)
            elif died:  # the cause, not what the session does next
                await self._end_job(await job_task, "failed",
                                    f"the worker died: {worker.exit_description or exc}")
            else:
                await self._end_job(await job_task, "timed_out", str(exc))
            return
        job = await job_task
        status = reply.get("status", "error")
        # A cell the server stopped (fail_cell) fails with the server's reason, not KeyboardInterrupt.
        failure = cell.failure if status == "error" else None
        ename, evalue = failure or (str(reply.get("ename") or ""), str(reply.get("evalue") or ""))
        traceback = [str(line) for line in reply.get("traceback") or []]
        await conn.send(m.ExecuteDone(msg.req, job or 0, status, reply.get("execution_count"), ename, evalue,
                                      traceback + [f"{ename}: {evalue}"] if failure else traceback))
        poisoned = next((p for p in _POISONED if p in str(reply.get("evalue"))), None)
        if status == "error" and poisoned is not None:
            # CUDA cannot recover from a sticky error (a device-side assert) in this process.
            gpu = worker.describe_gpu_errors()
            self._worker.restart(worker, notice=(
                f"The previous cell hit a CUDA error that leaves the process unusable "
                f"({poisoned}{'; ' + gpu if gpu else ''}): the worker was restarted and "
                "its variables are gone."))
        if status == "ok":
            await self._end_job(job, "completed")
        elif failure is not None:
            await self._end_job(job, "failed", f"{ename}: {evalue}")
        elif cell.interrupted and reply.get("ename") == "KeyboardInterrupt":
            await self._end_job(job, "cancelled", "interrupted by the user")
        else:
            await self._end_job(job, "failed", f"{reply.get('ename')}: {reply.get('evalue')}")

    async def _end_job(self, job: JobId | None, state: str, error: str | None = None) -> None:
        self.stopping.end()
        self.touch()
        await self.recorder.end_job(job, state, error, released=bool(self.released))

    @property
    def running(self) -> bool:
        """A cell runs now."""
        return self.stopping.cell is not None

    @property
    def running_job(self) -> JobId | None:
        return self.recorder.running_job

    def send_input(self, value: str) -> None:
        """Answer the running cell's ``input()``; an answer with nobody to take it is dropped."""
        worker = self._worker.current
        if self.released or worker is None or not worker.alive:
            log.info("session %s: an input answer came with no worker to take it", self.id[:8])
            return
        try:
            worker.send_input(value)
        except WorkerDied:
            log.info("session %s: an input answer came after the worker died", self.id[:8])

    async def send_in(self, req: int, conn: Replier, data: dict[str, Any], buffers: list[Any], what: str,
                      refused: Callable[[dict[str, Any]], m.ErrorCode],
                      done: Callable[[dict[str, Any]], m.Message]) -> None:
        """A request whose ``buffers`` stream to the worker (a push, an upload), in
        turn: the transfer op ``data``, then ``done(reply)`` as its answer, or an
        error (``refused(reply)`` its code when the worker says no)."""
        async with self.lock:
            worker = await self.prepare(req, conn)
            try:
                reply = await worker.transfers.send_buffers(data, buffers)
            except WorkerDied as exc:
                await conn.send(m.Error(req, m.ErrorCode.WORKER_DIED, str(exc)))
                return
            except TransferAborted as exc:
                await conn.send(m.Error(req, m.ErrorCode.PROTOCOL, f"{what} cut short: {exc}"))
                return
            if not reply.get("ok"):
                await conn.send(m.Error(req, refused(reply), f"{reply.get('ename')}: {reply.get('evalue')}"))
                return
            await conn.send(done(reply))

    async def send_out(self, req: int, conn: Replier, data: dict[str, Any],
                       refused: Callable[[dict[str, Any]], m.ErrorCode],
                       head: Callable[[dict[str, Any]], m.Message], follows: Follows | None = None) -> None:
        """A request whose answer's buffers stream from the worker (a pull, a
        download), in turn: the transfer op ``data``, then ``head(reply)`` with the
        buffers, or an error (``refused(reply)`` its code when the worker says no).
        ``follows``: as in :meth:`execute`."""
        async with self.lock:
            if not await self._may_run(req, conn, follows):
                return
            worker = await self.prepare(req, conn)
            try:
                reply, pieces = await worker.transfers.receive_buffers(data)
            except WorkerDied as exc:
                await conn.send(m.Error(req, m.ErrorCode.WORKER_DIED, str(exc)))
                return
            if pieces is None:
                await conn.send(m.Error(req, refused(reply), f"{reply.get('ename')}: {reply.get('evalue')}"))
                return
            async with aclosing(pieces):  # the worker is done with the ring before the next request
                await conn.send_stream(head(reply), list(reply["sizes"]), pieces)

    async def replay(self, msg: m.Replay, conn: Replier) -> None:
        """Send the journaled outputs after ``msg.after``.

        Taken in turn with the other requests: a cell still running from
        before a reconnect finishes first, so all of its output is sent.
        """
        async with self.lock:
            for row in await self.recorder.since(msg.after):
                if row.msg_type != "execute_input":
                    await conn.send(m.Output(msg.req, row.seq, row.msg_type, row.content))
            await conn.send(m.ReplayDone(msg.req, self.recorder.seq))

    async def shell_request(self, msg: m.ShellRequest, conn: Replier) -> None:
        """Forward a complete/inspect/comm/... request; answers even while a cell runs.

        What the worker publishes while handling it (a widget's echo, a
        callback's output) is journaled without a job and sent as Output.
        A parked session is resumed first, in turn with the other requests.
        """
        if self.parked is not None:
            await self.resume(msg.req, conn)
        worker = await self.worker()
        if msg.msg_type in COMM_MESSAGES:
            refused = worker.comms.refusal(msg.msg_type, msg.content)
            if refused is not None:
                await conn.send(m.Error(msg.req, m.ErrorCode.NO_COMM, refused))
                return
            worker.comms.sent(msg.msg_type, msg.content)

        async def on_iopub(jmsg: dict[str, Any]) -> None:
            await conn.send(_output(msg.req, self.recorder.output(None, jmsg), jmsg))

        # Buffers arrive as framing.Chunks; a Jupyter message needs plain bytes.
        buffers = [b.join() if isinstance(b, Chunks) else b for b in msg.buffers]
        try:
            reply = await worker.request(msg.msg_type, msg.content, on_iopub, buffers=buffers or None,
                                         msg_id=msg.parent.get("msg_id"))
        except (DuplicateRequest, ValueError) as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, str(exc)))
            return
        except WorkerDied as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
            return
        await conn.send(m.ShellReply(msg.req, str(reply.get("msg_type", "")), dict(reply.get("content") or {}),
                                     dict(reply.get("metadata") or {})))

    # -- stopping (see :mod:`.stopping`) -------------------------------------

    async def interrupt(self, restart: bool = False) -> None:
        """Interrupt the running cell (``restart``: restart the worker now); a parked
        session waiting for a lease to resume stops waiting."""
        if self.resuming is not None:
            self.resuming.cancel()
        await self.stopping.interrupt(restart)

    async def cancel(self, job: JobId, reason: str) -> bool:
        """Cancel the running cell ``job`` (over HTTP); False if ``job`` is not running here."""
        if self.recorder.running_job != job:
            return False
        return await self.stopping.cancel(reason)

    async def restart(self, reason: str) -> None:
        """A fresh worker now, cell or not; returns once it is there."""
        await self.stopping.restart(reason)

    def fail_cell(self, ename: str, reason: str) -> None:
        """Stop the running cell for what it did; it fails with ``ename`` and ``reason``."""
        self.stopping.fail_cell(ename, reason)

    @property
    def ignoring_interrupt(self) -> bool:
        """The running cell was told that it ignores interrupts (the sidebar offers a restart)."""
        return self.stopping.ignoring_interrupt

    # -- the end ------------------------------------------------------------

    async def close(self, reason: str, job_state: str = "cancelled") -> None:
        """Mark released, kill the worker, give the slots back. Called by the server.

        A cell still running ends ``job_state`` (``failed`` when the session
        was lost rather than released).
        """
        if self.released:
            return
        self.released = reason
        self.recorder.flush()
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        self._worker.release()
        if self.resuming is not None:
            self.resuming.cancel()
        await self.recorder.release(job_state, f"session released: {reason}")
        await self._worker.recycle(f"the session was released ({reason})")
