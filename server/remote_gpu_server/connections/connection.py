"""One client's websocket: read frames, dispatch requests, send answers.

Each request runs as its own task, so an :class:`~m.Interrupt` is handled
while a cell runs; the session's lock keeps cells, pushes and pulls in
order. A malformed message gets an ``Error`` and the connection goes on;
broken framing gets an ``Error`` and a close with code 1002 (1009 for a
header over ``--max-message``). A message refused for its size whose
bytes are not all in yet (a push over ``--max-push``) gets an ``Error``
and a close with code 1009 and a reason naming the limit: the server
does not skip the rest, since a client that gave up sending it would
have its next messages skipped in its place, unanswered. Nothing a
client sends can raise out of this module; its first messages may ride its upgrade request.

What a client can make the server hold is bounded (see :mod:`.limits` and
:mod:`.memory`): requests in flight, bytes of messages waiting, how far a
push runs ahead of its worker, and refusals not yet read (see
:mod:`.refusals`): a client that lets more than
:data:`~.refusals.MAX_REFUSALS` refusals pile up without reading them is
disconnected (code 1008).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from remote_gpu_core.errors import MessageTooLarge, ProtocolError, RemoteGpuError
from remote_gpu_core.protocol import PROTOCOL_VERSION, encode, upgrade
from remote_gpu_core.protocol.framing import Chunks
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.sizes import format_size

from ..errors import DatabaseUnavailable
from ..scheduling.broker import LeaseBroker
from ..scheduling.scheduler import LeaseRequestEntry
from ..sessions import files as session_files
from ..sessions import variables as session_variables
from ..sessions.manager import SessionManager
from ..sessions.session import Session
from ..store import TokenInfo
from .bulk import BulkTickets, ConnectionBulk
from .limits import Limits
from .memory import ConnectionMemory, Hold
from .outcomes import Outcomes
from .positions import Positions
from .refusals import (
    RefusalQueue, execute_refusal, hello_refusal, too_large_code, too_large_reason, too_large_text, wire_code
)

__all__ = ["Connection", "MAX_IN_FLIGHT"]

log = logging.getLogger("remote_gpu_server")

#: Requests one connection may have in flight by default (``--max-requests``);
#: more are answered with an error, so a client cannot make the server hold
#: an unbounded number of them.
MAX_IN_FLIGHT = Limits().max_requests
#: The longest notebook path kept from a lease request, in characters.
MAX_NOTEBOOK = 1024
#: How long a connection that must be closed waits for its client to read why.
HANG_UP_WAIT = 5.0
#: Requests that only the session's lock keeps in order (they wait for each other).
_IN_TURN = (m.Execute, m.Push, m.Holding, m.Pull, m.Replay, m.Park, m.Resume, m.Upload, m.Download)


class Connection:
    """One websocket; ``broker`` grants leases, ``sessions`` holds them."""

    def __init__(self, ws: ServerConnection, token: TokenInfo, *, broker: LeaseBroker,
                 sessions: SessionManager, server_version: str, limits: Limits | None = None,
                 bulk: BulkTickets | None = None) -> None:
        self.broker = broker
        self.sessions = sessions
        self.server_version = server_version
        self.limits = limits or Limits()
        self.ws = ws
        self.token = token
        self.user = token.user
        self.session: Session | None = None
        # Pushes and uploads are handed out at their header so that their buffers flow
        # on to the worker while the rest is still arriving.
        self._reader = self.limits.reader()
        self._memory = ConnectionMemory(self.limits.connection_memory)
        self._arriving: Hold | None = None  # the push whose bytes are coming now
        self._send_lock = asyncio.Lock()
        self._hello = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_turn: set[asyncio.Task[None]] = set()  # tasks that take the session's lock
        self._refusals = RefusalQueue(self.send)
        self._outcomes = Outcomes()  # what each request's answer said, for those that follow one
        self._closer: asyncio.Task[None] | None = None
        self._positions = Positions(self.send)  # of this connection's lease requests that wait
        self.closed = False  # the websocket is gone: nothing more is delivered
        #: Its bulk stream, where the server offers one (see :mod:`.bulk`).
        self.bulk = ConnectionBulk(self.user, bulk, lambda: self._memory.room(self._arriving), self._refuse)
        if bulk is not None:
            self._reader.on_bulk = self.bulk.on_bulk

    async def send(self, message: m.Message) -> None:
        self._outcomes.answered(message)
        frames = encode(message)
        try:
            async with self._send_lock:
                for frame in frames:
                    await self.ws.send(frame)
        except ConnectionClosed:
            pass  # the output is in the journal; a reconnecting client can read it

    async def send_stream(self, message: m.Message, lengths: list[int], pieces: AsyncIterator[Any]) -> None:
        """Send ``message`` whose buffers' bytes come from ``pieces`` as they arrive.

        On the bulk stream where it is open, else on the websocket; see
        :meth:`.ConnectionBulk.send_stream` for what a failure midway does.
        """
        self._outcomes.answered(message)
        await self.bulk.send_stream(self._send_lock, self.ws, message, lengths, pieces)

    async def run(self) -> None:
        try:
            first = self.ws.request.headers.get(upgrade.FIRST_MESSAGES) if self.ws.request else None
            if first is not None and not await self._receive(upgrade.first_frames(first)):  # checked at the door
                return
            while True:
                arriving = self._arriving
                if arriving is not None and arriving.bytes > self._memory.window(arriving):
                    # A push is coming: read on only once it is within its
                    # window ahead of the worker (or the client is gone).
                    await self._room_or_closed(arriving)
                try:
                    frame = await self.ws.recv()
                except ConnectionClosedOK:
                    try:
                        self._reader.receive_eof()
                    except ProtocolError as exc:
                        log.info("connection from %s: %s", self.user, exc)
                    break
                if not await self._receive(frame):
                    break
        except ConnectionClosed:
            pass
        finally:
            await self._closed()

    async def _room_or_closed(self, hold: Hold) -> None:
        room = asyncio.ensure_future(self._memory.wait_for_room(hold))
        closed = asyncio.ensure_future(self.ws.wait_closed())
        try:
            await asyncio.wait({room, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            closed.cancel()
        if not hold.arriving:
            self._arriving = None

    async def _receive(self, frame: Any) -> bool:
        try:
            self._reader.receive_data(frame)
        except ProtocolError as exc:
            for msg, header in self._reader.received():
                self._dispatch(msg, header)
            if self._reader.broken:
                await self._hang_up(exc)
                return False
            errors = self._reader.errors_received()
            if self._reader.skipping and isinstance(errors[-1], MessageTooLarge):
                # The rest of a refused message is still to come, and the
                # reader would skip it: a client that gave up sending it would
                # have its next messages skipped instead, unanswered. Say why
                # and close; the session waits for a reconnect.
                *errors, last = errors
                self._refuse_all(errors)
                await self._hang_up(last)
                return False
            self._refuse_all(errors)
            return True
        for msg, header in self._reader.received():
            self._dispatch(msg, header)
        if self._arriving is not None and not self._arriving.arriving:
            self._arriving = None
        return True

    def _refuse_all(self, errors: list[ProtocolError]) -> None:
        """Answer each message the reader refused (the stream is still in step)."""
        for error in errors:
            if isinstance(error, MessageTooLarge):
                self._refuse(error.req, too_large_code(error), too_large_text(self.limits, error))
            else:
                self._refuse(error.req, m.ErrorCode.PROTOCOL, f"protocol error: {error}")

    async def _hang_up(self, exc: ProtocolError) -> None:
        """The stream is out of step, or will not be read on: say why (an
        Error for the request at fault), then close with a reason (without
        waiting long on a client that does not read)."""
        if isinstance(exc, MessageTooLarge):
            error, text = too_large_code(exc), too_large_text(self.limits, exc)
            code, reason = 1009, too_large_reason(self.limits, exc)
        else:
            error, text, code, reason = m.ErrorCode.PROTOCOL, f"protocol error: {exc}", 1002, "protocol error"
        self.closed = True
        try:
            async with asyncio.timeout(HANG_UP_WAIT):
                await self.send(m.Error(exc.req, error, text))
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    def _dispatch(self, msg: m.Message, header: int) -> None:
        """Start the request ``msg`` (``header`` bytes of JSON), or refuse it."""
        req = getattr(msg, "req", 0)
        buffers = getattr(msg, "buffers", ())
        if self.closed:
            self._drop(buffers, "the connection is closing")
            return
        if isinstance(msg, m.Input):
            # Answered at once, never queued: a cell waits for it.
            if self._hello and self.session is not None:
                self.session.send_input(msg.value)
            return
        if len(self._tasks) >= self.limits.max_requests:
            self._drop(buffers, "refused: too many requests in flight")
            self._refuse(req, m.ErrorCode.BAD_REQUEST, (
                f"too many requests in flight on this connection (at most {self.limits.max_requests}, "
                "rgpu serve --max-requests): wait for answers before sending more"))
            return
        if not self._hello and not isinstance(msg, m.Hello):
            self._drop(buffers, "refused: no hello yet")
            self._refuse(req, m.ErrorCode.PROTOCOL, "the first message must be hello")
            return
        hold = self._admit(msg, header, buffers)
        if hold is None:
            return
        if isinstance(msg, m.Hello) and msg.protocol == PROTOCOL_VERSION:
            self._hello = True  # now: the requests right behind it are in order
        if isinstance(msg, m.Hello):
            self._spawn(self._on_hello(msg), hold=hold)
        elif isinstance(msg, m.Interrupt):
            self._spawn(self._on_interrupt(msg), hold=hold)
        elif isinstance(msg, m.BulkOpen):
            self._spawn(self.send(self.bulk.ticket(msg.req)), msg.req, hold=hold)
        elif isinstance(msg, m.LeaseRequest):
            self._spawn(self._on_lease(msg), msg.req, hold=hold)
        elif isinstance(msg, m.Release):
            self._spawn(self._on_release(msg), msg.req, hold=hold)
        elif isinstance(msg, m.FetchRefused) or (isinstance(msg, m.Upload) and msg.fetch):
            self._spawn(self._on_fetch_answer(msg), msg.req, hold=hold)
        elif isinstance(msg, (*_IN_TURN, m.ShellRequest)):
            self._outcomes.expect(msg.req if isinstance(msg, _IN_TURN) else 0)
            self._spawn(self._on_session_request(msg), msg.req, hold=hold,
                        in_turn=isinstance(msg, _IN_TURN))
        else:
            hold.release()
            self._refuse(req, m.ErrorCode.BAD_REQUEST, f"{msg.type.value} is not a client request")

    def _admit(self, msg: m.Message, header: int, buffers: tuple[Any, ...]) -> Hold | None:
        """A hold on what ``msg`` keeps in memory, or None if it was refused.

        A push streams to its worker when nothing is ahead of it in the
        session; otherwise it waits whole, and only if it fits.
        """
        chunks = [b for b in buffers if isinstance(b, Chunks)]
        size = header + sum(len(b) for b in buffers)
        if isinstance(msg, (m.Push, m.Upload)) and any(not c.complete for c in chunks):
            session = self.session
            fetched = isinstance(msg, m.Upload) and msg.fetch  # its cell waits for it: never queued
            streams = session is None or session.released or fetched or not (session.busy or self._in_turn)
            if streams or self._memory.fits(size):
                hold = self._memory.hold(header, chunks)
                self._arriving = hold
                return hold
            self._drop(buffers, "refused: the session is busy")
            self._refuse(msg.req, m.ErrorCode.BAD_REQUEST, (
                f"this push of {format_size(size)} came while the session is busy with an earlier "
                f"request, and the server keeps at most {format_size(self._memory.limit)} of a "
                "connection's data waiting (rgpu serve --connection-memory): push it again once "
                "the earlier request has finished"))
            return None
        if not self._memory.fits(size):
            self._drop(buffers, "refused: too much waiting")
            self._refuse(getattr(msg, "req", 0), m.ErrorCode.BAD_REQUEST, (
                f"this {msg.type.value} message of {format_size(size)} came while "
                f"{format_size(self._memory.held)} of this connection's data is waiting, more than "
                f"the server keeps ({format_size(self._memory.limit)}, rgpu serve "
                "--connection-memory): send it again once earlier requests are answered"))
            return None
        return self._memory.hold(size - sum(c.held for c in chunks), chunks)

    @staticmethod
    def _drop(buffers: tuple[Any, ...], reason: str) -> None:
        for buf in buffers:
            if isinstance(buf, Chunks):
                buf.fail(reason)

    def _refuse(self, req: int, code: m.ErrorCode, text: str) -> None:
        """Answer ``req`` with an error, without waiting for the client to read it.

        The answers queue up (see :mod:`.refusals`); a client that sends more
        refused requests than they hold without reading is disconnected.
        """
        self._outcomes.failed(req)
        if self.closed:
            return
        if not self._refusals.add(m.Error(req, code, text)):
            log.warning("disconnecting %s: it sends requests that are refused and does not "
                        "read the answers", self.user)
            self.closed = True
            self._closer = asyncio.get_running_loop().create_task(self._close_now(
                1008, "too many refused requests without reading the answers"))

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(HANG_UP_WAIT):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    def _spawn(self, coro: Any, req: int = 0, *, hold: Hold, in_turn: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, req, hold))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if in_turn:
            self._in_turn.add(task)
            task.add_done_callback(self._in_turn.discard)

    async def _guard(self, coro: Any, req: int, hold: Hold) -> None:
        """Run a request's handler; an error it did not answer still answers
        request ``req``, so the client is never left waiting. At the end its
        message holds nothing (what of it still arrives is dropped)."""
        try:
            try:
                await coro
            finally:  # now, before the next request in turn runs
                self._outcomes.settle(req)
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as exc:  # the store's address is the server's to know
            log.exception("request from %s failed", self.user)
            await self.send(m.Error(req, m.ErrorCode.INTERNAL,
                                    f"internal server error ({type(exc).__name__}); the server's log has more"))
        except RemoteGpuError as exc:
            await self.send(m.Error(req, wire_code(exc), str(exc)))
        except Exception as exc:
            log.exception("request from %s failed", self.user)
            await self.send(m.Error(req, m.ErrorCode.INTERNAL,
                                    f"internal server error ({type(exc).__name__}); the server's log has more"))
        finally:
            hold.fail("the request was answered before all of it arrived")
            hold.release()

    # -- handlers -----------------------------------------------------------

    async def _on_hello(self, msg: m.Hello) -> None:
        mismatch = hello_refusal(msg)
        if mismatch:
            await self.send(m.Error(0, m.ErrorCode.VERSION_MISMATCH, mismatch))
            await self.ws.close(1002, "protocol version mismatch")
            return
        await self.send(m.Welcome(PROTOCOL_VERSION, self.server_version, self.user,
                                  self.limits.welcome(bulk=self.bulk.offered),
                                  {name: dict(f) for name, f in self.sessions.context.environments.items()}))

    async def _on_interrupt(self, msg: m.Interrupt) -> None:
        self._outcomes.interrupt()  # what was sent to follow the cell does not run
        if self.session is not None:
            await self.session.interrupt(restart=msg.restart)

    async def _on_lease(self, msg: m.LeaseRequest) -> None:
        sessions = self.sessions
        if self.closed:
            return  # its client left before this task ran: nothing to queue or resume for
        if msg.resume and (self.session is None or self.session.released):
            session = sessions.get(msg.resume)
            if session is not None and session.user == self.user and not session.released:
                self._attach(session)
        if self.session is not None and not self.session.released:
            await self._granted(msg.req, self.session, resumed=True, waited=0.0)
            return
        if msg.resume:
            reason = sessions.release_reason(msg.resume) or "it is not known to this server"
            await self.send(m.Notice(msg.req, f"Your earlier GPU session was released ({reason}): "
                                                  "this is a new session and its variables are gone."))
        started = time.monotonic()
        pool = sessions.context.pool
        try:
            env = self.broker.environment(msg.pool, msg.env, pool.unknown_environment)
        except ValueError as exc:
            await self.send(m.Error(msg.req, m.ErrorCode.LEASE_REFUSED, str(exc)))
            return
        self.broker.apply_token_quota(self.token)
        entry = LeaseRequestEntry(self.broker.new_key(), self.user, msg.gpus, time.time(),
                                  priority=msg.priority, pool=msg.pool, environment=env)
        self._positions.waiting[entry.key] = msg.req
        try:
            slots = await self.broker.wait_for_lease(entry, self)
        except ValueError as exc:
            await self.send(m.Error(msg.req, m.ErrorCode.LEASE_REFUSED, str(exc)))
            return
        finally:
            self._positions.waiting.pop(entry.key, None)
        # The notebook's path is only shown, never used as a path here: a bounded piece of it.
        notebook = msg.notebook[:MAX_NOTEBOOK] if msg.notebook else None
        cold = pool.cold_start(slots, env)
        if cold:
            await self.send(m.Notice(msg.req, cold))
        session = await sessions.open(self.user, slots, notebook, priority=msg.priority, environment=env)
        if self.closed:
            # Granted, but the client left while its worker started: it never
            # learns the session id, so nobody could resume it. Free it now
            # rather than at the idle timeout.
            await sessions.release(session, "the client disconnected before its lease was delivered")
            return
        self._attach(session)
        await self._granted(msg.req, session, resumed=False, waited=time.monotonic() - started)

    def _attach(self, session: Session) -> None:
        self.sessions.attach(session, self.send)
        self.session = session

    def queue_position(self, key: int, position: int) -> None:
        """The broker's news: sent by a task of this connection, the latest per request."""
        if not self.closed:
            self._positions.tell(key, position)

    async def _granted(self, req: int, session: Session, resumed: bool, waited: float) -> None:
        await self.send(m.LeaseGranted(req, session.id, [str(s) for s in session.slots], resumed,
                                       waited, session.language_info, parked=session.parked is not None,
                                       fingerprint=session.fingerprint))

    async def _on_release(self, msg: m.Release) -> None:
        session = self.session
        if session is None or session.released:
            await self.send(m.Released(msg.req, session.id if session else "", "no lease was held"))
            return
        self.session = None
        await self.sessions.release(session, "released by the client", req=msg.req, notify=self.send)

    async def _on_fetch_answer(self, msg: m.Upload | m.FetchRefused) -> None:
        """A file of the notebook's folder, or a refusal, for the running cell (see
        :mod:`..sessions.fetching`); dropped unless that cell waits for it."""
        if self.session is None or self.session.released:
            self._drop(getattr(msg, "buffers", ()), "no session on this connection")
        else:
            await self.session.fetcher.answered(msg, self)

    async def _on_session_request(self, msg: m.Message) -> None:
        session = self.session
        req = getattr(msg, "req", 0)
        if session is None or session.released:
            reason = session.released if session else None
            text = (f"this session was released ({reason})" if reason
                    else "no GPU is leased on this connection: send a lease request first")
            await self.send(m.Error(req, m.ErrorCode.NO_LEASE, text))
            return
        if isinstance(msg, m.Execute):
            refused = execute_refusal(msg)
            if refused:
                await self.send(m.Error(req, m.ErrorCode.BAD_REQUEST, refused))
                return
            await session.execute(msg, self, self._outcomes.follows(msg.after, req))
        elif isinstance(msg, m.Push):
            await session_variables.push(session, msg, self)
        elif isinstance(msg, m.Holding):
            await session_variables.holding(session, msg, self)
        elif isinstance(msg, m.Pull):
            await session_variables.pull(session, msg, self, self._outcomes.follows(msg.after, req))
        elif isinstance(msg, m.ShellRequest):
            await session.shell_request(msg, self)
        elif isinstance(msg, m.Replay):
            await session.replay(msg, self)
        elif isinstance(msg, m.Park):
            parked = await self.sessions.park(session, "on request")
            await self.send(dataclasses.replace(parked, req=req))
        elif isinstance(msg, m.Resume):
            await session.resume(req, self)
            await self._granted(req, session, resumed=True, waited=0.0)
        elif isinstance(msg, m.Upload):
            await session_files.upload(session, msg, self)
        elif isinstance(msg, m.Download):
            await session_files.download(session, msg, self)

    async def _closed(self) -> None:
        self.closed = True
        self._reader.abort("the client disconnected in the middle of a message")
        self._memory.close("the client disconnected")
        self.bulk.close()
        self._refusals.clear()
        for key in self._positions.clear():
            self.broker.cancel(key)
        if self.session is not None and not self.session.released:
            self.sessions.detach(self.session, self.send)
