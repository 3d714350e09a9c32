"""The server's end of a worker's data channel: where pushed and pulled bytes go.

Notes (:mod:`.transfer`) travel on a carrier (:mod:`.carriers`); the pieces
themselves travel in a :class:`~.transfer.Slots`: a shared-memory
:class:`~.transfer.Ring` when the worker runs on this host (notes on a
Unix socket pair; one copy in, one copy out, no socket copies), or
:class:`~.transfer.Inline` inside the notes when it runs on another host
(sealed records opened with mutual TLS). Either way at most the slots' worth of a transfer is in
flight, and a note of an abandoned transfer is skipped.

The channel knows nothing of Jupyter: the server asks its operations on
a worker here (:meth:`DataChannel.ask`, :mod:`.transfer_comm`), and their
bytes move through here. Every
wait also watches the worker's liveness, so a worker that dies in the
middle fails the transfer at once (:class:`TransferAborted` or the
worker's own ``WorkerDied``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

from remote_gpu_core.bulk_stream import pieces as relay_pieces
from remote_gpu_core.protocol.framing import Chunks

from ..errors import TransferAborted
from ..worker_process import transfer
from .carriers import SocketCarrier, TlsCarrier

__all__ = ["Carrier", "DataChannel", "Liveness", "TransferAborted"]

#: Seconds a transfer whose channel broke waits for the worker's death to be
#: noticed (its process is polled every 0.2 s), to say that rather than the break.
DEATH_NOTICED = 2.0


class Carrier(Protocol):
    """How notes travel (see :mod:`.carriers`)."""

    async def send(self, frames: Sequence[Any]) -> None: ...

    def recv_nowait(self) -> list[Any] | None: ...

    async def recv(self) -> list[Any]: ...

    def close(self) -> None: ...


class Liveness(Protocol):
    """The worker a transfer talks to: set ``died`` when it dies."""

    died: asyncio.Event

    def check_alive(self) -> None:
        """Raise the worker's ``WorkerDied`` if it is dead or shut down."""


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
                piece = chunks.release(index)  # forgotten there: freed once the worker has it
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


class DataChannel:
    """One worker's channel over ``carrier``, its pieces in ``slots``: the
    :class:`~.transfer.Ring` shared with a worker on this host, or an
    :class:`~.transfer.Inline` for a worker on another host.
    One transfer at a time: the caller ends each before the next begins.
    """

    def __init__(self, carrier: Carrier, slots: transfer.Slots) -> None:
        self.carrier = carrier
        self.slots = slots
        #: The operation asked last; its answer once read, and whether it returned.
        self._asked = 0
        self._answer: dict[str, Any] | None = None
        self._returned = False

    @classmethod
    def connect(cls, address: str, slots: transfer.Slots, context: Any) -> DataChannel:
        """To ``tls://HOST:PORT``, a worker on another host (``context``: a pinned TLS context)."""
        host, _, port = address[len("tls://"):].rpartition(":")
        return cls(TlsCarrier(host.strip("[]"), int(port), context), slots)

    @classmethod
    def over(cls, sock: socket.socket, ring: transfer.Ring) -> DataChannel:
        """On the server's end of the socket pair to a worker on this host, sharing ``ring``."""
        return cls(SocketCarrier(sock), ring)

    async def send(self, tid: int, buffers: Sequence[Any], worker: Liveness) -> None:
        """Send a push's ``buffers`` (bytes-like, or :class:`Chunks` still filling).

        Raises :class:`TransferAborted` if a stream breaks or the worker
        gives up; the worker is told to drop the transfer unless it gave up.
        """
        slots = self.slots
        slots.begin(tid)
        sizes = [len(b) if isinstance(b, Chunks) else memoryview(b).nbytes for b in buffers]
        try:
            await self._send(transfer.header(tid, sizes), worker)
            for buf in buffers:
                parts = _stream(buf) if isinstance(buf, Chunks) else _iterate(transfer.pieces([buf]))
                async for piece in parts:
                    while not slots.free:  # the worker has every slot: wait until it hands one back
                        kind, payload, *_ = await self._recv(worker, timeout=None)
                        if self._keep(kind, payload) == tid:
                            return  # the worker answered the push before its end: it takes no more
                        reason = slots.answer(kind, payload)
                        if reason is not None:
                            raise TransferAborted(reason, worker_stopped=True)
                    worker.check_alive()  # a kill unmaps the ring
                    note = slots.put(piece)
                    if slots.copies:  # the bytes are in the ring now: the piece may serve again
                        relay_pieces.give(piece)
                    del piece
                    await self._send(note, worker)
            await self._send(transfer.end(tid), worker)
        except TransferAborted as exc:
            if not exc.worker_stopped:
                await self.abort(tid, str(exc))
            raise

    async def receive(self, tid: int, worker: Liveness) -> AsyncIterator[memoryview]:
        """The pieces of a pull, in order, each valid until the next is asked for.

        Closing the iterator before its end tells the worker to stop.
        """
        slots = self.slots
        slots.begin(tid)
        finished = False
        try:
            while True:
                kind, payload, *rest = await self._recv(worker, timeout=60)
                self._keep(kind, payload)
                if kind == transfer.DATA:
                    taken = slots.take(payload, rest)
                    if taken is None:
                        continue  # a piece of an earlier transfer nobody read
                    yield taken[0]
                    worker.check_alive()  # a kill closes the socket and the ring
                    await self._send(taken[1], worker)
                elif kind == transfer.END and transfer.tid_of(payload) == tid:
                    finished = True
                    return
                elif kind == transfer.ABORT and transfer.tid_of(payload) == tid:
                    finished = True
                    raise TransferAborted(transfer.parse_abort(payload)[1], worker_stopped=True)
        finally:
            if not finished and not worker.died.is_set():
                try:
                    await self.abort(tid, "the pull was not read to its end")
                except Exception:
                    pass  # the channel is gone with the worker

    async def ask(self, tid: int, data: dict[str, Any], worker: Liveness) -> None:
        """Ask the worker operation ``data`` as ``tid`` (see :mod:`..worker_process.operations`).

        What waits unread is dropped first: notes of transfers that ended, and
        whatever the worker's code sent (an answer made up before this was asked).
        """
        try:
            while self.carrier.recv_nowait() is not None:
                pass
        except ConnectionError:
            pass  # a sealed stream broke: the send below connects again
        self._asked, self._answer, self._returned = tid, None, False
        await self._send(transfer.operation(tid, data), worker)

    async def answer(self, worker: Liveness) -> dict[str, Any]:
        """The worker's answer to the operation asked last, however long it takes, unless the worker dies."""
        while self._answer is None:
            kind, payload, *_ = await self._recv(worker, timeout=None)
            self._keep(kind, payload)
        return self._answer

    async def returned(self, worker: Liveness, timeout: float) -> None:
        """Wait until the worker's handler of the operation asked last (a pull,
        a download) has sent its buffers; notes of those buffers left unread are skipped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._returned:
            kind, payload, *_ = await self._recv(worker, timeout=deadline - asyncio.get_running_loop().time())
            self._keep(kind, payload)

    def _keep(self, kind: bytes, payload: Any) -> int | None:
        """Keep the answer to the operation asked, or its return, if a read
        came across it (its id); whatever else, of an operation nobody waits
        for or not an answer at all (a worker runs its user's code), is dropped."""
        if kind == transfer.REPLY:
            data = transfer.parse_json(payload)
            if data is not None and data["id"] == self._asked:
                self._answer = data
                return self._asked
        elif kind == transfer.RETURNED and bytes(payload) == transfer.returned(self._asked)[1]:
            self._returned = True
        return None

    async def abort(self, tid: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError):  # a channel that broke has nobody to tell
            await self.carrier.send(transfer.abort(tid, reason))

    async def _send(self, frames: Sequence[Any], worker: Liveness) -> None:
        try:
            await self.carrier.send(frames)
        except ConnectionError as exc:
            raise await self._broke(worker, exc) from None

    @staticmethod
    async def _broke(worker: Liveness, exc: BaseException) -> TransferAborted:
        """The channel broke under a send or a read: raises the worker's death
        if that was why (noticed within a poll of its process), else the
        :class:`TransferAborted` to raise. A stream to another host is opened
        anew by the next transfer; a socket pair broke for good, which the
        worker's own code can do."""
        worker.check_alive()  # shut down, or its death noticed already
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.died.wait(), DEATH_NOTICED)
        worker.check_alive()
        return TransferAborted(f"{exc}; if it fails again, restart the kernel for a new worker",
                               worker_stopped=True)

    async def _recv(self, worker: Liveness, timeout: float | None) -> list[Any]:
        """The next note from the worker; TransferAborted if none comes in ``timeout``."""
        ready = self.carrier.recv_nowait()
        if ready is not None:
            return ready
        recv = asyncio.ensure_future(self.carrier.recv())
        died = asyncio.ensure_future(worker.died.wait())
        try:
            await asyncio.wait({recv, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not recv.done():  # given up (or this wait was cancelled): a read left running would take a note
                recv.cancel()
        error = recv.exception() if recv.done() and not recv.cancelled() else None
        if isinstance(error, ConnectionError):
            raise await self._broke(worker, error)
        if not recv.done() or recv.cancelled() or recv.exception() is not None:
            # No note: a timeout, or the worker died and its kill closed the
            # socket under this read (cancelling it). Say which.
            recv.cancel()
            worker.check_alive()
            raise TransferAborted("the worker stopped answering in the middle of a transfer")
        frames = recv.result()
        return frames

    def close(self) -> None:
        self.carrier.close()
        self.slots.close()
