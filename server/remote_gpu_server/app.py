"""The GPU server: authentication, connections, leases, idle release.

:class:`GpuServer` owns the store, the scheduler, the warm pool and the
sessions, and serves websockets through the ``websockets`` library with
compression off (variables are raw binary, where deflate costs 40× the
throughput) and ``max_size`` equal to the protocol's frame size.
Tokens are checked in the handshake, so a bad token never opens a websocket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from remote_gpu_kernel.protocol import CHUNK_SIZE
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.typing import SessionId, SlotId

from .batch import BatchRunner
from .config import ServerConfig
from .connection import Connection
from .errors import TokenError
from .gpus import Slot, discover_slots
from .http_api import SUBMIT_PATH, HttpApi, is_websocket
from .metrics import Metrics
from .pool import Pool
from .readings import Readings
from .scheduler import Grant, LeaseRequestEntry, Quota, Scheduler
from .session import Session
from .session_files import Folders, enter
from .store import Store, TokenInfo

__all__ = ["GpuServer", "__version__"]

__version__ = "0.1.0"

#: Up to this many waiting requests, positions are sent after every event.
POSITIONS_EVERY_EVENT = 2000

log = logging.getLogger("remote_gpu_server")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class GpuServer:
    """Call :meth:`start`, then :meth:`serve_forever` or :meth:`close`.

    ``nvml`` is the NVML module for GPU readings and health (default:
    ``pynvml``, imported only when there are GPU slots); tests pass a double.
    """

    version = __version__

    def __init__(self, config: ServerConfig, *, nvml: Any | None = None) -> None:
        self.config = config
        self._nvml = nvml
        self.store: Store = None  # type: ignore[assignment]
        self.pool: Pool = None  # type: ignore[assignment]
        self.folders: Folders = None  # type: ignore[assignment]
        self.slots: list[Slot] = []
        self.scheduler: Scheduler = None  # type: ignore[assignment]
        # Quotas set on tokens, by user; the scheduler reads this mapping.
        self._token_quotas: dict[str, Quota] = dict(config.scheduler.user_quotas)
        self._keys = itertools.count(1)
        self.sessions: dict[SessionId, Session] = {}
        self.port = config.port
        self._released: dict[str, str] = {}
        self._waiters: dict[int, tuple[asyncio.Future[tuple[SlotId, ...]], Connection]] = {}
        self._positions: dict[int, int] = {}
        self._tokens: dict[int, TokenInfo] = {}
        self._server: Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._applying: set[asyncio.Task[None]] = set()  # grants handed out from sync callers
        self.readings: Readings = None  # type: ignore[assignment]
        self.batch = BatchRunner(self)
        self.metrics = Metrics(self)
        self.http = HttpApi(self)

    async def start(self) -> None:
        self.store = Store(self.config.db)
        stale = self.store.fail_interrupted_jobs("the server stopped while this job was running")
        if stale:
            log.warning("marked %d job(s) left running by an earlier server as failed", stale)
        self.slots = discover_slots(self.config.slots)
        self.scheduler = Scheduler([s.id for s in self.slots],
                                   dataclasses.replace(self.config.scheduler, user_quotas=self._token_quotas))
        self.pool = Pool(self.slots, self.config.startup_timeout)
        self.pool.start()
        self.folders = Folders(self.config.work_dir)
        self.readings = Readings(self.slots, self.pool.worker_pids, nvml=self._nvml,
                                 on_health=self._on_health)
        await self.readings.refresh()  # a GPU already faulty is out before the first lease
        self.readings.start()
        self.batch.recover()
        self._server = await serve(
            self._handle, self.config.host, self.config.port,
            process_request=self._authenticate,
            compression=None,
            max_size=CHUNK_SIZE,
            max_queue=64,
            write_limit=4 * CHUNK_SIZE,
            server_header=f"remote-gpu-server/{self.version}",
        )
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        self._announcer = asyncio.get_running_loop().create_task(self._announce_ready())
        log.info("listening on ws://%s:%d with %d slot(s): %s", self.config.host, self.port,
                 len(self.slots), ", ".join(f"{s.id} ({s.name})" for s in self.slots))

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.batch.close()
        for session in list(self.sessions.values()):
            await self.release(session, "the server shut down")
        if self.readings is not None:
            await self.readings.close()
        if self.pool is not None:
            await self.pool.close()
        if self.folders is not None:
            self.folders.close()
        if self.store is not None:
            self.store.close()

    # -- websocket ----------------------------------------------------------

    async def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        if not is_websocket(request):
            return await self.http.handle(connection, request)
        try:
            info = self.store.verify_token(bearer_token(request))
        except TokenError as exc:
            # The reason names the token's id at most, never the token itself.
            log.info("refused a connection from %s: %s", connection.remote_address, exc)
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        self._tokens[id(connection)] = info
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        info = self._tokens.pop(id(ws))
        if ws.request is not None and ws.request.path == SUBMIT_PATH:
            await self.http.submit_over_websocket(ws, info)
            return
        log.info("%s connected from %s", info.user, ws.remote_address)
        await Connection(self, ws, info).run()
        log.info("%s disconnected", info.user)

    # -- leases -------------------------------------------------------------

    def new_key(self) -> int:
        """A lease request key, unique in this server."""
        return next(self._keys)

    def apply_token_quota(self, token: TokenInfo) -> None:
        """``token``'s quotas become its user's; the latest token used wins.

        Each limit the token leaves unset is the server's for this user
        (``--max-gpus``, ``--max-waiting``), so a token that raises one limit
        does not lift the other, and a token with neither brings the
        server's back.
        """
        config = self.config.scheduler
        base = config.user_quotas.get(token.user, config.default_quota)
        quota = Quota(base.max_gpus if token.max_gpus is None else token.max_gpus,
                      base.max_waiting if token.max_waiting is None else token.max_waiting)
        if token.user in config.user_quotas or quota != config.default_quota:
            self._token_quotas[token.user] = quota
        else:
            self._token_quotas.pop(token.user, None)

    async def wait_for_lease(self, entry: LeaseRequestEntry, conn: Connection) -> tuple[SlotId, ...]:
        """Queue ``entry`` and wait for its slots; raises ValueError if impossible."""
        fut: asyncio.Future[tuple[SlotId, ...]] = asyncio.get_running_loop().create_future()
        self._waiters[entry.key] = (fut, conn)
        try:
            grants = self.scheduler.submit(entry)
        except ValueError:
            del self._waiters[entry.key]
            raise
        await self._apply(grants)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel_lease(entry.key)
            raise

    def cancel_lease(self, key: int) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter[0].done():
            waiter[0].cancel()
        self._apply_soon(self.scheduler.cancel(key))

    def _apply_soon(self, grants: list[Grant]) -> None:
        """:meth:`_apply` ``grants`` from code that cannot await; the task is kept until done."""
        task = asyncio.get_running_loop().create_task(self._apply(grants))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _apply(self, grants: list[Grant]) -> None:
        for grant in grants:
            self.metrics.granted(grant, "batch" if self.batch.job_of_key(grant.request.key) else "interactive")
            waiter = self._waiters.pop(grant.request.key, None)
            if waiter is None or waiter[0].done():
                # Its client left between grant and delivery: give the slots back.
                await self._apply(self.scheduler.release(list(grant.slots)))
                continue
            waiter[0].set_result(grant.slots)
        await self._send_positions()

    def _on_health(self, slot: SlotId, healthy: bool, problem: str | None) -> None:
        """A slot's health changed (from :class:`Readings`): lease it or stop leasing it."""
        # Positions may move either way: a request too big for the healthy
        # slots stops holding up its pool.
        self._apply_soon(self.scheduler.set_healthy(slot, healthy))

    async def _send_positions(self, force: bool = False) -> None:
        """Tell waiting clients whose position changed.

        Positions cost a sort of the whole queue; past a few thousand waiting
        requests they are sent once a reaper period instead of per event.
        """
        if len(self._waiters) > POSITIONS_EVERY_EVENT and not force:
            return
        positions = self.scheduler.positions()
        for key, position in positions.items():
            if self._positions.get(key) != position and key in self._waiters:
                self._positions[key] = position
                await self._waiters[key][1].send_position(key, position)
        for key in list(self._positions):
            if key not in positions:
                del self._positions[key]

    async def free_slots(self, slots: Sequence[SlotId]) -> None:
        """Give back slots a lease held outside a :class:`Session` (a batch job)."""
        await self._apply(self.scheduler.release(list(slots)))

    async def open_session(self, user: str, slots: tuple[SlotId, ...]) -> Session:
        try:
            worker = await self.pool.take(list(slots))
        except BaseException:
            await self._apply(self.scheduler.release(list(slots)))
            raise
        session = Session(self, user, list(slots), worker)
        # The session's own folder; its worker runs there (see session_files).
        session.folder = self.folders.create(session.id)
        await enter(worker, session.folder)
        self.sessions[session.id] = session
        self.store.create_session(session.id, user, [str(s) for s in slots])
        log.info("%s leased %s (session %s)", user, ",".join(slots), session.id[:8])
        return session

    def attach(self, session: Session, conn: Connection) -> None:
        if session.grace_handle is not None:
            session.grace_handle.cancel()
            session.grace_handle = None
        session.send = conn.send
        conn.session = session

    def detach(self, session: Session, conn: Connection) -> None:
        if session.send != conn.send:
            return
        session.send = None
        grace = self.config.grace
        reason = f"the client disconnected and did not come back within {grace:g} s"
        session.grace_handle = asyncio.get_running_loop().call_later(
            grace, lambda: asyncio.ensure_future(self.release(session, reason))
        )

    def release_reason(self, session_id: str) -> str | None:
        return self._released.get(session_id)

    async def release(self, session: Session, reason: str, req: int = 0,
                      notify: Callable[[m.Message], Awaitable[None]] | None = None) -> None:
        """End ``session``'s lease: kill its worker, free its slots, tell its client."""
        if session.released:
            return
        send = notify or session.send
        await session.close(reason)
        self.folders.remove(session.folder)
        self.sessions.pop(session.id, None)
        self._released[session.id] = reason
        self.store.release_session(session.id, reason)
        log.info("released session %s of %s: %s", session.id[:8], session.user, reason)
        await self._apply(self.scheduler.release(list(session.slots)))
        if send is not None:
            await send(m.Released(req, session.id, reason))

    async def _announce_ready(self) -> None:
        await self.pool.wait_ready()
        log.info("warm pool ready: %d/%d slot(s) have a started worker",
                 sum(self.pool.is_warm(s.id) for s in self.slots), len(self.slots))

    def idle_timeout(self, session: Session) -> float:
        """The session's pool's idle timeout, else the server's."""
        pool_timeout = self.scheduler.pool_of(session.slots[0]).idle_timeout
        return self.config.idle_timeout if pool_timeout is None else pool_timeout

    async def _reap_idle(self) -> None:
        """Release idle sessions, and let waiting requests age (scheduler tick)."""
        timeouts = [self.config.idle_timeout] + [
            p.idle_timeout for p in self.scheduler.pools if p.idle_timeout is not None]
        period = max(0.2, min(5.0, min(timeouts) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                timeout = self.idle_timeout(session)
                if not session.busy and now - session.last_active > timeout:
                    pool = self.scheduler.pool_of(session.slots[0])
                    which = ("--idle-timeout" if pool.idle_timeout is None
                             else f"the idle timeout of pool {pool.name!r}")
                    await self.release(session, f"idle for more than {timeout:g} s ({which})")
            grants = self.scheduler.tick()
            await self._apply(grants)
            await self._send_positions(force=True)

    # -- for tests and benchmarks ------------------------------------------

    async def wait_ready(self) -> None:
        await self.pool.wait_ready()
