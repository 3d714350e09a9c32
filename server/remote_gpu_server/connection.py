"""One client's websocket: read frames, dispatch requests, send answers.

Each request runs as its own task, so an :class:`~m.Interrupt` is handled
while a cell runs; the session's lock keeps cells, pushes and pulls in
order. A malformed message gets an ``Error`` and the connection goes on;
broken framing gets an ``Error`` and a close with code 1002. Nothing a
client sends can raise out of this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from remote_gpu_kernel.errors import ProtocolError, RemoteGpuError, WorkerDied
from remote_gpu_kernel.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_kernel.protocol.framing import encode_head
from remote_gpu_kernel.protocol import messages as m

from . import session_files
from .scheduler import LeaseRequestEntry
from .session import Session

if TYPE_CHECKING:
    from .app import GpuServer
    from .store import TokenInfo

__all__ = ["Connection"]

log = logging.getLogger("remote_gpu_server")



class Connection:
    def __init__(self, server: GpuServer, ws: ServerConnection, token: TokenInfo) -> None:
        self.server = server
        self.ws = ws
        self.token = token
        self.user = token.user
        self.session: Session | None = None
        # Pushes and uploads are handed out at their header so that their buffers flow
        # on to the worker while the rest is still arriving.
        self._reader = Reader(assemble=False, early={m.MessageType.PUSH, m.MessageType.UPLOAD})
        self._send_lock = asyncio.Lock()
        self._hello = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[int, int] = {}  # lease key -> req
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
        elif isinstance(msg, m.LeaseRequest):
            self._spawn(self._on_lease(msg), msg.req)
        elif isinstance(msg, m.Release):
            self._spawn(self._on_release(msg), msg.req)
        elif isinstance(msg, (m.Execute, m.Push, m.Pull, m.ShellRequest, m.Replay, m.Upload, m.Download)):
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
            await self.send(m.Error(req, m.ErrorCode.INTERNAL, f"internal server error: {exc}"))

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
        await self.send(m.Welcome(PROTOCOL_VERSION, self.server.version, self.user,
                                  self.server.config.max_upload))

    async def _on_interrupt(self, msg: m.Interrupt) -> None:
        if self.session is not None:
            await self.session.interrupt()

    async def _on_lease(self, msg: m.LeaseRequest) -> None:
        server = self.server
        if self.closed:
            return  # its client left before this task ran: nothing to queue or resume for
        if self.session is not None and not self.session.released:
            await self._granted(msg.req, self.session, resumed=True, waited=0.0)
            return
        if msg.resume:
            session = server.sessions.get(msg.resume)
            if session is not None and session.user == self.user and not session.released:
                server.attach(session, self)
                await self._granted(msg.req, session, resumed=True, waited=0.0)
                return
            reason = server.release_reason(msg.resume) or "it is not known to this server"
            await self.send(m.Notice(msg.req, (
                f"Your earlier GPU session was released ({reason}): "
                "this is a new session and its variables are gone."
            )))
        started = time.monotonic()
        self.server.apply_token_quota(self.token)
        entry = LeaseRequestEntry(server.new_key(), self.user, msg.gpus, time.time(),
                                  priority=msg.priority, pool=msg.pool)
        self._waiting[entry.key] = msg.req
        try:
            slots = await server.wait_for_lease(entry, self)
        except ValueError as exc:
            await self.send(m.Error(msg.req, m.ErrorCode.LEASE_REFUSED, str(exc)))
            return
        finally:
            self._waiting.pop(entry.key, None)
        session = await server.open_session(self.user, slots)
        if self.closed:
            # Granted, but the client left while its worker started: it never
            # learns the session id, so nobody could resume it. Free it now
            # rather than at the idle timeout.
            await server.release(session, "the client disconnected before its lease was delivered")
            return
        server.attach(session, self)
        await self._granted(msg.req, session, resumed=False, waited=time.monotonic() - started)

    async def send_position(self, key: int, position: int) -> None:
        req = self._waiting.get(key)
        if req is not None:
            await self.send(m.QueuePosition(req, position))

    async def _granted(self, req: int, session: Session, resumed: bool, waited: float) -> None:
        await self.send(m.LeaseGranted(req, session.id, [str(s) for s in session.slots], resumed,
                                       waited, session.language_info))

    async def _on_release(self, msg: m.Release) -> None:
        session = self.session
        if session is None or session.released:
            await self.send(m.Released(msg.req, session.id if session else "", "no lease was held"))
            return
        self.session = None
        await self.server.release(session, "released by the client", req=msg.req, notify=self.send)

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
        elif isinstance(msg, m.Upload):
            await session_files.upload(session, msg, self, self.server.config.max_upload)
        elif isinstance(msg, m.Download):
            await session_files.download(session, msg, self)

    async def _closed(self) -> None:
        self.closed = True
        self._reader.abort("the client disconnected in the middle of a message")
        for key in list(self._waiting):
            self.server.cancel_lease(key)
        self._waiting.clear()
        if self.session is not None and not self.session.released:
            self.server.detach(self.session, self)
