"""A leased session on the server: one user, its slots and its worker.

The session outlives its websocket: a client that reconnects within the
grace period finds the same worker and namespace. Requests run one at a time
(``lock``), in the order they arrived, and their answers go to the
connection that sent them (request ids are per connection). Every output message is handed to
the journal (:mod:`.journal`) with the session's next sequence number
before it is sent, so nothing a cell printed is lost with a connection;
the journal writes it to the store in the background, in order. What one
cell may keep there is bounded (``--max-output``, see :mod:`.output_bound`):
past the bound the client still gets everything, the journal a head, a tail
and a line saying how much it did not keep.

How a running cell is stopped (interrupts, the notice that a cell ignores
them, cancels, restarts, timeouts) is :mod:`.stopping`'s part of the session.

A session may be parked (see :mod:`.parking`): its namespace is on disk,
it holds no worker and no slot, and its next request first resumes it
through ``SessionContext.resume``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import Chunks
from remote_gpu_core.ids import JobId, SessionId, SlotId

from ..workers.comms import COMM_MESSAGES, CommTable
from ..store.journal import Journal
from .output_bound import OutputBound
from .parked import ParkedState
from .stopping import INTERRUPT_NOTICE, CellStopping, RunningCell
from ..store import DatabaseUnavailable, OutputRow, Store
from .unrecorded import UnrecordedCell
from ..workers.datachannel import TransferAborted
from ..workers.worker import DuplicateRequest, Worker

__all__ = ["Replier", "Send", "Session", "SessionContext", "WorkerSource"]

log = logging.getLogger("remote_gpu_server")

Send = Callable[[m.Message], Awaitable[None]]

#: In an error message, the marks of a CUDA error that leaves the process's
#: context unusable ("sticky" errors): the worker must be replaced.
_POISONED = ("device-side assert triggered", "an illegal memory access was encountered",
             "unspecified launch failure", "an illegal instruction was encountered",
             "misaligned address", "uncorrectable ECC error encountered")


class WorkerSource(Protocol):
    """Where a session's workers come from and go to (the warm pool)."""

    async def take(self, slot_ids: list[SlotId], user: str = "") -> Worker: ...

    async def replace(self, worker: Worker, reason: str | None = None) -> Worker: ...

    async def recycle(self, worker: Worker, reason: str | None = None, keep_folder: bool = False) -> None: ...


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


def _output(req: int, seq: int, jmsg: dict[str, Any]) -> m.Output:
    """The protocol's Output for a Jupyter message, with its metadata, buffers and parent id."""
    return m.Output(req, seq, jmsg["msg_type"], jmsg["content"], tuple(jmsg.get("buffers") or ()),
                    jmsg.get("metadata") or {}, str((jmsg.get("parent_header") or {}).get("msg_id") or ""))


class Replier(Protocol):
    """Where a request's answers go: the connection that sent it.

    Both methods swallow a closed connection: what a cell printed is in the
    journal whether or not its client is still there.
    """

    async def send(self, message: m.Message) -> None: ...

    async def send_stream(self, message: m.Message, lengths: list[int],
                          pieces: AsyncIterator[Any]) -> None: ...


class Session(CellStopping):
    """``notebook`` is the path the client named in its lease request (None: a
    script); ``last_code`` is the code of the latest cell that was not silent.
    Both are for the status view (who runs what), shown to the owner only."""

    def __init__(self, context: SessionContext, user: str, slots: list[SlotId], worker: Worker | None,
                 notebook: str | None = None,
                 on_lost: Callable[[Session, str], None] | None = None, *,
                 parked: ParkedState | None = None, session_id: str | None = None, seq: int = 0,
                 priority: str = "normal") -> None:
        """``worker`` None: a session found parked at start (``parked``, its
        ``session_id`` and journal ``seq`` from the store)."""
        self.context = context
        self.id = SessionId(session_id or uuid.uuid4().hex)
        self.priority = priority
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
        # Called when the session cannot go on (its worker's node went away).
        self._on_lost = on_lost
        self.lock = asyncio.Lock()
        self.last_active = time.monotonic()
        self.released: str | None = None
        # The attached connection's send, for what is not an answer to a
        # request (a release); answers go to the connection that asked.
        self.send: Send | None = None
        self.grace_handle: asyncio.TimerHandle | None = None
        self._worker = worker
        self._language_info = dict(worker.language_info) if worker is not None else {}
        self._replacing: asyncio.Task[Worker] | None = None
        self._replaced: Worker | None = None  # the worker being replaced, once
        self._notice: str | None = None
        self._seq = seq
        self._output = OutputBound(context.max_output)  # what the journal keeps of each cell
        self._running: RunningCell | None = None  # the running cell, if any
        self._running_job: JobId | None = None
        self._unrecorded: UnrecordedCell | None = None  # the running cell, if the store could not take its job
        self._interrupted = False
        self._started = False  # the running cell's code has begun (execute_input seen)
        self._background: set[asyncio.Task[None]] = set()
        # The comms of the worker a parked session had: dead once it is restored.
        self._parked_comms: CommTable | None = None
        self._watch: asyncio.Task[None] | None = None
        if worker is not None:
            worker.on_unrouted = self._unrouted
            self._watch = asyncio.get_running_loop().create_task(self._watch_worker(worker))

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def language_info(self) -> dict[str, Any]:
        return self._worker.language_info if self._worker is not None else self._language_info

    @property
    def seq(self) -> int:
        """The journal sequence number of the session's latest output."""
        return self._seq

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # -- the worker ---------------------------------------------------------

    async def _watch_worker(self, worker: Worker) -> None:
        await worker.died.wait()
        if self.released or worker is not self._worker:
            return
        if worker.lost_node and self._on_lost is not None:
            # Its slots went with the node: no fresh worker can start there.
            self._on_lost(self, f"node {worker.node} went away ({worker.exit_description})")
            return
        self._notice = (
            f"The remote worker died: {worker.exit_description}. This session was restarted "
            "with a fresh worker and its variables are gone."
        )
        self._restart(worker)

    def _restart(self, old: Worker, reason: str | None = None) -> None:
        """Start a fresh worker for this session; requests wait for it. The old
        one's requests fail saying ``reason``.

        Once per worker: a worker that dies while it is being killed for a
        timeout is replaced once, not twice.
        """
        if self._replaced is old:
            return
        self._replaced = old
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()  # the old worker's death is no news any more
        self._replacing = asyncio.get_running_loop().create_task(self.context.pool.replace(old, reason))

    async def worker(self) -> Worker:
        if self._replacing is not None:
            old = self._worker
            try:
                self._worker = await self._replacing
            finally:
                self._replacing = None
            if old is not None:
                self._worker.comms.inherit(old.comms, f"died ({old.exit_description or 'it was restarted'})")
            self._worker.on_unrouted = self._unrouted
            self._watch = asyncio.get_running_loop().create_task(self._watch_worker(self._worker))
        if self._worker is None:
            raise WorkerDied("this session is parked and was not resumed", code="worker_died")
        return self._worker

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
        worker = self._worker
        assert worker is not None and self._replacing is None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._language_info = dict(worker.language_info)
        self._parked_comms = worker.comms
        self._worker = None
        self.parked = state
        self._flush_output()
        return worker

    def unpark(self, worker: Worker, slots: list[SlotId]) -> None:
        """The session holds ``slots`` and ``worker`` again. Call under :attr:`lock`."""
        self._worker = worker
        self.slots = list(slots)
        self.parked = None
        self.segments += 1
        self._language_info = dict(worker.language_info)
        if self._parked_comms is not None:
            worker.comms.inherit(self._parked_comms, "was given back when the session was parked")
            self._parked_comms = None
        worker.on_unrouted = self._unrouted
        self._watch = asyncio.get_running_loop().create_task(self._watch_worker(worker))

    async def prepare(self, req: int, conn: Replier) -> Worker:
        """The start of a request under :attr:`lock`: mark activity, tell
        ``conn`` the notices, return the worker (resuming a parked session,
        or the fresh one after a restart)."""
        self.touch()
        await self._notices(req, conn)
        return await self._ready(req, conn)

    def _journal(self, row: OutputRow) -> None:
        """Hand ``row`` to the journal, within the cell's bound (see :mod:`.output_bound`)."""
        for kept in self._output.add(row):
            self.context.journal.append(kept)

    def _flush_output(self) -> None:
        """Journal what the bound holds back (the tail, and the line before it)."""
        for kept in self._output.flush():
            self.context.journal.append(kept)

    async def _unrouted(self, jmsg: dict[str, Any]) -> None:
        """What the worker published under no pending request: journaled and
        sent to the attached client with ``req = 0`` and its Jupyter parent."""
        self._seq += 1
        self._journal(OutputRow(self.id, self._seq, None, jmsg["msg_type"], jmsg["content"]))
        if self.send is not None:
            await self.send(_output(0, self._seq, jmsg))

    async def _notices(self, req: int, conn: Replier) -> None:
        if self._notice:
            notice, self._notice = self._notice, None
            await conn.send(m.Notice(req, notice))

    # -- requests -----------------------------------------------------------

    async def execute(self, msg: m.Execute, conn: Replier) -> None:
        async with self.lock:
            worker = await self.prepare(msg.req, conn)
            cell = self._running = RunningCell(conn, msg.req)
            for kept in self._output.reset():  # a new cell: what the one before held back first
                self.context.journal.append(kept)
            try:
                await self._execute(msg, conn, worker, cell)
            finally:
                self._flush_output()
                cell.done.set()

    async def _execute(self, msg: m.Execute, conn: Replier, worker: Worker, cell: RunningCell) -> None:
        """The body of :meth:`execute`, under its lock."""
        if not msg.silent:
            self.last_code = msg.code
        self._interrupted, self._started = False, False
        # The job's row is written while the worker already runs the cell.
        job_task = asyncio.get_running_loop().create_task(self._create_job(msg.code))
        job: JobId | None = None

        async def on_iopub(jmsg: dict[str, Any]) -> None:
            nonlocal job
            if job is None and not job_task.done():
                await asyncio.wait({job_task})
            job = job_task.result()
            self._seq += 1
            self._journal(OutputRow(self.id, self._seq, job, jmsg["msg_type"], jmsg["content"]))
            if job is None and self._unrecorded is not None:
                self._unrecorded.output(self._seq)
            if jmsg["msg_type"] == "execute_input" and not self._started:
                self._started = True
                if self._interrupted:  # asked for before the code began: deliver it now
                    self._deliver_interrupt(cell, worker)
            if jmsg["msg_type"] != "execute_input":  # the client has the code already
                await conn.send(_output(msg.req, self._seq, jmsg))

        task = asyncio.get_running_loop().create_task(worker.execute(
            msg.code, on_iopub, silent=msg.silent, store_history=msg.store_history,
            allow_stdin=msg.allow_stdin, msg_id=msg.parent.get("msg_id"),
            execution_count=msg.execution_count or None,
        ))
        # The answer goes out before the job's last write, which stays
        # under the lock: the next request still sees the job finished.
        try:
            reply = await self._await_cell(task, worker, msg.timeout)
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
            self._notice = (f"The previous cell hit a CUDA error that leaves the process unusable "
                            f"({poisoned}{'; ' + gpu if gpu else ''}): the worker was restarted and "
                            "its variables are gone.")
            self._restart(worker)
        if status == "ok":
            await self._end_job(job, "completed")
        elif failure is not None:
            await self._end_job(job, "failed", f"{ename}: {evalue}")
        elif self._interrupted and reply.get("ename") == "KeyboardInterrupt":
            await self._end_job(job, "cancelled", "interrupted by the user")
        else:
            await self._end_job(job, "failed", f"{reply.get('ename')}: {reply.get('evalue')}")

    async def _create_job(self, code: str) -> JobId | None:
        """The cell's job, or None when the database cannot take it now: the
        cell runs anyway, and its job is written once the database is back."""
        unrecorded = UnrecordedCell(code, tuple(str(s) for s in self.slots))
        try:
            job = await self.context.store.create_job(self.user, self.id, code, list(self.slots), running=True)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("session %s: the cell runs; its job is written when the database is back: %s",
                        self.id[:8], exc)
            self._unrecorded = unrecorded
            return None
        self._running_job = job
        return job

    async def _end_job(self, job: JobId | None, state: str, error: str | None = None) -> None:
        unrecorded, self._unrecorded = self._unrecorded, None
        self._running = None
        self._running_job = None
        self.touch()
        if self.released and state != "completed":  # close() already said 'cancelled'
            return
        if job is None:
            if unrecorded is not None:
                self._record_later(unrecorded, state, error)
            return
        await self._finish(job, state, error)

    async def _finish(self, job: JobId, state: str, error: str | None) -> None:
        """Record how ``job`` ended: now, or once the database is back."""
        ended = time.time()
        try:
            await self.context.store.finish_job(job, state, error)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("session %s: job %s ended %s; the store records it when the database is back: %s",
                        self.id[:8], job, state, exc)
            self.context.journal.later(lambda: self.context.store.finish_job(job, state, error, ended),
                                       f"the end of job {job}")

    def _record_later(self, cell: UnrecordedCell, state: str, error: str | None) -> None:
        """The job of a cell that ran while the database was away, written once it is back."""
        self._flush_output()  # the tail the bound held goes in before the record that claims it
        record = cell.record(self.user, self.id, state, error)
        self.context.journal.later(lambda: self.context.store.record_cell(record),
                                   f"the job of a cell of session {self.id[:8]} ({state})")

    @property
    def running(self) -> bool:
        """A cell runs now."""
        return self._running is not None

    @property
    def running_job(self) -> JobId | None:
        return self._running_job

    def send_input(self, value: str) -> None:
        """Answer the running cell's ``input()``; an answer with nobody to take it is dropped."""
        if self.released or self._worker is None or not self._worker.alive:
            log.info("session %s: an input answer came with no worker to take it", self.id[:8])
            return
        try:
            self._worker.send_input(value)
        except WorkerDied:
            log.info("session %s: an input answer came after the worker died", self.id[:8])

    async def push(self, msg: m.Push, conn: Replier) -> None:
        if len(msg.names) != len(msg.counts) or sum(msg.counts) != len(msg.buffers) or any(
            c < 1 for c in msg.counts
        ):
            await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST,
                                        "push: names, counts and buffers do not match"))
            return
        await self.send_in(msg.req, conn, {"op": "push", "names": msg.names, "counts": msg.counts},
                           list(msg.buffers), "push", lambda reply: m.ErrorCode.SERIALIZATION,
                           lambda reply: m.PushDone(msg.req, list(reply.get("names") or [])))

    async def pull(self, msg: m.Pull, conn: Replier) -> None:
        def refused(reply: dict[str, Any]) -> m.ErrorCode:
            return m.ErrorCode.NAME_ERROR if reply.get("ename") == "NameError" else m.ErrorCode.SERIALIZATION

        await self.send_out(msg.req, conn, {"op": "pull", "names": msg.names}, refused,
                            lambda reply: m.PullReply(msg.req, list(reply["names"]), list(reply["counts"])))

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
                       head: Callable[[dict[str, Any]], m.Message]) -> None:
        """A request whose answer's buffers stream from the worker (a pull, a
        download), in turn: the transfer op ``data``, then ``head(reply)`` with the
        buffers, or an error (``refused(reply)`` its code when the worker says no)."""
        async with self.lock:
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
            self._flush_output()
            await self.context.journal.flush(timeout=10)
            for row in await self.context.store.outputs_since(self.id, msg.after):
                if row.msg_type != "execute_input":
                    await conn.send(m.Output(msg.req, row.seq, row.msg_type, row.content))
            await conn.send(m.ReplayDone(msg.req, self._seq))

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
            self._seq += 1
            self._journal(OutputRow(self.id, self._seq, None, jmsg["msg_type"], jmsg["content"]))
            await conn.send(_output(msg.req, self._seq, jmsg))

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

    # -- the end ------------------------------------------------------------

    async def close(self, reason: str, job_state: str = "cancelled") -> None:
        """Mark released, kill the worker, give the slots back. Called by the server.

        A cell still running ends ``job_state`` (``failed`` when the session
        was lost rather than released).
        """
        if self.released:
            return
        self.released = reason
        self._flush_output()
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if self.resuming is not None:
            self.resuming.cancel()
        if self._running_job is not None:
            await self._finish(self._running_job, job_state, f"session released: {reason}")
        if self._unrecorded is not None:
            self._record_later(self._unrecorded, job_state, f"session released: {reason}")
            self._unrecorded = None
        worker = self._worker
        if self._replacing is not None:
            try:
                worker = await self._replacing
            except Exception:
                pass
        if worker is not None:  # a parked session holds none
            await self.context.pool.recycle(worker, f"the session was released ({reason})")
