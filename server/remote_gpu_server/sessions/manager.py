"""The live sessions of one server: open, attach, detach, release, idle release.

:class:`SessionManager` turns a grant (slots from the :class:`LeaseBroker`)
into a :class:`Session` with a worker from the pool, keeps it through
disconnects for the grace period, releases it (worker killed, slots back
to the broker, the client told) and releases idle ones. It remembers why
recently released sessions ended, for a client that comes back to one
(a bounded memory: the oldest reasons are forgotten first).

With :class:`~.parking.Parking`, it also parks sessions idle past their
``--park-after`` (and those whose client stayed away past the grace period,
where parking is on), keeps parked sessions through disconnects and
restarts (a server that stops leaves them parked; the next one finds them
in the store), and releases those parked past ``--park-keep``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence

from remote_gpu_core.errors import ParkError, RemoteGpuError
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.ids import SessionId, SlotId

from ..environments import DEFAULT_ENVIRONMENT
from ..scheduling.broker import LeaseBroker
from .parking import Parking, park_text
from .session import Send, Session, SessionContext
from ..store import DatabaseUnavailable

__all__ = ["RELEASED_REMEMBERED", "SessionManager"]

log = logging.getLogger("remote_gpu_server")

#: How many released sessions' reasons are remembered for clients that come back.
RELEASED_REMEMBERED = 10_000


class SessionManager:
    """Sessions by id. ``grace``: seconds a detached session is kept;
    ``idle_timeout``: the server's default idle release (a pool may set its own)."""

    def __init__(self, context: SessionContext, broker: LeaseBroker, *, grace: float,
                 idle_timeout: float, parking: Parking | None = None) -> None:
        self.context = context
        self.broker = broker
        self.grace = grace
        self.idle_timeout_default = idle_timeout
        self.parking = parking
        self._sessions: dict[SessionId, Session] = {}
        self._released: OrderedDict[str, str] = OrderedDict()
        self._releasing: set[asyncio.Task[None]] = set()
        # Sessions whose park failed, with their last activity then: tried again
        # only after they were used again.
        self._unparkable: dict[SessionId, float] = {}
        #: Parks under way that nobody asked for: their task, why the session
        #: would be released instead, and whether it is its client's absence.
        self._parking: dict[SessionId, tuple[asyncio.Task[None], str, bool]] = {}

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(SessionId(session_id))

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    async def open(self, user: str, slots: Sequence[SlotId], notebook: str | None = None,
                   priority: str = "normal", environment: str = DEFAULT_ENVIRONMENT) -> Session:
        """A session on ``slots`` (granted to ``user`` at ``priority``) whose worker
        runs ``environment``; the slots go back if it fails."""
        try:
            worker = await self.context.pool.take(list(slots), user, environment=environment)
        except BaseException:
            self.broker.free(slots)
            raise
        session = Session(self.context, user, list(slots), worker, notebook, on_lost=self._lost, priority=priority,
                          environment=environment)
        self._sessions[session.id] = session
        store, created, names = self.context.store, time.time(), [str(s) for s in slots]
        try:
            await store.create_session(session.id, user, names, notebook)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("session %s runs; the store records it when the database is back: %s",
                        session.id[:8], exc)
            self.context.journal.later(lambda: store.create_session(session.id, user, names, notebook, created),
                                       f"the lease of session {session.id[:8]}")
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
        if session.parked is not None:
            return  # it holds no GPU: kept until --park-keep
        reason = f"the client disconnected and did not come back within {self.grace:g} s"
        session.grace_handle = asyncio.get_running_loop().call_later(
            self.grace, lambda: self._grace_over(session, reason))

    def _grace_over(self, session: Session, reason: str) -> None:
        """The client stayed away: park the session where parking is on, else release it."""
        session.grace_handle = None
        if self.parking is not None and self.parking.park_after(session) is not None:
            log.info("session %s of %s: its client stayed away %g s; it is parked once it has no request running "
                     "unless its client is back by then",
                     session.id[:8], session.user, self.grace)
            self._parking[session.id] = (self._background(self._park_or_release(
                session, f"its client disconnected {self.grace:g} s ago", reason)), reason, True)
        else:
            self._release_soon(session, reason)

    async def _park_or_release(self, session: Session, why: str, reason: str) -> None:
        try:
            if session.send is not None:
                return  # its client came back meanwhile
            try:
                await self.park(session, why, away=True)
            except RemoteGpuError as exc:
                if session.send is not None:
                    return  # its client came back: it goes on as it was
                log.info("session %s of %s could not be parked (%s); releasing it", session.id[:8], session.user, exc)
                await self.release(session, reason)
        finally:
            self._parking.pop(session.id, None)

    def _lost(self, session: Session, reason: str) -> None:
        """The session cannot go on (its node went away): release it, its cell failed."""
        log.warning("session %s of %s is lost: %s", session.id[:8], session.user, reason)
        self._release_soon(session, reason, job_state="failed")

    def _release_soon(self, session: Session, reason: str, job_state: str = "cancelled") -> None:
        self._background(self.release(session, reason, job_state=job_state))

    def _background(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def park(self, session: Session, reason: str, idle_for: float | None = None,
                   away: bool = False) -> m.Parked:
        """Park ``session`` (see :mod:`.parking`; ``idle_for`` and ``away`` as
        :meth:`.Parking.park` says); returns what to tell its client. Raises
        ParkError (nothing changed) or SessionReleased."""
        if self.parking is None:
            raise ParkError("this server does not park sessions")
        slots = [str(s) for s in session.slots]
        state, seconds, saved = await self.parking.park(session, reason, idle_for, away)
        self._unparkable.pop(session.id, None)
        return m.Parked(0, session.id, list(state.names), dict(state.unsaved), state.nbytes, seconds, reason,
                        park_text(session.id, state, seconds, saved, slots))

    async def _park_idle(self, session: Session, reason: str, idle_for: float) -> None:
        try:
            parked = await self.park(session, reason, idle_for)
        except RemoteGpuError as exc:
            self._unparkable[session.id] = session.last_active
            log.info("session %s of %s was not parked: %s", session.id[:8], session.user, exc)
            return
        finally:
            self._parking.pop(session.id, None)
        if session.send is not None:
            await session.send(parked)

    def release_reason(self, session_id: str) -> str | None:
        return self._released.get(session_id)

    async def release(self, session: Session, reason: str, req: int = 0,
                      notify: Callable[[m.Message], Awaitable[None]] | None = None,
                      job_state: str = "cancelled") -> None:
        """End ``session``'s lease: kill its worker, free its slots, tell its client."""
        if session.released:
            return
        send = notify or session.send
        parked = session.parked
        await session.close(reason, job_state)
        self._sessions.pop(session.id, None)
        self._unparkable.pop(session.id, None)
        self._released[session.id] = reason
        while len(self._released) > RELEASED_REMEMBERED:
            self._released.popitem(last=False)
        store, released = self.context.store, time.time()
        try:
            await store.release_session(session.id, reason)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("the store records the release of session %s when the database is back: %s",
                        session.id[:8], exc)
            self.context.journal.later(lambda: store.release_session(session.id, reason, released),
                                       f"the release of session {session.id[:8]}")
        except Exception:
            log.exception("could not record the release of session %s", session.id[:8])
        log.info("released session %s of %s: %s", session.id[:8], session.user, reason)
        if parked is not None and self.parking is not None:
            await self.parking.discard(session, parked)  # its slots went back when it was parked
        else:
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
        """Park every session idle past its ``--park-after``, release every one idle
        past its timeout, and every one parked past ``--park-keep``."""
        now, wall = time.monotonic(), time.time()
        for session in list(self._sessions.values()):
            if session.parked is not None:
                if self.parking is not None and not session.busy and self.parking.expired(session.parked, wall):
                    await self.release(session, self.parking.keep_reason())
                continue
            timeout = self.idle_timeout(session)
            parking = self._parking.get(session.id)
            if parking is not None:
                # A park its worker does not answer (its main thread never idles
                # again), or one that waits for a cell that never ends, holds
                # the slots no longer than the idle timeout; unless the client
                # it was for the absence of came back (its cell may run on).
                task, why, away = parking
                if now - session.last_active > timeout and not (away and session.send is not None):
                    task.cancel()
                    await self.release(session, f"{why}; its variables were not saved: the park got no answer "
                                                f"before the idle timeout ({timeout:g} s, {self._timeout_flag(session)})")
                continue
            if session.busy:
                continue
            park_after = self.parking.park_after(session) if self.parking is not None else None
            if park_after is not None and now - session.last_active > park_after \
                    and self._unparkable.get(session.id) != session.last_active:
                pool = self.broker.pool_of(session.slots[0])
                which = "--park-after" if pool.park_after is None else f"the park-after of pool {pool.name!r}"
                idle = f"idle for more than {park_after:g} s"
                self._parking[session.id] = (self._background(
                    self._park_idle(session, f"{idle}, {which}", park_after)), f"{idle} ({which})", False)
                continue
            if now - session.last_active > timeout:
                await self.release(session, self._idle_reason(session, timeout))

    def _idle_reason(self, session: Session, timeout: float) -> str:
        return f"idle for more than {timeout:g} s ({self._timeout_flag(session)})"

    def _timeout_flag(self, session: Session) -> str:
        pool = self.broker.pool_of(session.slots[0])
        return "--idle-timeout" if pool.idle_timeout is None else f"the idle timeout of pool {pool.name!r}"

    async def recover_parked(self) -> None:
        """Take back the sessions an earlier run of this server left parked."""
        if self.parking is None:
            return
        store = self.context.store
        for record in await store.parked.mine():
            try:
                state = await asyncio.to_thread(self.parking.state_of, record)
            except OSError as exc:
                log.error("parked session %s of %s cannot be restored now (%s): it stays parked in the "
                          "store for the next start", record.session[:8], record.user, exc)
                continue
            if state is None:
                log.warning("parked session %s of %s is gone: its files are not in %s", record.session[:8],
                            record.user, record.folder)
                await store.release_session(record.session, "its parked files were gone after a restart")
                await store.parked.remove(record.session)
                continue
            slots = [SlotId(s) for s in record.slots.split(",") if s]
            session = Session(self.context, record.user, slots, None, record.notebook, on_lost=self._lost,
                              parked=state, session_id=record.session, seq=record.seq, priority=record.priority)
            session.segments = record.segment
            session.last_code = record.last_code
            self._sessions[session.id] = session
        if self._sessions:
            log.info("found %d parked session(s) from an earlier run", len(self._sessions))

    async def close(self, reason: str) -> None:
        """Release every session but the parked ones (the next run finds those)."""
        for session in list(self._sessions.values()):
            if session.parked is not None:
                if session.resuming is not None:
                    session.resuming.cancel()
                continue
            await self.release(session, reason)
        for task in list(self._releasing):
            task.cancel()
