"""The client's link to a GPU server: one websocket, read by one task.

:func:`open_link` makes the connection (TLS as :mod:`remote_gpu_core.tls`
says, the bearer token, the protocol's :class:`~m.Hello` and
:class:`~m.Welcome`; :func:`connect_link` sends the hello without waiting,
so that the first request rides behind it) and turns every way it can fail into an error of the
tree (:mod:`remote_gpu_core.errors`) whose message says what to do.
:class:`Link` then sends messages (refusing, before sending, one over the
server's limits) and routes what arrives by request id to per-request
inboxes; :func:`error_from` turns the server's :class:`~m.Error` answers
into exceptions. Everything runs on one event loop.

Where the server offers it (``bulk`` in its limits) and ``RGPU_BULK_STREAM``
is not ``0``, the link opens a bulk stream beside the websocket (see
:mod:`remote_gpu_core.bulk_stream`) in the background once a large push or
pull went (a link that moves only small things never opens one, and a
lease does not wait for it); then the bytes of large pushes go there and
the server answers pulls there. Until it is open, or if it cannot be
opened or breaks, they travel on the websocket as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from remote_gpu_core import __version__, tls
from remote_gpu_core.bulk_stream import GREETING, READY, TICKET_HEADER, BulkStream, Target
from remote_gpu_core.errors import AuthenticationError, BulkStreamLost, ConnectionLost, ProtocolError, RemoteGpuError
from remote_gpu_core.fingerprint import from_wire
from remote_gpu_core.protocol import CHUNK_SIZE, PROTOCOL_VERSION, Reader, encode, upgrade
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import FLAG_BULK, encode_head, views
from remote_gpu_core.protocol.limits import refusal
from remote_gpu_core.protocol.piece_reader import install as install_piece_reader
from remote_gpu_core.protocol.serialization import allocate_buffer

from .progress import Throttle
from .server_errors import error_from

__all__ = ["Answers", "Link", "OutputCallback", "ProgressCallback", "connect_link", "error_from", "open_link"]

log = logging.getLogger("remote_gpu_kernel")

OutputCallback = Callable[[m.Output], Any]
#: The id of a link's first request (its ids count from 1).
FIRST_REQ = 1
#: ``on_progress(done, total)``: bytes of a file transfer moved so far, of all.
ProgressCallback = Callable[[int, int], Any]


_CLOSED = object()
#: A push of fewer bytes than this goes on the websocket: a bulk stream saves it nothing.
BULK_MIN = 1 << 20
#: Seconds a websocket has to answer a ping once its bulk stream broke, to count as alive.
PING_WAIT = 10.0
#: ``RGPU_BULK_STREAM=0``: never open a bulk stream.
BULK_ENV = "RGPU_BULK_STREAM"


class _BulkCut:
    """In an inbox: the answer's bytes were to come on the bulk stream, and it broke."""

    def __init__(self, reason: str) -> None:
        self.reason = reason



@dataclasses.dataclass(frozen=True)
class Answers:
    """A request sent: its id, (called) its next answer, and the meter of its
    bytes where its session reports their progress (see :mod:`.progress`)."""

    req: int
    receive: Callable[[], Awaitable[m.Message]]
    meter: Throttle | None = None

    def finished(self) -> None:
        """Its transfer is over: the meter reports it, whole."""
        if self.meter is not None:
            self.meter.finish()

    def __call__(self) -> Awaitable[m.Message]:
        return self.receive()

class _PieceConnection(ClientConnection):
    """A websocket connection whose received bytes are kept as they came
    (:mod:`remote_gpu_core.protocol.piece_reader`): a frame is copied once."""

    def __init__(self, protocol: Any, **kwargs: Any) -> None:
        install_piece_reader(protocol)
        super().__init__(protocol, **kwargs)


class Link:
    """The websocket, its reader task and the per-request inboxes."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.reader = Reader(allocate=allocate_buffer)
        self.inboxes: dict[int, asyncio.Queue[Any]] = {}
        self.unsolicited: asyncio.Queue[m.Message] = asyncio.Queue()
        self.closed_reason: str | None = None
        #: The server's limits from its Welcome (``max_push``, ``max_message``).
        self.limits: dict[str, int] = {}
        #: The versions of the server's named environments, from its Welcome (see :func:`.versions.mismatch`).
        self.environments: dict[str, dict[str, str]] = {}
        #: Who the server says this token is, and its version (from its Welcome).
        self.user: str | None = None
        self.server_version: str | None = None
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self.on_released: Callable[[m.Released], None] | None = None
        self.on_parked: Callable[[m.Parked], None] | None = None
        #: Outputs that answer no request of this client (``req = 0``).
        self.on_background: OutputCallback | None = None
        #: Progress of the answers being received, by request.
        self.progress: dict[int, ProgressCallback] = {}
        #: Told what came of a message cut short by the end of the connection
        #: (see :meth:`~remote_gpu_core.protocol.framing.Reader.salvage`).
        self.on_cut: Callable[[dict[str, Any], list[tuple[Any, int]]], None] | None = None
        #: The bulk stream, once open (see the module docstring).
        self.bulk: BulkStream | None = None
        self._bulk_lock = asyncio.Lock()
        self._bulk_ws: ClientConnection | None = None
        self._cut_pushes: dict[int, str] = {}  # pushes whose bulk stream broke under them, and how
        #: Opens a second websocket to the server with extra headers (set by :func:`connect_link`).
        self.reconnect: Callable[[dict[str, str]], Awaitable[ClientConnection]] | None = None
        self.reader.on_bulk = self._on_bulk
        #: The task opening the bulk stream after the welcome (True once open), if any.
        self.bulk_opening: asyncio.Task[bool] | None = None
        self.task = asyncio.get_running_loop().create_task(self._read())

    def open(self) -> tuple[int, asyncio.Queue[Any]]:
        if self.closed_reason is not None:
            raise ConnectionLost(self.closed_reason)
        req = next(self._ids)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.inboxes[req] = inbox
        return req, inbox

    async def send(self, message: m.Message, on_progress: ProgressCallback | None = None) -> None:
        """Send ``message``; MessageTooLarge, before any of it is sent, for one
        the server would refuse (the session goes on). ``on_progress(sent,
        total)`` hears the bytes as they go out."""
        too_large = refusal(message, self.limits)
        if too_large is not None:
            raise too_large
        if isinstance(message, m.Push):
            lengths = [sum(p.nbytes for p in views(b)) for b in message.buffers]
            if sum(lengths) >= BULK_MIN:
                stream = self.bulk
                if stream is not None and stream.closed is None:
                    await self._send_bulk(stream, message, lengths, on_progress)
                    return
                self.want_bulk()
        frames = encode(message)
        total = sum(memoryview(f).nbytes for f in frames) if on_progress else 0
        try:
            async with self._send_lock:
                await self._send_whole(frames, None if on_progress is None else lambda sent: on_progress(sent, total))
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection to the GPU server closed: {exc}") from None

    async def _send_whole(self, frames: list[Any], on_sent: Callable[[int], Any] | None = None) -> None:
        """One message's frames on the websocket (hold the send lock), ``on_sent(bytes so far)``. Cut short
        (an interrupt), the connection is dropped: the server would take the next message's frames for its rest."""
        sent = 0
        try:
            for frame in frames:
                await self.ws.send(frame)
                sent += memoryview(frame).nbytes
                if on_sent is not None:
                    on_sent(sent)
        except ConnectionClosed:
            raise  # gone already, and the reader says why
        except BaseException:
            if len(frames) > 1:  # (a message of one frame goes whole or not at all)
                self.closed_reason = self.closed_reason or "the connection was dropped: a request was cut short"
                self.ws.transport.abort()
            raise

    async def _send_bulk(self, stream: BulkStream, message: m.Push, lengths: list[int],
                         on_progress: ProgressCallback | None) -> None:
        """``message``'s header on the websocket, its buffers on ``stream``. If the
        stream breaks first, the server answers the push (an error, unless all of
        it came), and that answer raises BulkStreamLost once the push is over."""
        total, sent = sum(lengths), 0

        def count(nbytes: int) -> None:
            nonlocal sent
            sent += nbytes
            assert on_progress is not None
            on_progress(sent, total)

        try:
            async with self._send_lock:
                await self._send_whole(encode_head(message, lengths, flags=FLAG_BULK))
                await self._bulk_lock.acquire()  # before the next header: the bytes keep their order
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection to the GPU server closed: {exc}") from None
        try:
            await stream.write((view for buf in message.buffers for view in views(buf)),
                               None if on_progress is None else count)
        except ConnectionLost as exc:
            self._cut_pushes[message.req] = str(exc)
        except BaseException:  # cut short: the server would take the next push's bytes for its rest
            stream.close("a push was interrupted before all its bytes went")
            raise
        finally:
            self._bulk_lock.release()

    def _on_bulk(self, msg: m.Message | None, buffers: list[Any], lengths: list[int], header: int) -> bool:
        """An answer whose buffers come on the bulk stream: routed once they are in."""
        req = getattr(msg, "req", 0)

        def done(reason: str | None) -> None:
            if reason is None and msg is not None:
                self._route(msg)
                return
            if msg is not None and self.on_cut is not None:  # what arrived, for a pull that resumes
                came = [(buf, size if i < target.index else target.filled if i == target.index else 0)
                        for i, (buf, size) in enumerate(zip(buffers, lengths))]
                self.on_cut({**msg.fields(), "t": msg.type.value}, came)
            if (inbox := self.inboxes.get(req)) is not None:
                inbox.put_nowait(_BulkCut(reason or "the server's answer was refused"))

        target = Target(buffers, lengths, done, self.progress.get(req))
        if self.bulk is None:
            target.fail("the server sent an answer's bytes on a bulk stream, and none is open")
        else:
            self.bulk.expect(target)
        return False

    def _bulk_allowed(self) -> bool:
        """Whether the server offers a bulk stream, this link can open one, and ``RGPU_BULK_STREAM`` allows it."""
        return bool(self.limits.get("bulk")) and self.reconnect is not None and os.environ.get(BULK_ENV, "1") != "0"

    def want_bulk(self) -> None:
        """A large transfer goes: open the bulk stream in the background, for
        the next ones (once per link; see the module docstring)."""
        if self.bulk_opening is None and self._bulk_allowed():
            self.bulk_opening = asyncio.get_running_loop().create_task(self.open_bulk())

    async def open_bulk(self) -> bool:
        """Open the bulk stream, where the server offers one and it is not turned
        off; False (and the websocket carries everything) where it is not open."""
        if not self._bulk_allowed() or self.bulk is not None:
            return self.bulk is not None
        try:
            req, inbox = self.open()
            try:
                await self.send(m.BulkOpen(req))
                answer = await self.receive(inbox)
            finally:
                self.done(req)
            if not isinstance(answer, m.BulkTicket):
                return False
            assert self.reconnect is not None  # as _bulk_allowed said
            ws = await self.reconnect({TICKET_HEADER: answer.ticket})
            try:  # the server's last websocket message: it reads the connection as a bulk stream now
                ready = await asyncio.wait_for(ws.recv(), PING_WAIT)
            except BaseException:
                ws.transport.abort()
                raise
            if ready != READY:
                ws.transport.abort()
                raise ProtocolError(f"the server's bulk stream began with {ready!r:.40}, not {READY!r}")
        except (RemoteGpuError, OSError, InvalidHandshake, ConnectionClosed, asyncio.TimeoutError) as exc:
            log.info("no bulk stream, pushes and pulls go on the websocket: %s", exc)
            return False
        stream = BulkStream(on_lost=lambda reason: self._bulk_lost(stream, reason))
        stream.take_over(ws.transport)
        await stream.write_piece(memoryview(GREETING))
        self.bulk, self._bulk_ws = stream, ws
        return True

    async def _bulk_cut(self, text: str) -> ConnectionLost:
        """What to raise for a transfer whose bulk stream broke: BulkStreamLost
        (``text``) if the websocket answers a ping, else ConnectionLost (a link
        cut whole, whichever connection noticed first)."""
        try:
            async with asyncio.timeout(PING_WAIT):
                await (await self.ws.ping())
        except (ConnectionClosed, TimeoutError):
            await self.ws.close()  # a websocket that does not answer is as good as gone
            return ConnectionLost(self.closed_reason or "the connection to the GPU server was lost")
        return BulkStreamLost(text)

    def _bulk_lost(self, stream: BulkStream, reason: str) -> None:
        if self.bulk is stream:
            log.info("the bulk stream ended (%s): pushes and pulls go on the websocket", reason)
            self.bulk = None
        if self._bulk_ws is not None:
            self._bulk_ws.connection_lost(None)  # its transport no longer tells it
            self._bulk_ws = None

    async def _read(self) -> None:
        reason = "the connection to the GPU server closed"
        try:
            async for frame in self.ws:
                self.reader.receive_data(frame)
                for msg in self.reader.events_received():
                    self._route(msg)
                if self.progress:
                    self._report_progress()
            self.reader.receive_eof()
        except ConnectionClosed as exc:
            reason = f"the connection to the GPU server was lost ({exc})"
        except ProtocolError as exc:
            reason = f"the GPU server sent something this client cannot read: {exc}"
            await self.ws.close(1002, "protocol error")
        finally:
            self.closed_reason = self.closed_reason or reason
            salvaged = self.reader.salvage()
            if salvaged is not None and self.on_cut is not None:
                self.on_cut(*salvaged)
            for inbox in self.inboxes.values():
                inbox.put_nowait(_CLOSED)

    def _report_progress(self) -> None:
        partial = self.reader.partial
        if partial is not None:
            fields, done, total = partial
            report = self.progress.get(fields.get("req", 0))
            if report is not None:
                report(done, total)

    def _route(self, msg: m.Message) -> None:
        req = getattr(msg, "req", 0)
        if isinstance(msg, m.Released) and self.on_released is not None:
            self.on_released(msg)
        if isinstance(msg, m.Parked) and self.on_parked is not None:
            self.on_parked(msg)
        if isinstance(msg, m.PullReply) and sum(len(b) for b in msg.buffers) >= BULK_MIN:
            self.want_bulk()
        if req == 0 and isinstance(msg, m.Output):
            if self.on_background is not None:
                self.on_background(msg)
            return
        inbox = self.inboxes.get(req) if req else None
        if inbox is not None:
            inbox.put_nowait(msg)
        elif req == 0:
            if isinstance(msg, m.Error):
                log.warning("GPU server: %s", msg.message)
            self.unsolicited.put_nowait(msg)

    async def receive(self, inbox: asyncio.Queue[Any]) -> m.Message:
        msg = await inbox.get()
        if msg is _CLOSED:
            raise ConnectionLost(self.closed_reason or "the connection closed")
        if isinstance(msg, _BulkCut):
            raise await self._bulk_cut(f"the bulk stream beside the connection broke during this transfer "
                                       f"({msg.reason}); the session goes on: run it again (it goes on the "
                                       "websocket now, from where it broke)")
        if isinstance(msg, m.Error):
            cut = self._cut_pushes.pop(msg.req, None)
            if cut is not None:
                raise await self._bulk_cut(f"the bulk stream beside the connection broke during this push ({cut}); "
                                           "nothing was set, the session goes on: push again (it goes on the "
                                           "websocket now)")
            raise error_from(msg)
        return msg  # type: ignore[no-any-return]

    def done(self, req: int) -> None:
        self.inboxes.pop(req, None)
        self._cut_pushes.pop(req, None)

    async def welcomed(self) -> None:
        """Wait for the server's answer to the hello: who this token is, the
        server's version and limits. Raises VersionMismatch (the message says
        to install the same version on both sides) or ProtocolError."""
        msg = await self.receive(self.unsolicited)  # an Error (version mismatch) raises
        if not isinstance(msg, m.Welcome):
            raise ProtocolError(f"expected welcome, got {msg.type.value}")
        self.user, self.server_version = msg.user, msg.server
        self.limits = dict(msg.limits)
        self.environments = {str(name): from_wire(f) for name, f in dict(msg.envs).items()}

    async def close(self) -> None:
        if self.bulk_opening is not None:
            self.bulk_opening.cancel()
        if self.bulk is not None:
            self.bulk.close("the link was closed")
        await self.ws.close()
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


async def open_link(url: str, token: str | None, *, cafile: str | None = None,
                    insecure: bool = False, open_timeout: float = 10) -> Link:
    """Connect to ``url`` with ``token``, say hello and wait to be welcomed;
    see :func:`connect_link` and :meth:`Link.welcomed`."""
    link, _ = await connect_link(url, token, cafile=cafile, insecure=insecure, open_timeout=open_timeout)
    try:
        await link.welcomed()
    except BaseException:
        await link.close()
        raise
    return link


async def connect_link(url: str, token: str | None, *, cafile: str | None = None,
                       insecure: bool = False, open_timeout: float = 10,
                       first: Callable[[int], m.Message] | None = None,
                       ) -> tuple[Link, asyncio.Queue[Any] | None]:
    """Connect to ``url`` with ``token`` and say hello, without waiting for the
    answer; :meth:`Link.welcomed` then reads the welcome. ``first`` makes the
    first request from its id: it goes with the hello, and the inbox of its
    answers is returned beside the link. Both ride the websocket upgrade
    request where the server reads them there (see
    :mod:`remote_gpu_core.protocol.upgrade`), else they are the first two
    messages. ``cafile`` and ``insecure`` as :mod:`remote_gpu_core.tls` says.

    Raises AuthenticationError (no token, or the server refused it or this
    connection), TlsError (the connection cannot be made safe), or
    ConnectionLost (anything else that kept the connection from being
    made); the message says what to do.
    """
    if not token:
        raise AuthenticationError(
            "no token: pass token=..., set RGPU_TOKEN, or run 'rgpu login URL TOKEN'"
        )
    # It resolves the host's name: not on the event loop.
    await asyncio.to_thread(tls.refuse_plain_text, url, insecure)
    context = tls.ssl_context(url, cafile)
    riding: list[m.Message] = [m.Hello(PROTOCOL_VERSION, f"remote-gpu-kernel/{__version__}")]
    if first is not None:
        riding.append(first(FIRST_REQ))
    auth = {"Authorization": f"Bearer {token}"}
    carried = upgrade.first_messages(riding)

    async def dial(extra: dict[str, str], **options: Any) -> ClientConnection:
        return await connect(
            url,
            ssl=context,  # None for ws://, always a verifying context for wss://
            additional_headers={**auth, **extra},
            compression=None,
            max_size=CHUNK_SIZE,
            max_queue=64,
            write_limit=4 * CHUNK_SIZE,
            open_timeout=open_timeout,
            user_agent_header=f"remote-gpu-kernel/{__version__}",
            **options,
        )

    try:
        ws = await dial({upgrade.FIRST_MESSAGES: carried} if carried is not None else {},
                        create_connection=_PieceConnection)
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip()
        if exc.response.status_code == 401:
            raise AuthenticationError(f"the GPU server at {url} refused the token: {body}") from None
        if exc.response.status_code == 403:
            raise AuthenticationError(f"the GPU server at {url} refused this connection: "
                                      f"{body}") from None
        if exc.response.status_code == 429:  # too many connections of this user
            raise ConnectionLost(f"the GPU server at {url} refused this connection: {body}") from None
        raise ConnectionLost(f"the GPU server at {url} answered HTTP "
                             f"{exc.response.status_code}: {body}") from None
    except ssl.SSLError as exc:
        raise tls.tls_failure(exc, url, cafile) from None
    except InvalidHandshake as exc:
        # A TLS server answers a plain ws:// handshake by closing the connection.
        hint = ": if it serves TLS, use wss://" if url.startswith("ws://") else ""
        raise ConnectionLost(f"the GPU server at {url} did not complete the websocket "
                             f"handshake ({exc}){hint}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLost(f"cannot reach the GPU server at {url}: {exc}") from None
    link = Link(ws)
    # A bulk stream's handshake: no first messages, no pings (they would be bytes in the stream).
    link.reconnect = lambda extra: dial(extra, ping_interval=None)
    inbox = None
    if first is not None:
        req, inbox = link.open()  # before anything is read: its answers find their inbox
        assert req == FIRST_REQ, "a new link's first request id"
    response = ws.response
    if carried is None or response is None or response.headers.get(upgrade.FIRST_MESSAGES) != upgrade.READ:
        try:  # a server that did not read them in the upgrade request
            for message in riding:
                await link.send(message)
        except BaseException:
            await link.close()
            raise
    return link, inbox

