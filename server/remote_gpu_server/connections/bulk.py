"""The bulk streams of client connections, and the tickets that open them.

A client whose server says ``bulk`` in its limits asks, on its
authenticated websocket, for a ticket (:class:`~m.BulkOpen`); the
connection gets one from :class:`BulkTickets` and answers
:class:`~m.BulkTicket`. The client then opens a second websocket to the
same URL with the same token and the ticket in
:data:`~remote_gpu_core.bulk_stream.TICKET_HEADER`; the front door takes
the ticket at its handshake (:meth:`BulkTickets.take`) and, as it answers
101, hands that connection's transport to the :class:`ConnectionBulk` of
the connection that asked (see :mod:`remote_gpu_core.bulk_stream`).

A ticket is 256 random bits, opens one stream, for the connection that
asked and the user of its token, within :data:`TICKET_SECONDS`; it is
kept only as its SHA-256, so a lookup reveals nothing of other tickets by
its timing. A ticket of another user, used twice, expired, or made up is
refused with 403 before any websocket opens, and the client's pushes and
pulls go on over the websocket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from remote_gpu_core.bulk_stream import GREETING, BulkStream, Target
from remote_gpu_core.errors import ConnectionLost, WorkerDied
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.chunks import Chunks
from remote_gpu_core.protocol.framing import CHUNK_SIZE, FLAG_BULK, encode_head

__all__ = ["TICKET_SECONDS", "BulkTickets", "ConnectionBulk"]

log = logging.getLogger("remote_gpu_server")

#: How long a ticket opens a stream.
TICKET_SECONDS = 30.0
#: Tickets one connection may have waiting at once (older ones lapse).
_PER_CONNECTION = 2


@dataclasses.dataclass
class _Ticket:
    user: str
    owner: ConnectionBulk
    expires: float


class BulkTickets:
    """The tickets given and not yet used, of every connection of this server."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tickets: dict[str, _Ticket] = {}
        #: Bulk streams opened since the server started, and the bytes the ended ones received and sent.
        self.opened = 0
        self._ended_bytes = (0, 0)
        self._open: set[BulkStream] = set()

    def carried(self) -> tuple[int, int]:
        """Bytes received and sent on bulk streams since the server started (for ``/metrics``)."""
        received, sent = self._ended_bytes
        return (received + sum(s.received_bytes for s in self._open), sent + sum(s.sent_bytes for s in self._open))

    def opening(self, stream: BulkStream) -> None:
        self.opened += 1
        self._open.add(stream)

    def ended(self, stream: BulkStream) -> None:
        if stream in self._open:
            self._open.discard(stream)
            received, sent = self._ended_bytes
            self._ended_bytes = (received + stream.received_bytes, sent + stream.sent_bytes)

    def issue(self, user: str, owner: ConnectionBulk) -> str:
        now = self._clock()
        self._tickets = {k: t for k, t in self._tickets.items() if t.expires > now}
        mine = [k for k, t in self._tickets.items() if t.owner is owner]
        for key in mine[: max(0, len(mine) - _PER_CONNECTION + 1)]:
            del self._tickets[key]
        ticket = secrets.token_urlsafe(32)
        self._tickets[_key(ticket)] = _Ticket(user, owner, now + TICKET_SECONDS)
        return ticket

    def take(self, ticket: str, user: str) -> ConnectionBulk | str:
        """The connection ``ticket`` opens a stream for, or why it opens none.
        A ticket is gone once taken, whether or not it opens one."""
        found = self._tickets.pop(_key(ticket), None)
        if found is None:
            return "this bulk-stream ticket is not known: it was used already, or never given"
        if found.expires <= self._clock():
            return "this bulk-stream ticket expired: ask for another"
        if found.user != user or found.owner.closed:
            return "this bulk-stream ticket is not for this token's connection"
        return found.owner


def _key(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


class ConnectionBulk:
    """One client connection's side of its bulk stream (at most one at a time).

    ``room``: as :class:`BulkStream`'s (the connection's window on a push);
    ``refuse(req, code, text)`` answers a request with an error.
    """

    def __init__(self, user: str, tickets: BulkTickets | None, room: Callable[[], Awaitable[None] | None],
                 refuse: Callable[[int, m.ErrorCode, str], None]) -> None:
        self.user = user
        self.tickets = tickets
        self.room = room
        self._refuse = refuse
        self.stream: BulkStream | None = None
        self.closed = False
        self._greeted: BulkStream | None = None  # the stream whose client said it reads it
        self._sending = asyncio.Lock()

    @property
    def offered(self) -> bool:
        return self.tickets is not None

    def ticket(self, req: int) -> m.Message:
        """The answer to a :class:`~m.BulkOpen`."""
        if self.tickets is None:
            return m.Error(req, m.ErrorCode.BAD_REQUEST, "this server offers no bulk stream")
        return m.BulkTicket(req, self.tickets.issue(self.user, self), TICKET_SECONDS)

    def attach(self, transport: Any) -> BulkStream:
        """The stream a ticket of this connection opened, on ``transport``; an
        earlier one ends (what it was to carry fails)."""
        if self.stream is not None:
            self.stream.close("the client opened another bulk stream")
        stream = BulkStream(room=self.room, on_lost=lambda reason: self._lost(stream, reason))
        stream.take_over(transport)
        self.stream = stream
        greeting = bytearray(len(GREETING))

        def greeted(reason: str | None) -> None:
            if reason is None and greeting == GREETING:
                self._greeted = stream
            elif reason is None:
                stream.close("the client's bulk stream did not begin with its greeting")

        stream.expect(Target([greeting], [len(GREETING)], greeted))
        if self.tickets is not None:
            self.tickets.opening(stream)
        return stream

    def _lost(self, stream: BulkStream, reason: str) -> None:
        log.info("bulk stream of %s ended: %s", self.user, reason)
        if self.tickets is not None:
            self.tickets.ended(stream)
        if self.stream is stream:
            self.stream = None

    def on_bulk(self, msg: m.Message | None, buffers: list[Any], lengths: list[int], header: int) -> bool:
        """The connection reader's handler (see :data:`~remote_gpu_core.protocol.framing.BulkHandler`):
        the buffers are expected on the stream now, and the message is dispatched in its turn (or refused)."""
        refusal = self.expect(msg, buffers, lengths)
        if msg is not None and refusal is not None:
            self._refuse(getattr(msg, "req", 0), m.ErrorCode.PROTOCOL, f"protocol error: {refusal}")
        return msg is not None and refusal is None

    def expect(self, message: m.Message | None, buffers: list[Any], lengths: list[int]) -> str | None:
        """Take the buffers of a message whose bytes come on the stream; why
        they will not come (they are failed, the message gets an error), or None."""
        refusal = None
        if message is not None and not isinstance(message, (m.Push, m.Upload)):
            refusal = f"a {message.type.value} cannot carry its buffers on the bulk stream"
        elif self.stream is None:
            refusal = "its bytes were to come on a bulk stream, and none is open"
        if refusal is not None:
            for buf in buffers:
                if isinstance(buf, Chunks):
                    buf.fail(refusal)
            if self.stream is None:
                return refusal
            buffers = []
        assert self.stream is not None
        self.stream.expect(Target(buffers, lengths))
        return refusal

    def sendable(self, message: m.Message, lengths: list[int]) -> BulkStream | None:
        """The stream to carry the buffers of ``message`` (a pull's answer), if any."""
        stream = self._greeted
        if not isinstance(message, m.PullReply) or not any(lengths) or stream is None or stream.closed:
            return None
        return stream

    async def send_stream(self, send_lock: asyncio.Lock, ws: ServerConnection, message: m.Message,
                          lengths: list[int], pieces: AsyncIterator[Any]) -> None:
        """Send ``message``'s header on the websocket ``ws`` and its buffers, as
        ``pieces`` come, on the bulk stream where it is open, else on ``ws``.

        If ``pieces`` fail midway, the message cannot be finished: the stream
        that carries its bytes is closed, with a reason that says why (the
        client's pull fails; it resumes from what arrived).
        """
        stream = self.sendable(message, lengths)
        if stream is None:
            await _send_on_websocket(self.user, ws, send_lock, message, lengths, pieces)
            return
        async with send_lock:
            for frame in encode_head(message, lengths, flags=FLAG_BULK):
                await ws.send(frame)
            await self._sending.acquire()  # before the next header: the bytes keep their order
        try:
            async for piece in pieces:
                await stream.write_piece(memoryview(piece).cast("B"))
        except ConnectionLost:
            pass
        except Exception as exc:
            log.warning("bulk stream to %s broke: %s", self.user, exc)
            stream.close("the worker died in the middle of a transfer" if isinstance(exc, WorkerDied)
                         else "a transfer failed midway")
        finally:
            self._sending.release()

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close("the client's websocket closed")


async def _send_on_websocket(user: str, ws: ServerConnection, send_lock: asyncio.Lock, message: m.Message,
                             lengths: list[int], pieces: AsyncIterator[Any]) -> None:
    try:
        async with send_lock:
            for frame in encode_head(message, lengths):
                await ws.send(frame)
            try:
                async for piece in pieces:  # a piece of the ring may be several frames long
                    view = memoryview(piece).cast("B")
                    for start in range(0, view.nbytes, CHUNK_SIZE):
                        await ws.send(view[start : start + CHUNK_SIZE])
            except Exception as exc:
                log.warning("stream to %s broke: %s", user, exc)
                await ws.close(1011, "the worker died in the middle of a transfer"
                               if isinstance(exc, WorkerDied) else "a transfer failed midway")
    except ConnectionClosed:
        pass
