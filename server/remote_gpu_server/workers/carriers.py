"""The server's ends of a data channel's carriers (see
:mod:`remote_gpu_server.worker_process.streams`, which holds the format and
the worker's ends): a Unix socket pair for a worker on this host, and a
sealed TLS stream for a worker on another host; and the key and
certificate each end of such a stream is made with.

Either end reads at most :data:`NOTES_AHEAD` notes ahead of the server,
each at most :data:`~remote_gpu_server.worker_process.streams.MAX_NOTE`
bytes: a worker runs its user's code, which may write anything on its end,
and what it writes beyond that waits in the worker's process.
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
from typing import Any

from ..certificates import make_certificate
from ..worker_process.sealed import HANDSHAKE_TIMEOUT, WRITES_AHEAD, SealedStream, open_stream
from ..worker_process.streams import note_bytes, note_parts, read_note, read_note_from

__all__ = ["NOTES_AHEAD", "SocketCarrier", "TlsCarrier", "make_identity"]


def make_identity(role: str) -> tuple[bytes, bytes]:
    """A fresh key and self-signed certificate (PEM) for one end of one channel;
    ``role`` is ``server`` (the worker, which listens) or ``client``."""
    return make_certificate(f"remote-gpu data channel {role}", client=role != "server")

#: Notes a carrier reads ahead of the server: beyond them the worker's
#: writes wait, in its own process. A transfer has at most its ring's
#: slots' worth of pieces out (:data:`.transfer.RING_SLOTS`) and three notes
#: besides, so it never waits here.
NOTES_AHEAD = 8
#: Bytes the socket pair's reader buffers beyond a note it is reading.
_BUFFER = 64 << 10


class SocketCarrier:
    """The server's end of the socket pair to a worker on this host, on the
    event loop: a task reads its notes into a queue of :data:`NOTES_AHEAD`,
    and stops reading while the queue is full."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._notes: asyncio.Queue[list[Any]] = asyncio.Queue(NOTES_AHEAD)
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._broken: ConnectionError | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> asyncio.StreamWriter:
        if self._writer is None:  # once: every note after takes no lock
            async with self._lock:
                if self._writer is None:
                    reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=_BUFFER)
                    self._reading = asyncio.get_running_loop().create_task(self._read(reader))
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                note = await read_note_from(reader.readexactly)
                await self._notes.put(note)
        except Exception as exc:  # the worker left, or wrote what is not a note
            self._broken = ConnectionError(f"the worker's data channel closed: {exc}")
            if self._writer is not None:
                self._writer.close()  # and its socket: what the worker writes goes nowhere

    async def send(self, frames: Sequence[Any]) -> None:
        writer = await self._open()
        if self._broken is not None:
            raise self._broken
        writer.writelines(note_bytes(frames))
        await writer.drain()

    def recv_nowait(self) -> list[Any] | None:
        try:
            return self._notes.get_nowait()
        except asyncio.QueueEmpty:
            if self._broken is not None:
                raise self._broken from None
            return None

    async def recv(self) -> list[Any]:
        await self._open()
        reading = self._reading
        assert reading is not None
        while True:
            ready = self.recv_nowait()
            if ready is not None:
                return ready
            if reading.done():  # it broke, or the carrier was closed
                raise self._broken or ConnectionError("the worker's data channel is closed")
            get = asyncio.ensure_future(self._notes.get())
            try:
                await asyncio.wait({get, reading}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()  # a note it was woken for stays in the queue
            if get.done() and not get.cancelled():
                return get.result()

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()


class TlsCarrier:
    """The server's end of a :class:`SealedStream`, opened on first use.

    The stream is read and written by threads of its own (the socket lets
    go of the GIL while it moves bytes), so the event loop only hands
    frames over: asyncio's own TLS transport, measured here, carried less
    than half as much as threads on TLS did. :meth:`send` returns
    once the note is queued for the writing thread, up to
    :data:`WRITES_AHEAD` notes ahead of it (a failed write raises at a
    later send); the frames must not change after. Notes read wait in a
    queue (at most :data:`NOTES_AHEAD`), so a wait on :meth:`recv` can be
    given up without leaving the stream half read.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self._conn: SealedStream | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rgpu-tls-write")
        self._reader: threading.Thread | None = None
        self._notes: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        #: Room for the notes the reading thread may queue ahead (:data:`NOTES_AHEAD`).
        self._room = threading.Semaphore(NOTES_AHEAD)
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
            self._room = threading.Semaphore(NOTES_AHEAD)
            self._reader = threading.Thread(target=self._read, args=(conn, self._room, loop), daemon=True,
                                            name="rgpu-tls-read")
            self._reader.start()
        return self._conn

    def _read(self, conn: SealedStream, room: threading.Semaphore, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                note = read_note(conn.recv_into)
                while not room.acquire(timeout=1):  # the queue is full: the worker's writes wait
                    if self._closed or self._conn is not conn:
                        return
                loop.call_soon_threadsafe(self._put, conn, note)
        except (OSError, ValueError) as exc:
            if not self._closed:
                error = ConnectionError(f"the worker's data channel closed: {exc}")
                with contextlib.suppress(RuntimeError):  # the loop is gone at the end
                    loop.call_soon_threadsafe(self._put, conn, error)

    def _put(self, conn: SealedStream, note: list[Any] | BaseException) -> None:
        """On the loop: queue what the reader of ``conn`` read, unless another stream
        replaced it meanwhile (this thread may have ended before the loop ran this,
        and :meth:`_open` emptied the queue then): it would be taken for the new one's."""
        if self._conn is conn:
            self._notes.put_nowait(note)

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
        return self._taken(note)

    async def recv(self) -> list[Any]:
        async with self._lock:
            await self._open()
        return self._taken(await self._notes.get())

    def _taken(self, note: list[Any] | BaseException) -> list[Any]:
        if isinstance(note, BaseException):
            raise note
        self._room.release()
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
