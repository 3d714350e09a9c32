"""A leased session on the server: one user, its slots and its worker.

The session outlives its websocket: a client that reconnects within the
grace period finds the same worker and namespace. Requests run one at a time
(``lock``), in the order they arrived, and their answers go to the
connection that sent them (request ids are per connection). Every output message is appended to
the store's journal with the session's next sequence number before it is
sent, so nothing a cell printed is lost with a connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Protocol

from remote_gpu_kernel.errors import WorkerDied
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.protocol.framing import Chunks
from remote_gpu_kernel.typing import JobId, SessionId, SlotId

from . import session_files
from .comms import COMM_MESSAGES
from .worker import DuplicateRequest, TransferAborted, Worker

if TYPE_CHECKING:
    from .app import GpuServer

__all__ = ["Session"]

log = logging.getLogger("remote_gpu_server")

Send = Callable[[m.Message], Awaitable[None]]

#: When a held interrupt is sent, in seconds after the previous try (see _deliver_interrupt).
HELD_INTERRUPT_DELAYS = (0.1, 2.0, 3.0)
#: Seconds of output between two journal writes while a cell runs.
JOURNAL_FLUSH = 0.5
#: In an error message, the mark of a CUDA context that cannot be used again.
_POISONED = "device-side assert triggered"


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


class Session:
    def __init__(self, server: GpuServer, user: str, slots: list[SlotId], worker: Worker) -> None:
        self.server = server
        self.id = SessionId(uuid.uuid4().hex)
        self.user = user
        self.slots = slots
        self.lock = asyncio.Lock()
        self.last_active = time.monotonic()
        self.released: str | None = None
        # The attached connection's send, for what is not an answer to a
        # request (a release); answers go to the connection that asked.
        self.send: Send | None = None
        self.grace_handle: asyncio.TimerHandle | None = None
        self._worker = worker
        self._replacing: asyncio.Task[Worker] | None = None
        self._notice: str | None = None
        self._seq = 0
        self._running_job: JobId | None = None
        self._interrupted = False
        self._started = False  # the running cell's code has begun (execute_input seen)
        self._background: set[asyncio.Task[None]] = set()
        #: The session's working folder on this machine (see session_files); None: none.
        self.folder: Path | None = None
        worker.on_unrouted = self._unrouted
        self._watch = asyncio.get_running_loop().create_task(self._watch_worker(worker))

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def language_info(self) -> dict[str, Any]:
        return self._worker.language_info

    def touch(self) -> None:
        self.last_active = time.monotonic()

    # -- the worker ---------------------------------------------------------

    async def _watch_worker(self, worker: Worker) -> None:
        await worker.died.wait()
        if self.released or worker is not self._worker:
            return
        self._notice = (
            f"The remote worker died ({worker.exit_description}): this session was restarted "
            "with a fresh worker and its variables are gone."
        )
        self._restart(worker)

    def _restart(self, old: Worker) -> None:
        """Start a fresh worker for this session; requests wait for it."""
        if self._watch is not asyncio.current_task():
            self._watch.cancel()  # the old worker's death is no news any more
        self._replacing = asyncio.get_running_loop().create_task(self.server.pool.replace(old))

    async def worker(self) -> Worker:
        if self._replacing is not None:
            old = self._worker
            try:
                self._worker = await self._replacing
            finally:
                self._replacing = None
            self._worker.comms.inherit(old.comms, f"died ({old.exit_description or 'it was restarted'})")
            self._worker.on_unrouted = self._unrouted
            self._watch = asyncio.get_running_loop().create_task(self._watch_worker(self._worker))
            if self.folder is not None:
                await session_files.enter(self._worker, self.folder)
        return self._worker

    async def prepare(self, req: int, conn: Replier) -> Worker:
        """The start of a request under :attr:`lock`: mark activity, tell
        ``conn`` the notices, return the (fresh if need be) worker."""
        self.touch()
        await self._notices(req, conn)
        return await self.worker()

    async def _unrouted(self, jmsg: dict[str, Any]) -> None:
        """What the worker published under no pending request: journaled and
        sent to the attached client with ``req = 0`` and its Jupyter parent."""
        self._seq += 1
        self.server.store.append_output(self.id, self._seq, None, jmsg["msg_type"], jmsg["content"])
        if self.send is not None:
            await self.send(_output(0, self._seq, jmsg))

    async def _notices(self, req: int, conn: Replier) -> None:
        if self._notice:
            notice, self._notice = self._notice, None
            await conn.send(m.Notice(req, notice))

    # -- requests -----------------------------------------------------------

    async def execute(self, msg: m.Execute, conn: Replier) -> None:
        async with self.lock:
            self.touch()
            await self._notices(msg.req, conn)
            worker = await self.worker()
            store = self.server.store
            job = store.create_job(self.user, self.id, msg.code, list(self.slots), running=True)
            self._running_job, self._interrupted, self._started = job, False, False
            # The journal is written in batches: one transaction per
            # JOURNAL_FLUSH seconds of output, and one at the end of the cell.
            rows: list[tuple[SessionId, int, JobId | None, str, dict[str, Any]]] = []
            flushed = time.monotonic()

            async def on_iopub(jmsg: dict[str, Any]) -> None:
                nonlocal flushed
                self._seq += 1
                rows.append((self.id, self._seq, job, jmsg["msg_type"], jmsg["content"]))
                if jmsg["msg_type"] == "execute_input" and not self._started:
                    self._started = True
                    if self._interrupted:  # asked for before the code began: deliver it now
                        self._deliver_interrupt(job, worker)
                if time.monotonic() - flushed > JOURNAL_FLUSH:
                    store.append_outputs(rows)
                    rows.clear()
                    flushed = time.monotonic()
                if jmsg["msg_type"] != "execute_input":  # the client has the code already
                    await conn.send(_output(msg.req, self._seq, jmsg))

            task = asyncio.get_running_loop().create_task(worker.execute(
                msg.code, on_iopub, silent=msg.silent, store_history=msg.store_history,
                allow_stdin=msg.allow_stdin, msg_id=msg.parent.get("msg_id"),
            ))
            # The answer goes out before the job's last writes, which stay
            # under the lock: the next request still sees the job finished.
            try:
                reply = await self._await_cell(task, worker, msg.timeout)
            except (DuplicateRequest, ValueError) as exc:  # a msg_id it may not use
                await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, str(exc)))
                self._end_job(job, rows, "failed", str(exc))
                return
            except (WorkerDied, TimeoutError) as exc:
                died = isinstance(exc, WorkerDied)
                await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED if died else m.ErrorCode.TIMEOUT,
                                        str(exc)))
                self._end_job(job, rows, "failed" if died else "timed_out", str(exc))
                return
            status = reply.get("status", "error")
            await conn.send(m.ExecuteDone(
                msg.req, job, status, reply.get("execution_count"),
                str(reply.get("ename") or ""), str(reply.get("evalue") or ""),
                [str(line) for line in reply.get("traceback") or []],
            ))
            if status == "error" and _POISONED in str(reply.get("evalue")):
                # CUDA cannot recover from a device-side assert in this process.
                self._notice = ("The previous cell hit a CUDA device-side assert, which leaves the "
                                "process unusable: the worker was restarted and its variables are gone.")
                self._restart(worker)
            if status == "ok":
                self._end_job(job, rows, "completed")
            elif self._interrupted and reply.get("ename") == "KeyboardInterrupt":
                self._end_job(job, rows, "cancelled", "interrupted by the user")
            else:
                self._end_job(job, rows, "failed", f"{reply.get('ename')}: {reply.get('evalue')}")

    def _end_job(self, job: JobId, rows: list[tuple[SessionId, int, JobId | None, str, dict[str, Any]]],
                 state: str, error: str | None = None) -> None:
        self.server.store.append_outputs(rows)
        rows.clear()
        if not (self.released and state != "completed"):  # close() already said 'cancelled'
            self.server.store.finish_job(job, state, error)
        self._running_job = None
        self.touch()

    async def _await_cell(self, task: asyncio.Task[dict[str, Any]], worker: Worker,
                          timeout: float | None) -> dict[str, Any]:
        """The cell's reply; past ``timeout``: interrupt, then kill and restart."""
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return task.result()
        await worker.interrupt()
        done, _ = await asyncio.wait({task}, timeout=self.server.config.kill_grace)
        if done and not isinstance(task.exception(), WorkerDied):
            raise TimeoutError(f"the cell ran past its timeout of {timeout:g} s and was interrupted")
        self._notice = (
            f"The previous cell ran past its timeout of {timeout:g} s and did not stop when "
            "interrupted: its worker was restarted and the session's variables are gone."
        )
        self._restart(worker)
        if not task.done():
            task.cancel()
        raise TimeoutError(
            f"the cell ran past its timeout of {timeout:g} s and did not stop when interrupted; "
            "its worker was killed"
        )

    async def interrupt(self) -> None:
        """Interrupt the running cell.

        ipykernel ignores SIGINT between requests, so an interrupt that
        arrives before the cell's code has begun is held and delivered once
        the worker announces the code (``execute_input``); see
        :meth:`_deliver_interrupt`.
        """
        if self._running_job is not None:
            self._interrupted = True
            if self._started:
                await self._worker.interrupt()

    def _deliver_interrupt(self, job: JobId, worker: Worker) -> None:
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
                if self._running_job != job or not worker.alive:
                    return
                await worker.interrupt()

        task = asyncio.get_running_loop().create_task(deliver())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def send_input(self, value: str) -> None:
        self._worker.send_input(value)

    async def push(self, msg: m.Push, conn: Replier) -> None:
        if len(msg.names) != len(msg.counts) or sum(msg.counts) != len(msg.buffers) or any(
            c < 1 for c in msg.counts
        ):
            await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST,
                                        "push: names, counts and buffers do not match"))
            return
        async with self.lock:
            self.touch()
            await self._notices(msg.req, conn)
            worker = await self.worker()
            try:
                reply = await worker.push(msg.names, msg.counts, list(msg.buffers))
            except WorkerDied as exc:
                await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
                return
            except TransferAborted as exc:
                await conn.send(m.Error(msg.req, m.ErrorCode.PROTOCOL, f"push cut short: {exc}"))
                return
            if not reply.get("ok"):
                await conn.send(m.Error(msg.req, m.ErrorCode.SERIALIZATION,
                                            f"{reply.get('ename')}: {reply.get('evalue')}"))
                return
            await conn.send(m.PushDone(msg.req, list(reply.get("names") or [])))

    async def pull(self, msg: m.Pull, conn: Replier) -> None:
        async with self.lock:
            self.touch()
            await self._notices(msg.req, conn)
            worker = await self.worker()
            try:
                reply, pieces = await worker.pull(msg.names)
            except WorkerDied as exc:
                await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
                return
            if pieces is None:
                code = m.ErrorCode.NAME_ERROR if reply.get("ename") == "NameError" else m.ErrorCode.SERIALIZATION
                await conn.send(m.Error(msg.req, code, f"{reply.get('ename')}: {reply.get('evalue')}"))
                return
            head = m.PullReply(msg.req, list(reply["names"]), list(reply["counts"]))
            async with aclosing(pieces):  # the worker is done with the ring before the next request
                await conn.send_stream(head, list(reply["sizes"]), pieces)

    async def replay(self, msg: m.Replay, conn: Replier) -> None:
        """Send the journaled outputs after ``msg.after``.

        Taken in turn with the other requests: a cell still running from
        before a reconnect finishes first, so all of its output is sent.
        """
        async with self.lock:
            for seq, _, kind, content in self.server.store.outputs_since(self.id, msg.after):
                if kind != "execute_input":
                    await conn.send(m.Output(msg.req, seq, kind, content))
            await conn.send(m.ReplayDone(msg.req, self._seq))

    async def shell_request(self, msg: m.ShellRequest, conn: Replier) -> None:
        """Forward a complete/inspect/comm/... request; answers even while a cell runs.

        What the worker publishes while handling it (a widget's echo, a
        callback's output) is journaled without a job and sent as Output.
        """
        worker = await self.worker()
        if msg.msg_type in COMM_MESSAGES:
            refused = worker.comms.refusal(msg.msg_type, msg.content)
            if refused is not None:
                await conn.send(m.Error(msg.req, m.ErrorCode.NO_COMM, refused))
                return
            worker.comms.sent(msg.msg_type, msg.content)

        async def on_iopub(jmsg: dict[str, Any]) -> None:
            self._seq += 1
            self.server.store.append_output(self.id, self._seq, None, jmsg["msg_type"], jmsg["content"])
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

    async def close(self, reason: str) -> None:
        """Mark released, kill the worker, give the slots back. Called by the server."""
        if self.released:
            return
        self.released = reason
        if self.grace_handle is not None:
            self.grace_handle.cancel()
        self._watch.cancel()
        if self._running_job is not None:
            self.server.store.finish_job(self._running_job, "cancelled", f"session released: {reason}")
        worker = self._worker
        if self._replacing is not None:
            try:
                worker = await self._replacing
            except Exception:
                pass
        await self.server.pool.recycle(worker)
