"""How a data channel's notes (:mod:`.transfer`) travel on a byte stream,
and the worker's end of one.

Both carriers are streams, each with a server end (asyncio, in
:mod:`remote_gpu_server.workers.carriers`) and a worker end (blocking, in
the kernel's thread, :class:`BlockingStream`):

* for a worker on the server's host, one end of a Unix socket pair that
  the server makes and hands the worker when it starts it
  (:class:`PlainStream`): nothing listens, so nobody else can connect, and
  the pieces themselves are in the shared-memory ring, so notes are tiny;
* for a worker on another host, a TCP stream of sealed records opened with
  mutual TLS (:mod:`.sealed`), where the pieces travel inside the notes.

A note is written as a count byte, then for each frame its length (4
bytes, big-endian) and its bytes. A note is at most :data:`MAX_NOTE` bytes
and a frame at most :data:`MAX_FRAME`: the reader refuses a longer one
before it reads it, and the stream ends. The worker runs its user's code,
which can write on its end of the stream whatever it likes; the server's
end keeps at most a few notes read ahead (``NOTES_AHEAD`` there), so what
a cell writes beyond them waits in the stream and then in the cell's own
process, never in the server's memory. A ZMQ socket, which this replaced,
could not bound it: its high-water mark counts whole messages, and the
frames of one message it takes in before it checks, without limit
(measured here: a worker that sent one message of 600 frames of 1 MiB grew
the server by 600 MiB, whatever the mark).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["MAX_FRAME", "MAX_NOTE", "BlockingStream", "PlainStream", "note_bytes", "note_parts", "read_note",
           "read_note_from"]

_COUNT = struct.Struct(">B")
_LENGTH = struct.Struct(">I")
#: Largest frame a carrier accepts (a piece is at most one ring slot).
MAX_FRAME = 4 << 20
#: Largest note a carrier accepts, all its frames: a piece and its small frames.
MAX_NOTE = MAX_FRAME + (64 << 10)
#: Parts of a note smaller than this go out together, in one write.
_SMALL = 64 << 10


def note_bytes(frames: Sequence[Any]) -> list[Any]:
    """The byte strings that carry ``frames`` on a stream, in order, nothing copied."""
    out: list[Any] = [_COUNT.pack(len(frames))]
    for frame in frames:
        view = memoryview(frame).cast("B")
        out.append(_LENGTH.pack(view.nbytes))
        out.append(view)
    return out


def read_note(recv_into: Any, scratch: bytearray | None = None) -> list[Any]:
    """One note from a blocking stream whose ``recv_into(view) -> n`` reads into a buffer.

    With ``scratch`` (at least :data:`MAX_FRAME` bytes), the note's first
    large frame is read into it rather than into fresh memory: a view that
    is valid until the next note is read. Raises ``ValueError`` for a frame
    or a note larger than a note may be, before reading it.
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
                raise ConnectionError("the other end closed the data channel")
            got += read
        return buf

    (count,) = _COUNT.unpack(exactly(_COUNT.size))
    frames: list[Any] = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
        _check(length, frames)
        frames.append(exactly(length))
    return frames


async def read_note_from(readexactly: Callable[[int], Awaitable[bytes]]) -> list[bytes]:
    """One note from an asyncio stream (``readexactly``: a ``StreamReader``'s),
    with the limits of :func:`read_note`."""
    (count,) = _COUNT.unpack(await readexactly(_COUNT.size))
    frames: list[bytes] = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(await readexactly(_LENGTH.size))
        _check(length, frames)
        frames.append(await readexactly(length))
    return frames


def _check(length: int, before: list[Any]) -> None:
    """Refuse a frame of ``length`` bytes after ``before`` in a note, unless the note may be that long."""
    if length > MAX_FRAME or length + sum(len(frame) for frame in before) > MAX_NOTE:
        raise ValueError(f"the other end sent a note of more than {MAX_NOTE} bytes")


def note_parts(frames: Sequence[Any]) -> list[Any]:
    """The parts that carry one note, its small parts joined, so that a
    piece is two sealed records and two writes, not seven."""
    out: list[Any] = []
    small = bytearray()
    for part in note_bytes(frames):
        if len(part) < _SMALL:
            small += part
            continue
        if small:
            out.append(small)
            small = bytearray()
        out.append(part)
    if small:
        out.append(small)
    return out


class PlainStream:
    """A blocking socket with the calls a stream of notes makes (as :class:`~.sealed.SealedStream`)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def buffered(self) -> bool:
        return False  # the socket keeps what is not read yet

    def send_parts(self, parts: Sequence[Any]) -> None:
        for part in parts:
            self._sock.sendall(part)

    def recv_into(self, view: memoryview) -> int:
        return self._sock.recv_into(view)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting to read
        self._sock.close()


class BlockingStream:
    """The worker's end of a stream to the server, with the calls the
    worker's data channel makes (``poll``, ``recv_multipart``,
    ``send_multipart``, and for its listener ``watched`` and ``pending``).

    ``conn``: a :class:`PlainStream` or a :class:`~.sealed.SealedStream`;
    :class:`~.sealed.BlockingTls` takes the server's streams as they come.
    ``scratch``: read a note's piece into one buffer kept for it (the worker
    copies a piece to where it goes before it reads the next note).
    """

    def __init__(self, conn: Any = None, scratch: bool = False) -> None:
        self._conn = conn
        self._scratch = bytearray(MAX_FRAME) if scratch else None

    def _connection(self, timeout_ms: int | None) -> Any:
        """The stream to use now; None if none comes within ``timeout_ms``."""
        return self._conn

    def poll(self, timeout_ms: int) -> bool:
        conn = self._connection(timeout_ms)
        if conn is None:
            return False
        if conn.buffered():
            return True
        ready, _, _ = select.select([conn], [], [], timeout_ms / 1000)
        return bool(ready)

    def watched(self) -> list[int]:
        """The descriptors that become readable when :meth:`pending` may say yes."""
        return [self._conn.fileno()] if self._conn is not None else []

    def pending(self) -> bool:
        """Whether a note (or the start of one) waits, without blocking."""
        return self.poll(0)

    def recv_multipart(self) -> list[Any]:
        conn = self._connection(None)
        if conn is None:
            raise ConnectionError("the data channel is closed")
        try:
            return read_note(conn.recv_into, self._scratch)
        except (OSError, ValueError):
            self._drop()
            raise

    def send_multipart(self, frames: Sequence[Any], copy: bool = True) -> None:
        conn = self._connection(None)
        if conn is None:
            raise ConnectionError("the data channel is closed")
        try:
            conn.send_parts(note_parts(frames))
        except OSError:
            self._drop()
            raise

    def _drop(self) -> None:
        """The stream broke."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
