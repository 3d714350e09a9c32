"""The live sessions of one server: open, attach, detach, release, idle release.

:class:`SessionManager` turns a grant (slots from the :class:`LeaseBroker`)
into a :class:`Session` with a worker from the pool, keeps it through
disconnects for the grace period, releases it (worker killed, slots back
to the broker, the client told) and releases idle ones. It remembers why
recently released sessions ended, for a client that comes back to one
(a bounded memory: the oldest reasons are forgotten first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence

from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.typing import SessionId, SlotId

from .broker import LeaseBroker
from .session import Send, Session, SessionContext

__all__ = ["RELEASED_REMEMBERED", "SessionManager"]

log = logging.getLogger("remote_gpu_server")

#: How many released sessions' reasons are remembered for clients that come back.
RELEASED_REMEMBERED = 10_000


class SessionManager:
    """Sessions by id. ``grace``: seconds a detached session is kept;
    ``idle_timeout``: the server's default idle release (a pool may set its own)."""

    def __init__(self, context: SessionContext, broker: LeaseBroker, *, grace: float,
                 idle_timeout: float) -> None:
        self.context = context
        self.broker = broker
        self.grace = grace
        self.idle_timeout_default = idle_timeout
        self._sessions: dict[SessionId, Session] = {}
        self._released: OrderedDict[str, str] = OrderedDict()
        self._releasing: set[asyncio.Task[None]] = set()

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(SessionId(session_id))

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    async def open(self, user: str, slots: Sequence[SlotId], notebook: str | None = None) -> Session:
        """A session on ``slots`` (granted to ``user``); the slots go back if it fails."""
        try:
            worker = await self.context.pool.take(list(slots), user)
        except BaseException:
            self.broker.free(slots)
            raise
        session = Session(self.context, user, list(slots), worker, notebook, on_lost=self._lost)
        self._sessions[session.id] = session
        try:
            await self.context.store.create_session(session.id, user, [str(s) for s in slots], notebook)
        except Exception:
            log.exception("could not record session %s in the store; it runs on", session.id[:8])
        log.info("%s leased %s (session %s)", user, ",".join(slots), session.id[:8])
        return session

    def attach(self, session: Session, send: Send) -> None:
        """``send`` (a connection's) now gets what is not an answer to a request."""
        if session.grace_handle is not None:
            session.grace_handle.cancel()
            session.grace_handle = None
        session.send = send

    def detach(self, session: Session, send: Send) -> None:
        """The connection with ``send`` went away: keep the session for the grace period."""
        if session.send != send:
            return
        session.send = None
        reason = f"the client disconnected and did not come back within {self.grace:g} s"
        session.grace_handle = asyncio.get_running_loop().call_later(
            self.grace, lambda: self._release_soon(session, reason))

    def _lost(self, session: Session, reason: str) -> None:
        """The session cannot go on (its node went away): release it, its cell failed."""
        log.warning("session %s of %s is lost: %s", session.id[:8], session.user, reason)
        self._release_soon(session, reason, job_state="failed")

    def _release_soon(self, session: Session, reason: str, job_state: str = "cancelled") -> None:
        self._background(self.release(session, reason, job_state=job_state))

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def release_reason(self, session_id: str) -> str | None:
        return self._released.get(session_id)

    async def release(self, session: Session, reason: str, req: int = 0,
                      notify: Callable[[m.Message], Awaitable[None]] | None = None,
                      job_state: str = "cancelled") -> None:
        """End ``session``'s lease: kill its worker, free its slots, tell its client."""
        if session.released:
            return
        send = notify or session.send
        await session.close(reason, job_state)
        self._sessions.pop(session.id, None)
        self._released[session.id] = reason
        while len(self._released) > RELEASED_REMEMBERED:
            self._released.popitem(last=False)
        try:
            await self.context.store.release_session(session.id, reason)
        except Exception:
            log.exception("could not record the release of session %s", session.id[:8])
        log.info("released session %s of %s: %s", session.id[:8], session.user, reason)
        self.broker.free(session.slots)
        if notify is not None:
            await notify(m.Released(req, session.id, reason))  # the requester's own answer
        elif send is not None:
            # The attached client is told without waiting for it: one that
            # does not read must not hold up an HTTP release, the idle
            # reaper or the shutdown.
            self._background(send(m.Released(req, session.id, reason)))

    def idle_timeout(self, session: Session) -> float:
        """The session's pool's idle timeout, else the server's."""
        pool_timeout = self.broker.pool_of(session.slots[0]).idle_timeout
        return self.idle_timeout_default if pool_timeout is None else pool_timeout

    async def release_idle(self) -> None:
        """Release every session idle for longer than its timeout."""
        now = time.monotonic()
        for session in list(self._sessions.values()):
            timeout = self.idle_timeout(session)
            if not session.busy and now - session.last_active > timeout:
                pool = self.broker.pool_of(session.slots[0])
                which = ("--idle-timeout" if pool.idle_timeout is None
                         else f"the idle timeout of pool {pool.name!r}")
                await self.release(session, f"idle for more than {timeout:g} s ({which})")

    async def close(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            await self.release(session, reason)
        for task in list(self._releasing):
            task.cancel()
