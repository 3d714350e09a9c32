"""The server's end of a worker's data channel: where pushed and pulled bytes go.

Notes (:mod:`.transfer`) travel on a private ZMQ PAIR socket; the pieces
themselves travel in a :class:`~.transfer.Slots`: a shared-memory
:class:`~.transfer.Ring` when the worker runs on this host (one copy in,
one copy out, no socket copies), or :class:`~.transfer.Inline` inside the
notes when it runs on another host, over TCP encrypted with CurveZMQ.
Either way at most the slots' worth of a transfer is in flight, and a
note of an abandoned transfer is skipped.

The channel knows nothing of Jupyter: the worker handle (:mod:`.worker`)
asks for a transfer over its comm and moves the bytes through here. Every
wait also watches the worker's liveness, so a worker that dies in the
middle fails the transfer at once (:class:`TransferAborted` or the
worker's own ``WorkerDied``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

import zmq
import zmq.asyncio

from remote_gpu_kernel.protocol.framing import Chunks

from . import transfer

__all__ = ["DataChannel", "Liveness", "TransferAborted", "curve_client"]


class TransferAborted(ConnectionError):
    """A push or pull stream broke before its end (client or worker gone).

    ``worker_stopped`` says the worker gave up itself and needs no notice.
    """

    def __init__(self, reason: str, worker_stopped: bool = False) -> None:
        super().__init__(reason)
        self.worker_stopped = worker_stopped


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


def curve_client(socket: zmq.Socket[Any], server_public: bytes) -> None:
    """Make ``socket`` a CurveZMQ client of a server with public key ``server_public``
    (Z85), with a key pair of its own; call before ``connect``."""
    public, secret = zmq.curve_keypair()
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class DataChannel:
    """One worker's channel, connected to ``address`` (the worker binds it).

    ``slots`` is the :class:`~.transfer.Ring` shared with the worker, or an
    :class:`~.transfer.Inline` for a worker on another host, whose socket is
    then encrypted with the worker's CurveZMQ public key ``curve_key``.
    One transfer at a time: the caller ends each before the next begins.
    """

    def __init__(self, address: str, slots: transfer.Slots, curve_key: bytes | None = None) -> None:
        self.address = address
        self.slots = slots
        socket = zmq.asyncio.Context.instance().socket(zmq.PAIR)
        socket.linger = 0
        socket.sndhwm = socket.rcvhwm = 0
        if curve_key is not None:
            curve_client(socket, curve_key)
        socket.connect(address)
        self._socket = socket

    async def send(self, tid: int, buffers: Sequence[Any], worker: Liveness) -> None:
        """Send a push's ``buffers`` (bytes-like, or :class:`Chunks` still filling).

        Raises :class:`TransferAborted` if a stream breaks or the worker
        gives up; the worker is told to drop the transfer unless it gave up.
        """
        slots = self.slots
        slots.begin(tid)
        sizes = [len(b) if isinstance(b, Chunks) else memoryview(b).nbytes for b in buffers]
        try:
            await self._socket.send_multipart(transfer.header(tid, sizes))
            for buf in buffers:
                parts = _stream(buf) if isinstance(buf, Chunks) else _iterate(transfer.pieces([buf]))
                async for piece in parts:
                    while not slots.free:  # the worker has every slot: wait until it hands one back
                        kind, payload, *_ = await self._recv(worker, timeout=None)
                        reason = slots.answer(kind, payload)
                        if reason is not None:
                            raise TransferAborted(reason, worker_stopped=True)
                    worker.check_alive()  # a kill unmaps the ring
                    await self._socket.send_multipart(slots.put(piece), copy=False)
            await self._socket.send_multipart(transfer.end(tid))
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
                if kind == transfer.DATA:
                    taken = slots.take(payload, rest)
                    if taken is None:
                        continue  # a piece of an earlier transfer nobody read
                    yield taken[0]
                    worker.check_alive()  # a kill closes the socket and the ring
                    await self._socket.send_multipart(taken[1])
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
                except zmq.ZMQError:
                    pass

    async def abort(self, tid: int, reason: str) -> None:
        await self._socket.send_multipart(transfer.abort(tid, reason))

    async def _recv(self, worker: Liveness, timeout: float | None) -> list[Any]:
        """The next note from the worker; TransferAborted if none comes in ``timeout``."""
        try:
            frames: list[Any] = await self._socket.recv_multipart(flags=zmq.NOBLOCK)
            return frames
        except zmq.Again:
            pass
        recv = asyncio.ensure_future(self._socket.recv_multipart())
        died = asyncio.ensure_future(worker.died.wait())
        try:
            await asyncio.wait({recv, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not recv.done() or recv.cancelled() or recv.exception() is not None:
            # No note: a timeout, or the worker died and its kill closed the
            # socket under this read (cancelling it). Say which.
            recv.cancel()
            worker.check_alive()
            raise TransferAborted("the worker stopped answering in the middle of a transfer")
        frames = recv.result()
        return frames

    def close(self) -> None:
        self._socket.close()
        self.slots.close()
