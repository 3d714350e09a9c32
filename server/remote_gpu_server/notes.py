"""How a data channel's notes travel between the server and a worker.

A note (:mod:`.transfer`) is a short list of frames. Two carriers, each
with a server end (asyncio) and a worker end (blocking, in the kernel's
thread):

* a ZMQ PAIR socket over ``ipc://`` for a worker on the server's host: the
  pieces themselves are in the shared-memory ring, the notes are tiny;
* mutual TLS over TCP for a worker on another host, where the pieces travel
  inside the notes. Each side has a key and certificate made for this
  worker (the worker's on its node, the server's on the server: no private
  key crosses the network) and pins the other's certificate, so only this
  server reaches this worker's data and nobody reads it on the way. TLS 1.3
  with AES-GCM was measured here at 4.5 GB/s per core where CurveZMQ gave
  0.9 GB/s, which is what carrying 100 MiB at more than 1 GB/s needs.

On a stream a note is written as: a count byte, then for each frame its
length (4 bytes, big-endian) and its bytes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["BlockingTls", "PairCarrier", "TlsCarrier", "make_identity", "pinned_context", "read_note",
           "write_note"]

_COUNT = struct.Struct(">B")
_LENGTH = struct.Struct(">I")
#: Largest frame a carrier accepts (a piece is at most one ring slot).
MAX_FRAME = 4 << 20
#: Parts of a note smaller than this go out together, in one write.
_SMALL = 64 << 10
#: Writes the server's end hands its writing thread before it waits for the oldest.
WRITES_AHEAD = 4


def note_bytes(frames: Sequence[Any]) -> list[Any]:
    """The byte strings that carry ``frames`` on a stream, in order, nothing copied."""
    out: list[Any] = [_COUNT.pack(len(frames))]
    for frame in frames:
        view = memoryview(frame).cast("B")
        out.append(_LENGTH.pack(view.nbytes))
        out.append(view)
    return out


def make_identity(role: str) -> tuple[bytes, bytes]:
    """A fresh key and self-signed certificate (PEM) for one end of one channel;
    ``role`` is ``server`` (the worker, which listens) or ``client``."""
    from .tls import make_certificate

    return make_certificate(f"remote-gpu data channel {role}", client=role != "server")


@contextlib.contextmanager
def _files(key_pem: bytes, cert_pem: bytes) -> Iterator[tuple[str, str]]:
    """The key and certificate as files of mode 0600 (ssl loads them only from
    files), removed at once."""
    folder = tempfile.mkdtemp(prefix="rgpu-tls-")
    try:
        paths = []
        for name, data in (("key.pem", key_pem), ("cert.pem", cert_pem)):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        yield paths[0], paths[1]
    finally:
        for name in ("key.pem", "cert.pem"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def pinned_context(server_side: bool, key_pem: bytes, cert_pem: bytes, peer_cert_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3 context that presents ``cert_pem`` and trusts exactly ``peer_cert_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the peer is pinned by its certificate, not a name
    context.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        # No session tickets: nobody resumes a session here, and a ticket is
        # a record the client's reading thread would handle while its
        # writing thread uses the same connection (see TlsCarrier).
        context.num_tickets = 0
    with _files(key_pem, cert_pem) as (keyfile, certfile):
        context.load_cert_chain(certfile, keyfile)
    context.load_verify_locations(cadata=peer_cert_pem.decode())
    return context


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
            frames: list[Any] = self._socket.recv_multipart(flags=self._zmq.NOBLOCK).result()
            return frames
        except self._zmq.Again:
            return None

    async def recv(self) -> list[Any]:
        frames: list[Any] = await self._socket.recv_multipart()
        return frames

    def close(self) -> None:
        self._socket.close()


class TlsCarrier:
    """The server's end over mutual TLS, connected on first use.

    The TLS stream is read and written by threads of its own (``ssl`` lets
    go of the GIL while it encrypts and moves bytes), so the event loop
    only hands frames over: asyncio's own TLS transport, measured here,
    carried less than half as much. OpenSSL does not allow two threads in
    one connection at once, so the socket is non-blocking and each call
    into it holds a lock; the threads wait for the socket outside it. :meth:`send` returns once the note is
    queued for the writing thread, up to :data:`WRITES_AHEAD` notes ahead of
    it (a failed write raises at a later send); the frames must not change
    after. Notes read wait in a queue, so a wait on :meth:`recv` can be
    given up without leaving the stream half read.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self._conn: ssl.SSLSocket | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rgpu-tls-write")
        self._reader: threading.Thread | None = None
        self._notes: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._ssl_lock = threading.Lock()  # one thread in the TLS connection at a time
        self._writes: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.context.wrap_socket(raw)
        conn.setblocking(False)
        return conn

    def _recv_into(self, conn: ssl.SSLSocket, view: memoryview) -> int:
        while True:
            with self._ssl_lock:
                try:
                    return conn.recv_into(view)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            select.select([conn], [], [])

    def _sendall(self, conn: ssl.SSLSocket, data: Any) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < view.nbytes:
            with self._ssl_lock:
                try:
                    sent += conn.send(view[sent:])
                    continue
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass  # retried with the same bytes, as OpenSSL wants
            select.select([], [conn], [])

    async def _open(self) -> ssl.SSLSocket:
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

    def _read(self, conn: ssl.SSLSocket, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                note = read_note(lambda view: self._recv_into(conn, view))
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
                self._writer, write_note, lambda data: self._sendall(conn, data), frames))
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
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._closed = True
        self._drop()
        self._writer.shutdown(wait=False)


def read_note(recv_into: Any, scratch: bytearray | None = None) -> list[Any]:
    """One note from a blocking stream whose ``recv_into(view) -> n`` reads into a buffer.

    With ``scratch`` (at least :data:`MAX_FRAME` bytes), the note's first
    large frame is read into it rather than into fresh memory: a view that
    is valid until the next note is read.
    """
    def exactly(n: int) -> Any:
        nonlocal scratch
        if scratch is not None and n >= _SMALL:
            buf: Any = memoryview(scratch)[:n]
            scratch = None  # one frame per note: the next would overwrite it
        else:
            buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            read = recv_into(view[got:])
            if not read:
                raise ConnectionError("the server closed the data channel")
            got += read
        return buf

    (count,) = _COUNT.unpack(exactly(_COUNT.size))
    frames: list[Any] = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
        if length > MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes is larger than a note may carry")
        frames.append(exactly(length))
    return frames


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def write_note(sendall: Any, frames: Sequence[Any]) -> None:
    """Write one note; its small parts together, so a piece costs two writes, not seven."""
    small = bytearray()
    for part in note_bytes(frames):
        if len(part) < _SMALL:
            small += part
            continue
        if small:
            sendall(small)
            small = bytearray()
        sendall(part)
    if small:
        sendall(small)


class BlockingTls:
    """The worker's end over mutual TLS: listens on ``host:port`` and serves the
    server that connects with the pinned certificate; the socket calls the
    worker's data channel makes (``poll``, ``recv_multipart``, ``send_multipart``)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._context = context
        self._conn: ssl.SSLSocket | None = None
        # A piece is read here, not into fresh memory: the worker copies it
        # to where it goes before it reads the next note.
        self._scratch = bytearray(MAX_FRAME)

    def _connection(self, timeout_ms: int | None) -> ssl.SSLSocket | None:
        while self._conn is None:
            ready, _, _ = select.select([self._listener], [], [], None if timeout_ms is None else timeout_ms / 1000)
            if not ready:
                return None
            raw, _ = self._listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._conn = self._context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # not the server (a wrong certificate, a port scan): wait for it
        return self._conn

    def poll(self, timeout_ms: int) -> bool:
        conn = self._connection(timeout_ms)
        if conn is None:
            return False
        if conn.pending():
            return True
        ready, _, _ = select.select([conn], [], [], timeout_ms / 1000)
        return bool(ready)

    def recv_multipart(self) -> list[Any]:
        conn = self._connection(None)
        assert conn is not None
        try:
            return read_note(conn.recv_into, self._scratch)
        except (OSError, ValueError):
            self._drop()
            raise

    def send_multipart(self, frames: Sequence[Any], copy: bool = True) -> None:
        conn = self._connection(None)
        assert conn is not None
        try:
            write_note(conn.sendall, frames)
        except OSError:
            self._drop()
            raise

    def _drop(self) -> None:
        """The stream broke: the server's next connection takes its place."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
