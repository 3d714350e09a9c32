"""The server's handle on one worker: a real ipykernel process.

A :class:`Worker` starts a kernel through jupyter_client (signed messages,
``ipc://`` sockets in a private runtime folder, its own process group), pins
it to its slots with ``CUDA_VISIBLE_DEVICES``, and forwards requests to it.
jupyter_client's provisioner is the process-control layer (launch, poll,
signal, kill, cleanup), so a pool of workers can later be started by another
launcher without changing this module.

Every request completes when both its shell reply and its IOPub ``idle``
status have arrived, so no output is lost after the reply. If the process
dies, every pending request fails at once with :class:`WorkerDied` saying
how it ended. A request may be sent under a Jupyter ``msg_id`` its client
chose (the frontend's own, so that output routes by it); one already in
flight is refused with :class:`DuplicateRequest`. What the worker publishes
under no pending request goes to :attr:`Worker.on_unrouted`, and the comms
it opens and closes are kept in :attr:`Worker.comms`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from hmac import compare_digest
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from remote_gpu_kernel.errors import WorkerDied
from remote_gpu_kernel.protocol.framing import Chunks

from . import transfer
from .comms import CommTable
from .gpus import Slot, cuda_visible_devices
from .worker_kernel import COMM_TARGET

__all__ = ["DuplicateRequest", "IopubHandler", "TransferAborted", "Worker", "describe_exit"]

log = logging.getLogger("remote_gpu_server")

IopubHandler = Callable[[dict[str, Any]], Awaitable[None]]

_counter = itertools.count(1)
#: How often a worker's process is polled for an unexpected exit.
DEATH_POLL_SECONDS = 0.2


def describe_exit(returncode: int | None) -> str:
    """'exit code 3' or 'signal SIGSEGV' for a process's return code."""
    if returncode is None:
        return "an unknown cause"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class DuplicateRequest(ValueError):
    """A request's Jupyter ``msg_id`` is already in flight on this worker."""


#: The longest Jupyter msg_id a client may choose for its request.
MAX_MSG_ID = 200


class TransferAborted(ConnectionError):
    """A push or pull stream broke before its end (client or worker gone).

    ``worker_stopped`` says the worker gave up itself and needs no notice.
    """

    def __init__(self, reason: str, worker_stopped: bool = False) -> None:
        super().__init__(reason)
        self.worker_stopped = worker_stopped


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its caller learns it another way."""
    if not future.cancelled():
        future.exception()


async def _iterate(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def _stream(chunks: Chunks) -> AsyncIterator[memoryview]:
    """The pieces of ``chunks`` as they arrive; each is dropped once yielded."""
    arrived = asyncio.Event()
    chunks.listener = arrived.set
    index = 0
    try:
        while True:
            while index < len(chunks.parts):
                piece = chunks.parts[index]
                chunks.parts[index] = _EMPTY  # free it once the worker has it
                index += 1
                yield piece
            if chunks.complete:
                return
            if chunks.failed is not None:
                raise TransferAborted(chunks.failed)
            arrived.clear()
            await arrived.wait()
    finally:
        chunks.listener = None


_EMPTY = memoryview(b"")
#: Messages published under no pending request that nobody needs: the
#: server's own requests' statuses, and the echo of a finished cell's code.
_NOT_UNROUTED = frozenset({"status", "execute_input"})


class _FastSession(Session):  # type: ignore[misc]
    """jupyter_client's Session without the per-message date parsing.

    ``deserialize`` parsed every header's dates with dateutil and adapted
    the message version: together 0.3 ms of the server's time per message,
    several messages per cell. The server forwards headers, never reads
    their dates, and its workers speak the current protocol, so both steps
    are skipped; the signature and replay checks stay.
    """

    def deserialize(self, msg_list: list[Any], content: bool = True, copy: bool = True) -> dict[str, Any]:
        if not copy:
            msg_list = [bytes(part.bytes) for part in msg_list[:5]] + list(msg_list[5:])
        if len(msg_list) < 5:
            raise TypeError("malformed message, must have at least 5 elements")
        if self.auth is not None:
            signature = msg_list[0]
            if not signature:
                raise ValueError("Unsigned Message")
            if signature in self.digest_history:
                raise ValueError(f"Duplicate Signature: {signature!r}")
            if content:
                self._add_digest(signature)
            if not compare_digest(signature, self.sign(msg_list[1:5])):
                raise ValueError(f"Invalid Signature: {signature!r}")
        header = self.unpack(msg_list[1])
        buffers = [memoryview(b) for b in msg_list[5:]]
        if buffers and buffers[0].shape is None:
            buffers = [memoryview(bytes(b.bytes)) for b in msg_list[5:]]
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": self.unpack(msg_list[2]),
            "metadata": self.unpack(msg_list[3]),
            "content": self.unpack(msg_list[4]) if content else msg_list[4],
            "buffers": buffers,
        }


class _SpecManager(KernelSpecManager):  # type: ignore[misc]
    """Hands jupyter_client the worker's command line."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            # History in memory: IPython would write every cell of every user
            # to one history.sqlite in the server's home, a commit per cell.
            argv=[sys.executable, "-m", "remote_gpu_server.worker_kernel", "-f", "{connection_file}",
                  "--HistoryManager.hist_file=:memory:"],
            display_name="remote-gpu worker",
            language="python",
            interrupt_mode="signal",
        )


class _Pending:
    def __init__(self, on_iopub: IopubHandler | None) -> None:
        loop = asyncio.get_running_loop()
        self.on_iopub = on_iopub
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.idle: asyncio.Future[None] = loop.create_future()

    def fail(self, exc: BaseException) -> None:
        for fut in (self.reply, self.idle):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: one of them may never be awaited


class Worker:
    """One kernel process serving one session; see the module docstring.

    Call :meth:`start` once, then requests; call :meth:`kill` at the end (it
    kills the whole process group and removes the connection files).
    """

    def __init__(self, slots: list[Slot], runtime_dir: Path, startup_timeout: float = 120) -> None:
        self.slots = list(slots)
        self.name = f"w{next(_counter)}-{'+'.join(s.id for s in slots)}"
        self.runtime_dir = runtime_dir
        self.startup_timeout = startup_timeout
        self.language_info: dict[str, Any] = {}
        self.exit_description: str | None = None
        self._km: AsyncKernelManager | None = None
        self._kc: Any = None
        self._pending: dict[str, _Pending] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._comm_id = ""
        self._transfer_ids = itertools.count(1)
        self._transfers: dict[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._killed = False
        self._data: Any = None
        self._ring: transfer.Ring | None = None
        self.died = asyncio.Event()
        #: The comms open on this worker, as seen on its IOPub and shell traffic.
        self.comms = CommTable()
        #: Called with each output message published under no pending request.
        self.on_unrouted: IopubHandler | None = None

    @property
    def pid(self) -> int | None:
        process = getattr(self._km.provisioner, "process", None) if self._km else None
        return process.pid if process is not None else None

    @property
    def alive(self) -> bool:
        return self._km is not None and not self.died.is_set() and not self._killed

    async def start(self) -> None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(self.slots)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["RGPU_SLOTS"] = ",".join(s.id for s in self.slots)
        data_addr = f"ipc://{self.runtime_dir / self.name}-data"
        env["RGPU_DATA_ADDR"] = data_addr
        ring_fd = transfer.create_ring()
        env["RGPU_DATA_RING_FD"] = str(ring_fd)
        env.pop("JUPYTER_RUNTIME_DIR", None)
        km = AsyncKernelManager(kernel_name="rgpu-worker", kernel_spec_manager=_SpecManager(),
                                session=_FastSession())
        km.transport = "ipc"
        km.ip = str(self.runtime_dir / self.name)
        km.connection_file = str(self.runtime_dir / f"{self.name}.json")
        self._km = km
        try:
            self._ring = transfer.Ring(ring_fd)
            await km.start_kernel(env=env, pass_fds=(ring_fd,))
        finally:
            os.close(ring_fd)  # the worker has its own copy; the mapping stays
        kc = km.client()
        kc.start_channels()
        self._kc = kc
        self._data = zmq.asyncio.Context.instance().socket(zmq.PAIR)
        self._data.linger = 0
        self._data.sndhwm = self._data.rcvhwm = 0
        self._data.connect(data_addr)
        try:
            await kc.wait_for_ready(timeout=self.startup_timeout)
        except RuntimeError as exc:
            await self.kill()
            raise WorkerDied(f"worker {self.name} failed to start: {exc}", code="worker_died") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(kc.iopub_channel, self._on_iopub)),
            loop.create_task(self._read(kc.shell_channel, self._on_shell)),
            loop.create_task(self._read(kc.stdin_channel, self._on_stdin)),
            loop.create_task(self._watch()),
        ]
        info = await self.request("kernel_info_request", {})
        self.language_info = dict(info["content"].get("language_info") or {})
        self._comm_id = f"rgpu-{self.name}"
        self.comms.reserved = self._comm_id
        await self.request("comm_open", {"comm_id": self._comm_id, "target_name": COMM_TARGET, "data": {}})
        log.debug("worker %s ready (pid %s)", self.name, self.pid)

    # -- reading ------------------------------------------------------------

    async def _read(self, channel: Any, handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        session = self._kc.session
        while True:
            try:
                # A receive, not jupyter_client's poll-then-receive: a poll that
                # waits while a request is sent on the same socket can miss the
                # message that arrives meanwhile (its edge is taken by the send).
                frames = await channel.socket.recv_multipart(copy=False)
                _, frames = session.feed_identities(frames, copy=False)
                msg = session.deserialize(frames, copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # closed socket after a kill
                if not self.alive:
                    return
                log.exception("worker %s: unreadable message", self.name)
                continue
            try:
                await handle(msg)
            except Exception:
                log.exception("worker %s: error handling %s", self.name, msg.get("msg_type"))

    async def _on_iopub(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        msg_type = msg["msg_type"]
        content = msg["content"]
        if msg_type == "comm_msg" and content.get("comm_id") == self._comm_id:
            fut = self._transfers.pop(int(content["data"].get("id") or 0), None)
            if fut is not None and not fut.done():
                fut.set_result((content["data"], list(msg.get("buffers") or [])))
            return
        self.comms.published(msg_type, content)
        pending = self._pending.get(parent) if parent else None
        if pending is None:
            if self.on_unrouted is not None and msg_type not in _NOT_UNROUTED:
                await self.on_unrouted(msg)
            return
        if msg_type == "status":
            if content.get("execution_state") == "idle" and not pending.idle.done():
                pending.idle.set_result(None)
            return
        if pending.on_iopub is not None:
            await pending.on_iopub(msg)

    async def _on_shell(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        pending = self._pending.get(parent) if parent else None
        if pending is not None and not pending.reply.done():
            pending.reply.set_result(msg)

    async def _on_stdin(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        pending = self._pending.get(parent) if parent else None
        if pending is not None and pending.on_iopub is not None:
            await pending.on_iopub(msg)

    async def _watch(self) -> None:
        assert self._km is not None
        while True:
            await asyncio.sleep(DEATH_POLL_SECONDS)
            if self._killed:
                return
            code = await self._km.provisioner.poll() if self._km.provisioner else 0
            if code is not None:
                self.exit_description = describe_exit(code)
                log.warning("worker %s died (%s)", self.name, self.exit_description)
                self._fail_all(WorkerDied(self.death_message(), code="worker_died"))
                self.died.set()
                return

    def death_message(self) -> str:
        return (
            f"the worker process died ({self.exit_description}); its variables are gone. "
            "The session gets a fresh worker for the next cell."
        )

    def _fail_all(self, exc: BaseException) -> None:
        for pending in self._pending.values():
            pending.fail(exc)
        for fut in self._transfers.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._transfers.clear()

    # -- requests -----------------------------------------------------------

    def _check_alive(self) -> None:
        if self.died.is_set():
            raise WorkerDied(self.death_message(), code="worker_died")
        if self._killed or self._kc is None:
            raise WorkerDied(f"worker {self.name} was shut down", code="worker_died")

    async def request(self, msg_type: str, content: dict[str, Any], on_iopub: IopubHandler | None = None,
                      buffers: list[Any] | None = None, msg_id: str | None = None) -> dict[str, Any]:
        """Send a shell request; return the reply message once the kernel is idle.

        ``msg_id`` (a client's Jupyter request id) is the request's own id if
        given: raises :class:`DuplicateRequest` if one by that id is in
        flight, ValueError if it is not a short string. Comm messages have
        no shell reply: for them only the idle status is awaited and the
        returned message is empty.
        """
        self._check_alive()
        header = None
        if msg_id is not None:
            if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_MSG_ID:
                raise ValueError(f"a request's msg_id must be a string of 1 to {MAX_MSG_ID} characters")
            if msg_id in self._pending:
                raise DuplicateRequest(f"a request with msg_id {msg_id!r} is already running on this worker")
            header = self._kc.session.msg_header(msg_type)
            header["msg_id"] = msg_id
        msg = self._kc.session.msg(msg_type, content, header=header)
        msg_id = msg["header"]["msg_id"]
        pending = _Pending(on_iopub)
        self._pending[msg_id] = pending
        try:
            self._kc.session.send(self._kc.shell_channel.socket, msg, buffers=buffers)
            if msg_type in ("comm_open", "comm_msg", "comm_close"):  # no shell reply
                await pending.idle
                return {}
            reply = await pending.reply
            await pending.idle
            return dict(reply)
        finally:
            self._pending.pop(msg_id, None)

    async def execute(self, code: str, on_iopub: IopubHandler, *, silent: bool = False,
                      store_history: bool = True, allow_stdin: bool = False,
                      msg_id: str | None = None) -> dict[str, Any]:
        """Run ``code``; ``on_iopub`` gets every output message; returns the reply.

        ``msg_id`` as in :meth:`request`.
        """
        reply = await self.request(
            "execute_request",
            {"code": code, "silent": silent, "store_history": store_history,
             "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": True},
            on_iopub, msg_id=msg_id,
        )
        return dict(reply["content"])

    def _new_transfer(self) -> tuple[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]]:
        self._check_alive()
        tid = next(self._transfer_ids)
        fut: asyncio.Future[tuple[dict[str, Any], list[Any]]] = asyncio.get_running_loop().create_future()
        self._transfers[tid] = fut
        return tid, fut

    async def _comm_reply(self, tid: int, fut: asyncio.Future[tuple[dict[str, Any], list[Any]]],
                          request: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            await request
            # The comm reply is published on IOPub before the kernel goes idle.
            reply, _ = await asyncio.wait_for(fut, timeout=30)
            return reply
        finally:
            self._transfers.pop(tid, None)

    async def push(self, names: list[str], counts: list[int], buffers: list[Any]) -> dict[str, Any]:
        """Set variables in the worker; returns its comm reply (``ok`` or an error).

        ``buffers`` may be :class:`Chunks` still filling from the client's
        websocket: their pieces go on to the worker as they arrive. If such
        a stream breaks, or the worker gives up, the other side is told to
        drop the transfer and :class:`TransferAborted` is raised.
        """
        return await self.send_buffers({"op": "push", "names": names, "counts": counts}, buffers)

    async def op(self, data: dict[str, Any]) -> dict[str, Any]:
        """A transfer-comm operation without buffers (``chdir``); returns its reply."""
        tid, fut = self._new_transfer()
        return await self._comm_reply(tid, fut, self.request(
            "comm_msg", {"comm_id": self._comm_id, "data": {**data, "id": tid}}))

    async def send_buffers(self, data: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        """The transfer-comm operation ``data`` (``push``, ``upload``) whose
        ``buffers`` stream to the worker through the ring; see :meth:`push`."""
        tid, fut = self._new_transfer()
        request = asyncio.ensure_future(self.request(
            "comm_msg", {"comm_id": self._comm_id, "data": {**data, "id": tid}}))
        ring = self._ring
        assert ring is not None
        ring.begin(tid)
        try:
            await self._data.send_multipart(transfer.header(tid, [len(b) if isinstance(b, Chunks)
                                                                   else memoryview(b).nbytes for b in buffers]))
            for buf in buffers:
                parts = _stream(buf) if isinstance(buf, Chunks) else _iterate(transfer.pieces([buf]))
                async for piece in parts:
                    while not ring.free:  # the worker has every slot: wait until it hands one back
                        reason = ring.answer(*await self._recv_data(timeout=None))
                        if reason is not None:
                            raise TransferAborted(reason, worker_stopped=True)
                    self._check_alive()  # a kill unmaps the ring
                    await self._data.send_multipart(ring.put(piece))
            await self._data.send_multipart(transfer.end(tid))
        except TransferAborted as exc:
            if not exc.worker_stopped:
                await self._data.send_multipart(transfer.abort(tid, str(exc)))
            await self._comm_reply(tid, fut, request)
            raise
        except BaseException:
            request.cancel()
            self._transfers.pop(tid, None)
            raise
        return await self._comm_reply(tid, fut, request)

    async def pull(self, names: list[str]) -> tuple[dict[str, Any], AsyncIterator[Any] | None]:
        """Pickle variables in the worker: ``(reply, pieces)``.

        ``reply`` has ``names``, ``counts`` and ``sizes`` (or ``ok: false``
        and the error); ``pieces`` yields the buffers' bytes in order, each
        valid until the next is asked for, and must be consumed or closed
        (``contextlib.aclosing``) before the next transfer: closing it early
        tells the worker to stop and waits until it has.
        """
        return await self.receive_buffers({"op": "pull", "names": names})

    async def receive_buffers(self, data: dict[str, Any]) -> tuple[dict[str, Any], AsyncIterator[Any] | None]:
        """The transfer-comm operation ``data`` (``pull``, ``download``) whose
        answer's buffers stream back through the ring; see :meth:`pull`."""
        tid, fut = self._new_transfer()
        request = asyncio.ensure_future(self.request(
            "comm_msg", {"comm_id": self._comm_id, "data": {**data, "id": tid}}))
        request.add_done_callback(_retrieve)
        try:
            # The worker answers first and then sends the buffers, so its
            # request is still running when the answer is here.
            await asyncio.wait({fut, request}, return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                request.result()
            reply, _ = await asyncio.wait_for(fut, timeout=30)
        finally:
            self._transfers.pop(tid, None)
        if not reply.get("ok"):
            await request
            return reply, None
        return reply, self._receive(tid, request)

    async def _receive(self, tid: int, request: asyncio.Future[dict[str, Any]]) -> AsyncIterator[Any]:
        ring = self._ring
        assert ring is not None
        ring.begin(tid)
        finished = False
        try:
            while True:
                kind, payload = await self._recv_data(timeout=60)
                if kind == transfer.DATA:
                    taken = ring.take(payload)
                    if taken is None:
                        continue  # a piece of an earlier transfer nobody read
                    yield taken[0]
                    self._check_alive()  # a kill closes the socket and the ring
                    await self._data.send_multipart(taken[1])
                elif kind == transfer.END and transfer.tid_of(payload) == tid:
                    finished = True
                    return
                elif kind == transfer.ABORT and transfer.tid_of(payload) == tid:
                    finished = True
                    raise TransferAborted(transfer.parse_abort(payload)[1], worker_stopped=True)
        finally:
            if not finished and self.alive:
                await self._data.send_multipart(transfer.abort(tid, "the pull was not read to its end"))
            try:  # the worker's handler has returned: it no longer touches the ring
                await asyncio.wait_for(asyncio.shield(request), timeout=30)
            except Exception:
                pass

    async def _recv_data(self, timeout: float | None) -> tuple[bytes, bytes]:
        """The next note from the worker; TransferAborted if none comes in ``timeout``."""
        try:
            kind, payload = await self._data.recv_multipart(flags=zmq.NOBLOCK)
            return kind, payload
        except zmq.Again:
            pass
        recv = asyncio.ensure_future(self._data.recv_multipart())
        died = asyncio.ensure_future(self.died.wait())
        try:
            await asyncio.wait({recv, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not recv.done() or recv.cancelled() or recv.exception() is not None:
            # No note: a timeout, or the worker died and its kill closed the
            # socket under this read (cancelling it). Say which.
            recv.cancel()
            self._check_alive()
            raise TransferAborted("the worker stopped answering in the middle of a transfer")
        kind, payload = recv.result()
        return kind, payload

    def send_input(self, value: str) -> None:
        self._check_alive()
        self._kc.input(value)

    async def interrupt(self) -> None:
        if self.alive and self._km is not None:
            await self._km.interrupt_kernel()

    async def kill(self) -> None:
        """Kill the whole process group and clean up; safe to call twice."""
        if self._killed:
            return
        self._killed = True
        self._fail_all(WorkerDied(f"worker {self.name} was shut down", code="worker_died"))
        for task in self._tasks:
            task.cancel()
        if self._kc is not None:
            self._kc.stop_channels()
        if self._data is not None:
            self._data.close()
        if self._ring is not None:
            self._ring.close()
        if self._km is not None:
            try:
                await self._km.shutdown_kernel(now=True)
            except Exception:
                log.exception("worker %s: error during shutdown", self.name)
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
