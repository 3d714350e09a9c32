"""The server's ends of a data channel's carriers (see
:mod:`remote_gpu_server.worker_process.sealed`, which holds the format and
the worker's ends): a ZMQ PAIR socket for a worker on this host, and a
sealed TLS stream for a worker on another host; and the key and
certificate each end of such a stream is made with.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any, cast

from ..certificates import make_certificate
from ..worker_process.sealed import HANDSHAKE_TIMEOUT, WRITES_AHEAD, SealedStream, open_stream
from ..worker_process.streams import note_parts, read_note

__all__ = ["PairCarrier", "TlsCarrier", "make_identity"]


def make_identity(role: str) -> tuple[bytes, bytes]:
    """A fresh key and self-signed certificate (PEM) for one end of one channel;
    ``role`` is ``server`` (the worker, which listens) or ``client``."""
    return make_certificate(f"remote-gpu data channel {role}", client=role != "server")

class PairCarrier:
    """The server's end over a ZMQ PAIR socket (the worker binds ``address``)."""

    def __init__(self, address: str) -> None:
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        socket_ = zmq.asyncio.Context.instance().socket(zmq.PAIR)
        socket_.linger = 0
        socket_.sndhwm = socket_.rcvhwm = 0
        socket_.connect(address)
        self._socket = socket_

    async def send(self, frames: Sequence[Any]) -> None:
        await self._socket.send_multipart(list(frames), copy=False)

    def recv_nowait(self) -> list[Any] | None:
        try:
            # pyzmq types the answer as an Awaitable; with NOBLOCK it is an
            # asyncio.Future already done: the frames, or zmq.Again.
            done = cast("asyncio.Future[list[Any]]", self._socket.recv_multipart(flags=self._zmq.NOBLOCK))
            return done.result()
        except self._zmq.Again:
            return None

    async def recv(self) -> list[Any]:
        frames: list[Any] = await self._socket.recv_multipart()
        return frames

    def close(self) -> None:
        self._socket.close()

class TlsCarrier:
    """The server's end of a :class:`SealedStream`, opened on first use.

    The stream is read and written by threads of its own (the socket lets
    go of the GIL while it moves bytes), so the event loop only hands
    frames over: asyncio's own TLS transport, measured here, carried less
    than half as much as threads on TLS did. :meth:`send` returns
    once the note is queued for the writing thread, up to
    :data:`WRITES_AHEAD` notes ahead of it (a failed write raises at a
    later send); the frames must not change after. Notes read wait in a
    queue, so a wait on :meth:`recv` can be given up without leaving the
    stream half read.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self._conn: SealedStream | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rgpu-tls-write")
        self._reader: threading.Thread | None = None
        self._notes: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._writes: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def _connect(self) -> SealedStream:
        raw = socket.create_connection((self.host, self.port), timeout=HANDSHAKE_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return open_stream(raw, self.context, server_side=False)

    async def _open(self) -> SealedStream:
        if self._conn is not None and self._reader is not None and not self._reader.is_alive():
            self._drop()  # the stream broke: the next transfer connects again
            while not self._notes.empty():
                self._notes.get_nowait()
        if self._conn is None:
            loop = asyncio.get_running_loop()
            conn = await loop.run_in_executor(self._writer, self._connect)
            self._conn = conn
            self._reader = threading.Thread(target=self._read, args=(conn, loop), daemon=True,
                                            name="rgpu-tls-read")
            self._reader.start()
        return self._conn

    def _read(self, conn: SealedStream, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                note = read_note(conn.recv_into)
                loop.call_soon_threadsafe(self._notes.put_nowait, note)
        except (OSError, ValueError) as exc:
            if not self._closed:
                error = ConnectionError(f"the worker's data channel closed: {exc}")
                with contextlib.suppress(RuntimeError):  # the loop is gone at the end
                    loop.call_soon_threadsafe(self._notes.put_nowait, error)

    async def send(self, frames: Sequence[Any]) -> None:
        async with self._lock:
            conn = await self._open()
            writes = self._writes
            writes.append(asyncio.get_running_loop().run_in_executor(
                self._writer, conn.send_parts, note_parts(frames)))
            while writes and (writes[0].done() or len(writes) > WRITES_AHEAD):
                await writes.popleft()  # raises what a write raised

    def recv_nowait(self) -> list[Any] | None:
        try:
            note = self._notes.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(note, BaseException):
            raise note
        return note

    async def recv(self) -> list[Any]:
        async with self._lock:
            await self._open()
        note = await self._notes.get()
        if isinstance(note, BaseException):
            raise note
        return note

    def _drop(self) -> None:
        for write in self._writes:  # on a stream that broke: their errors were said by the reader
            write.add_done_callback(_retrieve)
        self._writes.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._closed = True
        self._drop()
        self._writer.shutdown(wait=False)

def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
