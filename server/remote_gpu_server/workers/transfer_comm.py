"""The server's operations on one worker (take on a lease, push, pull,
upload, download, park, restore), and its own comm there.

Each operation carries an ``id``. It is a note on the worker's data
channel, and so is the answer (:meth:`.DataChannel.ask`; see
:mod:`..worker_process.operations`), as are the buffers of a push or an
upload, and of a pull's or a download's answer (:mod:`.datachannel`).

The comm, which the worker handle opens once the kernel answers (its id
is reserved: clients cannot use it, see :mod:`.comms`), carries what the
worker asks unprompted, while a cell runs: ``{"op": "fetch", "fetch": N,
"path": NAME}`` when the cell opened a file its session's folder lacks
(see :mod:`..worker_process.fetch`). That goes to
:attr:`TransferComm.on_fetch` (the session's, while a cell of a client
that serves files runs); with none set, the fetch is refused at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from remote_gpu_core.protocol import messages as m

from ..worker_process.fetch import FETCH_TIDS, fetch_tid, refusal_reason
from ..worker_process.kernel import COMM_TARGET
from .datachannel import DataChannel, Liveness, TransferAborted

__all__ = ["CommWorker", "FetchHandler", "MAX_FETCH_PATH", "OPERATION_TIMEOUT", "TransferComm"]

#: Told of a fetch the worker asked for: ``(fetch number, path)``.
FetchHandler = Callable[[int, str], None]

log = logging.getLogger("remote_gpu_server")

#: The longest path a worker's fetch may name (Linux's PATH_MAX).
MAX_FETCH_PATH = 4096
#: How long the worker may take to say that a pull's handler returned, once its buffers came, in seconds.
OPERATION_TIMEOUT = 30.0


class CommWorker(Liveness, Protocol):
    """What the comm uses of its worker's handle (:class:`~.worker.Worker`)."""

    async def request(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Send a shell request; return once the kernel is idle after it."""

    async def settled(self) -> None:
        """Once the worker may take a request (it took on its lease)."""


class TransferComm:
    """The server's operations and comm on one worker; see the module docstring.

    Call :meth:`open` once the kernel answers, and :meth:`answer` with each
    message the worker publishes on the comm.
    """

    def __init__(self, worker: CommWorker, data: DataChannel) -> None:
        self.worker = worker
        self.data = data
        #: The comm's id, once :meth:`open` has opened it.
        self.comm_id = ""
        self._last = 0
        #: Who serves the worker's fetches now (see the module docstring).
        self.on_fetch: FetchHandler | None = None
        self._refusing: set[asyncio.Task[None]] = set()

    async def open(self, comm_id: str) -> None:
        """Open the comm as ``comm_id`` on the worker's kernel extension."""
        self.comm_id = comm_id
        await self.worker.request("comm_open", {"comm_id": comm_id, "target_name": COMM_TARGET, "data": {}})

    def answer(self, data: dict[str, Any]) -> None:
        """The worker published ``data`` on the comm: a fetch (anything else is dropped)."""
        if data.get("op") == "fetch":
            self._fetch(data)

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

    async def op(self, data: dict[str, Any]) -> dict[str, Any]:
        """Run the operation ``data`` (no buffers either way); returns its reply."""
        await self._ask(data)
        return await self.data.answer(self.worker)

    async def _ask(self, data: dict[str, Any]) -> int:
        """Ask operation ``data``, once the worker may take it; its id."""
        await self.worker.settled()
        self.worker.check_alive()
        # Not the next of a count: a cell can write answers into its worker's
        # channel before an operation is asked, and may not guess its id.
        tid = self._last
        while tid == self._last:
            tid = 1 + secrets.randbelow(FETCH_TIDS - 1)  # below the worker's fetches' ids
        self._last = tid
        await self.data.ask(tid, data, self.worker)
        return tid

    async def send_buffers(self, data: dict[str, Any], buffers: list[Any]) -> dict[str, Any]:
        """The operation ``data`` (``push``, ``upload``) whose ``buffers`` stream to
        the worker through the data channel; returns its reply (``ok`` or an error).

        ``buffers`` may be :class:`~remote_gpu_core.protocol.framing.Chunks` still
        filling from the client's websocket: their pieces go on to the worker
        as they arrive. If such a stream breaks, or the worker gives up, the
        other side is told to drop the transfer and :class:`TransferAborted`
        is raised, once the worker answered.
        """
        tid = await self._ask(data)
        try:
            await self.data.send(tid, buffers, self.worker)
        except TransferAborted:
            await self.data.answer(self.worker)
            raise
        return await self.data.answer(self.worker)

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
        tid = await self._ask(data)
        reply = await self.data.answer(self.worker)
        if not reply.get("ok"):
            return reply, None
        return reply, self._receive(tid)

    async def _receive(self, tid: int) -> AsyncGenerator[Any, None]:
        try:
            async for piece in self.data.receive(tid, self.worker):
                yield piece
        finally:
            try:  # the worker's handler has returned: it no longer touches the ring
                await self.data.returned(self.worker, OPERATION_TIMEOUT)
            except Exception:
                pass
