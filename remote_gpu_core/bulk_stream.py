"""A second connection beside a session's websocket that carries only bulk bytes.

A websocket moves a push or a pull here at about what one websocket hop
carries (1 GB/s for 1 MiB frames): each frame is masked, unmasked and
copied by the library. One loopback TCP stream carries three times that
when its bytes are received straight into the buffer they end in. So,
where both ends agree (the server says ``bulk`` in its
:attr:`~remote_gpu_core.protocol.messages.Welcome.limits`), the client
opens a second connection to the same URL, with the same token and TLS,
as a websocket handshake carrying a one-time ticket that the server gave
it on the first (:data:`TICKET_HEADER`; see
:class:`~remote_gpu_core.protocol.messages.BulkTicket`). Once the
handshake is done the server sends one websocket message, :data:`READY`,
and hands the connection's transport to a :class:`BulkStream`; the client
reads that message and does the same. From then on neither end speaks
websocket on it: it carries raw bytes, the client's first being
:data:`GREETING`, after which the server may send. (Each end takes the
transport over when nothing of the other's can be in flight on it yet, so
no raw byte is ever read as a websocket frame.)

What travels on it: only the buffers of messages whose header, on the
websocket, has :data:`~remote_gpu_core.protocol.framing.FLAG_BULK` set,
in the order of those headers, back to back, nothing else (their lengths
are in the headers). Control stays on the websocket, and so does the
order of requests: a receiver registers each such message's buffers with
:meth:`BulkStream.expect` as its header is read, and the bytes fill them
in turn. Bytes that come before their header wait in a small buffer with
reading paused.

Receiving: a :class:`BulkStream` is an ``asyncio.BufferedProtocol``, so
the transport reads into the buffer it is given: a client's received
buffer itself (its warm memory, where the array will live), or, on a
relay, pieces of :data:`PIECE` bytes that it appends to the message's
:class:`~remote_gpu_core.protocol.chunks.Chunks` as each fills. A
``room`` callable paces a relay: while it returns an awaitable (a push
too far ahead of its worker) reading pauses until that is done.

When the stream ends, everything it was to fill fails with the reason
(a relay's Chunks fail; a client's waiting message is told), and the
owner falls back to the websocket for what comes next.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .errors import ConnectionLost
from .protocol.chunks import Chunks

__all__ = ["GREETING", "PIECE", "READY", "TICKET_HEADER", "BulkStream", "PiecePool", "Target", "pieces"]

#: The header of the websocket handshake that opens a bulk stream: its ticket.
TICKET_HEADER = "X-RGPU-Bulk"
#: The last websocket message on a bulk stream's connection, from the server once
#: it reads the connection as a bulk stream: the client then does too.
READY = b"RGBULK1 ready"
#: What a client sends first on a bulk stream, once it reads it as one (not as a
#: websocket): the server sends on it only after these bytes.
GREETING = b"RGBULK1\n"
#: Bytes written at a time, and the pieces a relay receives into: a slot of a
#: worker's ring (larger pieces cost less per byte; see ``worker_process.transfer``).
PIECE = 4 << 20
#: Bytes that may come before their message's header: then reading pauses.
_STAGING = 1 << 16
#: Written and not yet sent past which a writer waits (until all is sent): a byte,
#: so that the transport copies at most the rest of one piece into its buffer, not
#: every piece after it. Not 0: a TLS transport pauses at ``>=`` and would never resume.
_HIGH_WATER = 1


class _Piece(bytearray):
    """A relay's piece: a buffer :data:`pieces` handed out, which may come back."""

    __slots__ = ("__weakref__",)


class PiecePool:
    """The relay's pieces of :data:`PIECE` bytes, reused: a piece handed back
    (:meth:`give`, by whoever copied its bytes on and holds no view of it) is
    the next one taken, its pages already faulted in; fresh memory costs a
    page fault per 4 KiB (50 ms per 100 MiB here) and a zero fill. At most
    ``kept`` pieces wait here. One event loop's: not thread-safe."""

    def __init__(self, kept: int = 4) -> None:
        self.kept = kept
        self._free: list[_Piece] = []
        #: Pieces handed out that had served before, and fresh ones.
        self.reused = 0
        self.fresh = 0

    def take(self, nbytes: int) -> memoryview:
        if nbytes == PIECE and self._free:
            self.reused += 1
            return memoryview(self._free.pop())
        self.fresh += 1
        return memoryview(_Piece(nbytes))

    def give(self, piece: memoryview) -> None:
        """``piece`` (as :meth:`take` gave it, or any buffer: others are left alone)
        is free again; the caller drops its every view of it."""
        buf = piece.obj
        if type(buf) is not _Piece or len(buf) != PIECE or len(self._free) >= self.kept:
            return
        try:
            piece.release()
        except BufferError:  # exported: something still reads it
            return
        # Only this function's name may still refer to it (getrefcount adds one):
        # another view of it (a slice, an array over it) keeps it from being reused.
        if sys.getrefcount(buf) <= 2:
            self._free.append(buf)


#: The relay's pieces, reused across its pushes (see :class:`PiecePool`).
pieces = PiecePool()


class Target:
    """The buffers of one message, to fill in order.

    Each buffer is a writable buffer (received into directly), a
    :class:`Chunks` (received into pieces appended to it) or None (its
    bytes are skipped: the message was refused). ``done(reason)`` is called
    once, with None when all arrived, else why not.
    """

    def __init__(self, buffers: list[Any], lengths: list[int],
                 done: Callable[[str | None], None] | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> None:
        self.buffers = buffers if buffers else [None] * len(lengths)
        self.lengths = lengths
        self.done = done
        #: ``progress(done, total)``: told the bytes received so far, of all.
        self.progress = progress
        self._before = 0  # bytes of the buffers before ``index``
        self.index = 0
        self.filled = 0  # bytes of buffer ``index`` received
        self._piece: memoryview | None = None  # a relay's piece being filled
        self._piece_filled = 0
        self._skip_to_next()

    @property
    def finished(self) -> bool:
        return self.index >= len(self.lengths)

    def _skip_to_next(self) -> None:
        while self.index < len(self.lengths) and self.filled == self.lengths[self.index]:
            self._before += self.filled
            self.index, self.filled = self.index + 1, 0
            self._piece = None  # what was left of a piece of a buffer that failed

    def view(self, scratch: memoryview) -> memoryview:
        """Where the next bytes go (``scratch`` for bytes skipped)."""
        buf, left = self.buffers[self.index], self.lengths[self.index] - self.filled
        if isinstance(buf, Chunks):
            if buf.failed is not None:  # dropped: its bytes are only counted
                return scratch[: min(left, scratch.nbytes)]
            if self._piece is None:
                self._piece, self._piece_filled = pieces.take(min(left, PIECE)), 0
            return self._piece[self._piece_filled :]
        if buf is None:
            return scratch[: min(left, scratch.nbytes)]
        return memoryview(buf).cast("B")[self.filled : self.lengths[self.index]]

    def received(self, n: int) -> None:
        """``n`` bytes were written where :meth:`view` said."""
        buf = self.buffers[self.index]
        self.filled += n
        if isinstance(buf, Chunks):
            if buf.failed is not None:  # counted, not kept (as Chunks.append does)
                buf.nbytes += n
                buf.released += n
            elif self._piece is not None:
                self._piece_filled += n
                if self._piece_filled == self._piece.nbytes:
                    piece, self._piece = self._piece, None
                    buf.append(piece)
        if self.progress is not None:
            self.progress(self._before + self.filled, sum(self.lengths))
        self._skip_to_next()

    def fail(self, reason: str) -> None:
        for buf in self.buffers[self.index :]:
            if isinstance(buf, Chunks):
                buf.fail(reason)
        self.finish(reason)

    def finish(self, reason: str | None) -> None:
        """Tell ``done`` (once): None, all arrived; else why not."""
        done, self.done = self.done, None
        if done is not None:
            done(reason)


class BulkStream(asyncio.BufferedProtocol):
    """One bulk stream: call :meth:`expect` for each message as its header
    is read, :meth:`write` to send buffers, :meth:`close` at the end.

    ``room``: called after bytes arrive; an awaitable it returns pauses
    reading until it is done. ``on_lost(reason)``: the stream ended.
    """

    def __init__(self, room: Callable[[], Awaitable[None] | None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.room = room
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed: str | None = None
        #: Bytes received and sent on this stream, for the server's counters and tests.
        self.received_bytes = 0
        self.sent_bytes = 0
        self._targets: collections.deque[Target] = collections.deque()
        self._scratch = memoryview(bytearray(_STAGING))
        self._early = bytearray()  # bytes that came before their header
        self._staged = False
        self._reading_paused = False
        self._waiting_room = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._ended = asyncio.get_running_loop().create_future()

    # -- the transport's calls ----------------------------------------------

    def take_over(self, transport: Any) -> None:
        """Become ``transport``'s protocol (after its websocket handshake)."""
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=0)
        transport.set_protocol(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._targets and not self._early:
            self._staged = False
            return self._targets[0].view(self._scratch)
        self._staged = True
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.received_bytes += nbytes
        if self._staged:
            self._early += self._scratch[:nbytes]
            self._pause()
            self._drain_early()
            return
        self._advance(nbytes)
        self._pace()

    def eof_received(self) -> bool:
        # The other end is done with it: so is this one, at once (a close would wait
        # to send what is buffered, to a peer that may never read it).
        self.close("the other end closed the bulk stream")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"the bulk stream closed ({exc})" if exc else "the bulk stream closed")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- receiving -------------------------------------------------------------

    def expect(self, target: Target) -> None:
        """The buffers of the next message whose header said its bytes come here."""
        if self.closed is not None:
            target.fail(self.closed)
            return
        if target.finished:
            target.finish(None)
            return
        self._targets.append(target)
        self._drain_early()

    def _advance(self, nbytes: int) -> None:
        target = self._targets[0]
        target.received(nbytes)
        if target.finished:
            self._targets.popleft()
            target.finish(None)

    def _drain_early(self) -> None:
        """Bytes that came before their header, into their buffers now that it came."""
        while self._early and self._targets:
            view = self._targets[0].view(self._scratch)
            n = min(view.nbytes, len(self._early))
            if view.obj is not self._scratch.obj:
                view[:n] = self._early[:n]
            del self._early[:n]
            self._advance(n)
        if not self._early and not self._waiting_room:
            self._resume()

    def _pace(self) -> None:
        wait = self.room() if self.room is not None and self._targets else None
        if wait is not None:
            self._waiting_room = True
            self._pause()
            asyncio.ensure_future(self._room_then_resume(wait))

    async def _room_then_resume(self, wait: Awaitable[None]) -> None:
        try:
            await wait
        finally:
            self._waiting_room = False
            if not self._early:
                self._resume()

    def _pause(self) -> None:
        if not self._reading_paused and self.transport is not None and self.closed is None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused and self.transport is not None and self.closed is None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- sending ---------------------------------------------------------------

    async def write(self, pieces: Iterable[Any], on_sent: Callable[[int], None] | None = None) -> None:
        """Send the bytes of ``pieces`` (buffers, in order), :data:`PIECE` bytes at a
        time, each told to ``on_sent(nbytes)``; ConnectionLost if the stream ends first."""
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for start in range(0, view.nbytes, PIECE):
                chunk = view[start : start + PIECE]
                await self.write_piece(chunk)
                if on_sent is not None:
                    on_sent(chunk.nbytes)

    async def write_piece(self, piece: memoryview) -> None:
        if self.closed is not None or self.transport is None:
            raise ConnectionLost(self.closed or "the bulk stream is not open")
        self.transport.write(piece)
        self.sent_bytes += piece.nbytes
        if not self._writable.is_set():
            ended = asyncio.ensure_future(asyncio.shield(self._ended))
            writable = asyncio.ensure_future(self._writable.wait())
            try:
                await asyncio.wait({ended, writable}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                writable.cancel()
            if self.closed is not None:
                raise ConnectionLost(self.closed)

    # -- the end -----------------------------------------------------------------

    def close(self, reason: str = "the bulk stream was closed") -> None:
        """End the stream: what it was to fill fails with ``reason``."""
        if self.transport is not None:
            self.transport.abort()
        self._end(reason)

    async def wait_closed(self) -> str:
        """Wait for the end; the reason."""
        await asyncio.shield(self._ended)
        return self.closed or ""

    def _end(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        self._writable.set()
        targets, self._targets = list(self._targets), collections.deque()
        for target in targets:
            target.fail(reason)
        if not self._ended.done():
            self._ended.set_result(None)
        if self.on_lost is not None:
            self.on_lost(reason)
