"""The server's operations on one worker (take on a lease, push, pull,
upload, download, park, restore), and its own comm there.

Each operation carries an ``id``. To a worker on this host it is a note on
the data channel, and so is the answer (:meth:`.DataChannel.ask`; see
:mod:`..worker_process.operations` for why). To a worker on another host,
whose data channel is a sealed stream, it is a ``comm_msg`` on a comm that
the worker handle opens once the kernel answers (its id is reserved:
clients cannot use it, see :mod:`.comms`), and the worker publishes its
reply on IOPub under the same comm and ``id``, before its ``idle``. The
buffers of a push or an upload, and of a pull's or a download's answer,
move through the worker's data channel (:mod:`.datachannel`).

The worker also asks on this comm, unprompted, while a cell runs: ``{"op":
"fetch", "fetch": N, "path": NAME}`` when the cell opened a file its
session's folder lacks (see :mod:`..worker_process.fetch`). That goes to
:attr:`TransferComm.on_fetch` (the session's, while a cell of a client
that serves files runs); with none set, the fetch is refused at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

from remote_gpu_core.protocol import messages as m

from ..worker_process.fetch import fetch_tid, refusal_reason
from ..worker_process.kernel import COMM_TARGET
from .datachannel import DataChannel, Liveness, TransferAborted

__all__ = ["CommWorker", "FetchHandler", "MAX_FETCH_PATH", "OPERATION_TIMEOUT", "Reply", "TransferComm"]

#: Told of a fetch the worker asked for: ``(fetch number, path)``.
FetchHandler = Callable[[int, str], None]

log = logging.getLogger("remote_gpu_server")

#: An operation's reply and the buffers that came with it on IOPub.
Reply = tuple[dict[str, Any], list[Any]]
#: The longest path a worker's fetch may name (Linux's PATH_MAX).
MAX_FETCH_PATH = 4096
#: How long the worker may take to reply to an operation once its request is done, in seconds.
OPERATION_TIMEOUT = 30.0


class CommWorker(Liveness, Protocol):
    """What the comm uses of its worker's handle (:class:`~.worker.Worker`)."""

    async def request(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Send a shell request; return once the kernel is idle after it."""

    async def settled(self) -> None:
        """Once the worker may take a request (it took on its lease)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its caller learns it another way."""
    if not future.cancelled():
        future.exception()


class TransferComm:
    """The server's comm on one worker; see the module docstring.

    Call :meth:`open` once the kernel answers, :meth:`answer` with each
    message the worker publishes on the comm, and :meth:`fail_all` when the
    worker dies or is killed.
    """

    def __init__(self, worker: CommWorker, data: DataChannel) -> None:
        self.worker = worker
        self.data = data
        #: The comm's id, once :meth:`open` has opened it.
        self.comm_id = ""
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Reply]] = {}
        #: Who serves the worker's fetches now (see the module docstring).
        self.on_fetch: FetchHandler | None = None
        self._refusing: set[asyncio.Task[None]] = set()

    async def open(self, comm_id: str) -> None:
        """Open the comm as ``comm_id`` on the worker's kernel extension."""
        self.comm_id = comm_id
        await self.worker.request("comm_open", {"comm_id": comm_id, "target_name": COMM_TARGET, "data": {}})

    def answer(self, data: dict[str, Any], buffers: list[Any]) -> None:
        """The worker published ``data`` on the comm: the reply to the operation
        whose ``id`` it carries (none waits for it any more: dropped), or a fetch."""
        if data.get("op") == "fetch":
            self._fetch(data)
            return
        fut = self._replies.pop(int(data.get("id") or 0), None)
        if fut is not None and not fut.done():
            fut.set_result((data, buffers))

    def _fetch(self, data: dict[str, Any]) -> None:
        fetch, path = data.get("fetch"), data.get("path")
        if not isinstance(fetch, int) or not 0 < fetch < 1 << 31 or not isinstance(path, str):
            return  # not a fetch this worker's code would ask: nothing waits for an answer
        if len(path) > MAX_FETCH_PATH:
            self._refuse_soon(fetch, m.FetchRefusal.REFUSED, f"a path of {len(path)} characters is not a file name")
        elif self.on_fetch is not None:
            self.on_fetch(fetch, path)
        else:
            self._refuse_soon(fetch, m.FetchRefusal.OFF, "no cell of a client that serves files runs now")

    def _refuse_soon(self, fetch: int, refusal: m.FetchRefusal, message: str) -> None:
        task = asyncio.get_running_loop().create_task(self.refuse(fetch, refusal_reason(refusal.value, message)))
        self._refusing.add(task)
        task.add_done_callback(self._refusing.discard)

    async def refuse(self, fetch: int, reason: str) -> None:
        """Tell the worker that fetch ``fetch`` brings no file (``reason``: see
        :func:`~..worker_process.fetch.refusal_reason`); a channel gone with its
        worker is left alone."""
        try:
            await self.data.abort(fetch_tid(fetch), reason)
        except Exception as exc:
            log.info("a fetch's refusal did not reach its worker: %s", exc)

    def fail_all(self, exc: BaseException) -> None:
        """Every operation waiting for its reply fails with ``exc``."""
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._replies.clear()

    async def op(self, data: dict[str, Any]) -> dict[str, Any]:
        """Run the operation ``data`` (no buffers either way); returns its reply."""
        if self.data.answers:
            await self._ask(data)
            return await self.data.answer(self.worker)
        tid, fut = self._new()
        return await self._reply(tid, fut, self._send(data, tid))

    def _tid(self) -> int:
        self.worker.check_alive()
        return next(self._ids)

    async def _ask(self, data: dict[str, Any]) -> int:
        """Ask operation ``data`` on the data channel, once the worker may take it; its id."""
        await self.worker.settled()
        tid = self._tid()
        await self.data.ask(tid, data)
        return tid

    def _new(self) -> tuple[int, asyncio.Future[Reply]]:
        """A comm request's id and the future its reply sets."""
        tid = self._tid()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[tid] = fut
        return tid, fut

    def _send(self, data: dict[str, Any], tid: int) -> Awaitable[dict[str, Any]]:
        return self.worker.request("comm_msg", {"comm_id": self.comm_id, "data": {**data, "id": tid}})

    async def _reply(self, tid: int, fut: asyncio.Future[Reply],
                     request: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            await request
            # The comm reply is published on IOPub before the kernel goes idle.
            reply, _ = await asyncio.wait_for(fut, timeout=OPERATION_TIMEOUT)
            return reply
        finally:
            self._replies.pop(tid, None)

    async def send_buffers(self, data: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        """The operation ``data`` (``push``, ``upload``) whose ``buffers`` stream to
        the worker through the data channel; returns its reply (``ok`` or an error).

        ``buffers`` may be :class:`~remote_gpu_core.protocol.framing.Chunks` still
        filling from the client's websocket: their pieces go on to the worker
        as they arrive. If such a stream breaks, or the worker gives up, the
        other side is told to drop the transfer and :class:`TransferAborted`
        is raised.
        """
        if self.data.answers:
            tid = await self._ask(data)
            try:
                await self.data.send(tid, buffers, self.worker)
            except TransferAborted:
                await self.data.answer(self.worker)
                raise
            return await self.data.answer(self.worker)
        tid, fut = self._new()
        request = asyncio.ensure_future(self._send(data, tid))
        try:
            await self.data.send(tid, buffers, self.worker)
        except TransferAborted:
            await self._reply(tid, fut, request)
            raise
        except BaseException:
            request.cancel()
            self._replies.pop(tid, None)
            raise
        return await self._reply(tid, fut, request)

    async def receive_buffers(self, data: dict[str, Any]
                              ) -> tuple[dict[str, Any], AsyncGenerator[Any, None] | None]:
        """The operation ``data`` (``pull``, ``download``) whose answer's buffers
        stream back through the data channel: ``(reply, pieces)``.

        ``reply`` has ``sizes`` (or ``ok: false`` and the error, and ``pieces``
        is None); ``pieces`` yields the buffers' bytes in order, each valid
        until the next is asked for, and must be consumed or closed
        (``contextlib.aclosing``) before the next transfer: closing it early
        tells the worker to stop and waits until it has.
        """
        if self.data.answers:
            tid = await self._ask(data)
            reply = await self.data.answer(self.worker)
            if not reply.get("ok"):
                return reply, None
            return reply, self._receive(tid, lambda: self.data.returned(self.worker, OPERATION_TIMEOUT))
        tid, fut = self._new()
        request = asyncio.ensure_future(self._send(data, tid))
        request.add_done_callback(_retrieve)
        try:
            # The worker answers first and then sends the buffers, so its
            # request is still running when the answer is here.
            first: set[asyncio.Future[Any]] = {fut, request}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                request.result()
            reply, _ = await asyncio.wait_for(fut, timeout=OPERATION_TIMEOUT)
        finally:
            self._replies.pop(tid, None)
        if not reply.get("ok"):
            await request
            return reply, None
        return reply, self._receive(tid, lambda: asyncio.wait_for(asyncio.shield(request), timeout=OPERATION_TIMEOUT))

    async def _receive(self, tid: int, returned: Callable[[], Awaitable[Any]]) -> AsyncGenerator[Any, None]:
        """The pieces of transfer ``tid``; at the end, waits for ``returned`` (the
        worker's handler has returned: it no longer touches the ring)."""
        try:
            async for piece in self.data.receive(tid, self.worker):
                yield piece
        finally:
            try:
                await returned()
            except Exception:
                pass
