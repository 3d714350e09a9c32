"""One client's websocket: read frames, dispatch requests, send answers.

Each request runs as its own task, so an :class:`~m.Interrupt` is handled
while a cell runs; the session's lock keeps cells, pushes and pulls in
order. A malformed message gets an ``Error`` and the connection goes on;
broken framing gets an ``Error`` and a close with code 1002. Nothing a
client sends can raise out of this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from remote_gpu_kernel.errors import ProtocolError, RemoteGpuError, WorkerDied
from remote_gpu_kernel.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_kernel.protocol.framing import encode_head
from remote_gpu_kernel.protocol import messages as m

from .broker import LeaseBroker
from .scheduler import LeaseRequestEntry
from .session import Session
from .sessions import SessionManager
from .store import TokenInfo

__all__ = ["Connection", "MAX_IN_FLIGHT"]

log = logging.getLogger("remote_gpu_server")

#: Requests one connection may have in flight (waiting their turn or running);
#: more are answered with an error, so a client cannot make the server hold
#: an unbounded number of them.
MAX_IN_FLIGHT = 64
#: The longest notebook path kept from a lease request, in characters.
MAX_NOTEBOOK = 1024

class Connection:
    """One websocket; ``broker`` grants leases, ``sessions`` holds them."""

    def __init__(self, ws: ServerConnection, token: TokenInfo, *, broker: LeaseBroker,
                 sessions: SessionManager, server_version: str) -> None:
        self.broker = broker
        self.sessions = sessions
        self.server_version = server_version
        self.ws = ws
        self.token = token
        self.user = token.user
        self.session: Session | None = None
        # Pushes are handed out at their header so that their buffers flow
        # on to the worker while the rest is still arriving.
        self._reader = Reader(assemble=False, early={m.MessageType.PUSH})
        self._send_lock = asyncio.Lock()
        self._hello = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[int, int] = {}  # lease key -> req
        self._positions: dict[int, int] = {}  # lease key -> position not yet sent
        self._position_task: asyncio.Task[None] | None = None
        self.closed = False  # the websocket is gone: nothing more is delivered

    async def send(self, message: m.Message) -> None:
        frames = encode(message)
        try:
            async with self._send_lock:
                for frame in frames:
                    await self.ws.send(frame)
        except ConnectionClosed:
            pass  # the output is in the journal; a reconnecting client can read it

    async def send_stream(self, message: m.Message, lengths: list[int], pieces: AsyncIterator[Any]) -> None:
        """Send ``message`` whose buffers' bytes come from ``pieces`` as they arrive.

        If ``pieces`` fails midway, the message cannot be finished: the
        connection is closed (the client sees it as a dropped connection,
        and the close reason says why; resuming the session works).
        """
        try:
            async with self._send_lock:
                for frame in encode_head(message, lengths):
                    await self.ws.send(frame)
                try:
                    async for piece in pieces:
                        await self.ws.send(piece)
                except Exception as exc:
                    log.warning("stream to %s broke: %s", self.user, exc)
                    await self.ws.close(1011, "the worker died in the middle of a transfer"
                                        if isinstance(exc, WorkerDied) else "a transfer failed midway")
        except ConnectionClosed:
            pass

    async def run(self) -> None:
        try:
            async for frame in self.ws:
                if not await self._receive(frame):
                    break
            else:
                try:
                    self._reader.receive_eof()
                except ProtocolError as exc:
                    log.info("connection from %s: %s", self.user, exc)
        except ConnectionClosed:
            pass
        finally:
            await self._closed()

    async def _receive(self, frame: Any) -> bool:
        try:
            self._reader.receive_data(frame)
            events = self._reader.events_received()
        except ProtocolError as exc:
            events = self._reader.events_received()
            for msg in events:
                self._dispatch(msg)
            await self.send(m.Error(0, m.ErrorCode.PROTOCOL, f"protocol error: {exc}"))
            if self._reader._broken is not None:
                await self.ws.close(1002, "protocol error")
                return False
            return True
        for msg in events:
            self._dispatch(msg)
        return True

    def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, m.Hello):
            self._spawn(self._on_hello(msg))
            return
        if not self._hello:
            self._spawn(self.send(m.Error(getattr(msg, "req", 0), m.ErrorCode.PROTOCOL,
                                          "the first message must be hello")))
            return
        if isinstance(msg, m.Interrupt):
            self._spawn(self._on_interrupt(msg))
        elif isinstance(msg, m.Input):
            if self.session is not None:
                self.session.send_input(msg.value)
        elif len(self._tasks) >= MAX_IN_FLIGHT:
            self._spawn(self.send(m.Error(getattr(msg, "req", 0), m.ErrorCode.BAD_REQUEST, (
                f"too many requests in flight on this connection (at most {MAX_IN_FLIGHT}): "
                "wait for answers before sending more"))))
        elif isinstance(msg, m.LeaseRequest):
            self._spawn(self._on_lease(msg), msg.req)
        elif isinstance(msg, m.Release):
            self._spawn(self._on_release(msg), msg.req)
        elif isinstance(msg, (m.Execute, m.Push, m.Pull, m.ShellRequest, m.Replay, m.Park, m.Resume)):
            self._spawn(self._on_session_request(msg), msg.req)
        else:
            self._spawn(self.send(m.Error(getattr(msg, "req", 0), m.ErrorCode.BAD_REQUEST,
                                          f"{msg.type.value} is not a client request")))

    def _spawn(self, coro: Any, req: int = 0) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Any, req: int) -> None:
        """Run a request's handler; an error it did not answer still answers
        request ``req``, so the client is never left waiting."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except RemoteGpuError as exc:
            codes = {c.value: c for c in m.ErrorCode}
            await self.send(m.Error(req, codes.get(getattr(exc, "code", ""), m.ErrorCode.INTERNAL), str(exc)))
        except Exception as exc:
            log.exception("request from %s failed", self.user)
            await self.send(m.Error(req, m.ErrorCode.INTERNAL,
                                    f"internal server error ({type(exc).__name__}); the server's log has more"))

    # -- handlers -----------------------------------------------------------

    async def _on_hello(self, msg: m.Hello) -> None:
        if msg.protocol != PROTOCOL_VERSION:
            await self.send(m.Error(0, m.ErrorCode.VERSION_MISMATCH, (
                f"protocol version mismatch: the client speaks {msg.protocol}, this server speaks "
                f"{PROTOCOL_VERSION}; install the same remote-gpu-kernel version on both sides"
            )))
            await self.ws.close(1002, "protocol version mismatch")
            return
        self._hello = True
        await self.send(m.Welcome(PROTOCOL_VERSION, self.server_version, self.user))

    async def _on_interrupt(self, msg: m.Interrupt) -> None:
        if self.session is not None:
            await self.session.interrupt()

    async def _on_lease(self, msg: m.LeaseRequest) -> None:
        sessions = self.sessions
        if self.closed:
            return  # its client left before this task ran: nothing to queue or resume for
        if self.session is not None and not self.session.released:
            await self._granted(msg.req, self.session, resumed=True, waited=0.0)
            return
        if msg.resume:
            session = sessions.get(msg.resume)
            if session is not None and session.user == self.user and not session.released:
                self._attach(session)
                await self._granted(msg.req, session, resumed=True, waited=0.0)
                return
            reason = sessions.release_reason(msg.resume) or "it is not known to this server"
            await self.send(m.Notice(msg.req, (
                f"Your earlier GPU session was released ({reason}): "
                "this is a new session and its variables are gone."
            )))
        started = time.monotonic()
        self.broker.apply_token_quota(self.token)
        entry = LeaseRequestEntry(self.broker.new_key(), self.user, msg.gpus, time.time(),
                                  priority=msg.priority, pool=msg.pool)
        self._waiting[entry.key] = msg.req
        try:
            slots = await self.broker.wait_for_lease(entry, self)
        except ValueError as exc:
            await self.send(m.Error(msg.req, m.ErrorCode.LEASE_REFUSED, str(exc)))
            return
        finally:
            self._waiting.pop(entry.key, None)
        # The notebook's path is only shown, never used as a path here: keep
        # a bounded piece of it.
        notebook = msg.notebook[:MAX_NOTEBOOK] if msg.notebook else None
        session = await sessions.open(self.user, slots, notebook, priority=msg.priority)
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
        if key not in self._waiting or self.closed:
            return
        self._positions[key] = position
        if self._position_task is None or self._position_task.done():
            self._position_task = asyncio.get_running_loop().create_task(self._send_positions())

    async def _send_positions(self) -> None:
        while self._positions:
            key, position = self._positions.popitem()
            req = self._waiting.get(key)
            if req is not None:
                await self.send(m.QueuePosition(req, position))

    async def _granted(self, req: int, session: Session, resumed: bool, waited: float) -> None:
        await self.send(m.LeaseGranted(req, session.id, [str(s) for s in session.slots], resumed,
                                       waited, session.language_info, parked=session.parked is not None))

    async def _on_release(self, msg: m.Release) -> None:
        session = self.session
        if session is None or session.released:
            await self.send(m.Released(msg.req, session.id if session else "", "no lease was held"))
            return
        self.session = None
        await self.sessions.release(session, "released by the client", req=msg.req, notify=self.send)

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
            await session.execute(msg, self)
        elif isinstance(msg, m.Push):
            await session.push(msg, self)
        elif isinstance(msg, m.Pull):
            await session.pull(msg, self)
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

    async def _closed(self) -> None:
        self.closed = True
        self._reader.abort("the client disconnected in the middle of a message")
        for key in list(self._waiting):
            self.broker.cancel(key)
        self._waiting.clear()
        self._positions.clear()
        if self.session is not None and not self.session.released:
            self.sessions.detach(self.session, self.send)
