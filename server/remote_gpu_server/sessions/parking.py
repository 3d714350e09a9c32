"""Parking: an idle session's namespace goes to disk and its GPU to the queue.

:meth:`Parking.park` asks the session's worker to save its namespace into
the session folder (on the machine the worker runs on, as the session's
user: see :mod:`.parked_namespace`), then kills the worker and gives the
slots back to the broker; the session stays, holding neither (the
scheduler counts it as holding no GPU). :meth:`Parking.resume`, run by the
session's next request, asks the broker for a lease of the same pool, size
and priority as any request would (the client hears its queue position),
starts a worker in the same session folder, has it load the namespace, and
tells the client in one line what came back and how long it took.

Parked sessions are recorded in the store (:mod:`.store.parked`), so a
restarted server finds them; their files count against ``--park-quota``
(measured again at each park: what the folder holds then, not what it held
when it was parked) and, with everything else in their user's session
folders, against ``--session-disk`` (see :mod:`.user_disks`). Where users
run as uids of their own, a parked session's folder is the server's until
it resumes (:meth:`~.isolation.Isolation.seal`), so the user's other
sessions cannot write into it. They go when the session is released, or
after ``--park-keep``. A failed park changes nothing: the session goes on
with its worker and variables.

Workers on Ray nodes are not parked: their files would stay on a node that
the next lease may not be on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from remote_gpu_core.errors import LeaseError, ParkError, SessionReleased, WorkerDied
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.ids import SlotId

from ..scheduling.broker import LeaseBroker
from ..isolation.policy import Isolation
from ..isolation.tenant import Tenant
from remote_gpu_core.sizes import format_size
from .parked import PARK_FOLDER, ParkConfig, ParkedState
from ..workers.pool import Pool
from ..scheduling.scheduler import LeaseRequestEntry
from .session import Replier, Session
from ..store import ParkedRecord, Store

__all__ = ["Parking", "format_size", "park_text"]

log = logging.getLogger("remote_gpu_server")

#: How many names a one-line message lists before it says "and N more".
NAMES_SHOWN = 6


def _names(names: Iterable[str], reasons: dict[str, str] | None = None) -> str:
    listed = list(names)
    shown = [f"{n} ({reasons[n]})" if reasons else n for n in listed[:NAMES_SHOWN]]
    more = len(listed) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def tree_size(folder: Path, skip: str | None = None) -> int:
    """Bytes of the regular files under ``folder`` (a user's: links are never
    followed, and the walk holds each folder open, so swapping one for a link
    midway leads nowhere); ``skip`` names a top-level entry left out."""
    total = 0
    try:
        top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        for root, dirs, files, dir_fd in os.fwalk(".", dir_fd=top):
            if root == "." and skip is not None and skip in dirs:
                dirs.remove(skip)
            for name in files if root != "." or skip is None else [f for f in files if f != skip]:
                try:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    finally:
        os.close(top)
    return total


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def park_text(session_id: str, state: ParkedState, seconds: float, saved: int, slots: Iterable[str]) -> str:
    """The one line that says a session was parked (``saved`` bytes in ``seconds``)."""
    text = (f"Parked session {session_id[:8]} ({state.reason}): saved {len(state.names)} name(s), "
            f"{format_size(saved)}, in {seconds:.1f} s and gave {', '.join(slots)} back; "
            "the next cell restores it.")
    if state.unsaved:
        text += f" Not saved, so gone at the restore: {_names(state.unsaved, dict(state.unsaved))}."
    return text


class _Positions:
    """Sends a resuming request's queue positions to its client, latest first."""

    def __init__(self, conn: Replier | None, req: int) -> None:
        self.conn, self.req = conn, req
        self._latest: int | None = None
        self._task: asyncio.Task[None] | None = None

    def queue_position(self, key: int, position: int) -> None:
        if self.conn is None:
            return
        self._latest = position
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._latest is not None and self.conn is not None:
            position, self._latest = self._latest, None
            await self.conn.send(m.QueuePosition(self.req, position))


class Parking:
    """See the module docstring. ``sessions`` lists the server's sessions (for
    the quota); ``unsupported`` says why this server cannot park, if it cannot."""

    def __init__(self, config: ParkConfig, *, store: Store, broker: LeaseBroker, pool: Pool,
                 isolation: Isolation, sessions: Callable[[], Iterable[Session]],
                 unsupported: str | None = None) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.pool = pool
        self.isolation = isolation
        self._sessions = sessions
        self.unsupported = unsupported

    # -- policy ---------------------------------------------------------------

    def park_after(self, session: Session) -> float | None:
        """Seconds of idleness after which ``session`` is parked (its pool's, else
        the server's); None: never by itself."""
        if self.unsupported is not None:
            return None
        pool = self.broker.pool_of(session.slots[0]).park_after
        return pool if pool is not None else self.config.park_after

    def expired(self, state: ParkedState, now: float | None = None) -> bool:
        """Parked for longer than ``--park-keep``."""
        return (now if now is not None else time.time()) - state.parked_at > self.config.keep

    def keep_reason(self) -> str:
        return f"it was parked for more than {self.config.keep / 86400:g} days (--park-keep)"

    async def used(self, user: str) -> int:
        """Bytes ``user``'s parked sessions hold on disk here, measured now (their
        folders may have grown since they were parked)."""
        folders = [s.parked.tenant.folder for s in self._sessions() if s.parked is not None and s.user == user]
        return await asyncio.to_thread(lambda: sum(tree_size(f) for f in folders))

    def _quota_text(self, user: str, used: int, kept: int) -> str:
        assert self.config.quota is not None
        others = f"; your other parked sessions hold {format_size(used)}" if used else ""
        files = f"; the files this session wrote in its folder take {format_size(kept)}" if kept else ""
        return f"--park-quota {format_size(self.config.quota)}{others}{files}"

    # -- parking ----------------------------------------------------------------

    async def park(self, session: Session, reason: str, idle_for: float | None = None,
                   away: bool = False) -> tuple[ParkedState, float, int]:
        """Save ``session``'s namespace and free its worker and slots.

        Returns the new state, how long the save took and how many bytes it
        wrote (0 and 0 if it was parked already). Raises ParkError
        (nothing changed: the session goes on as it was) or SessionReleased.
        ``idle_for``: park only if the session is still idle that long once
        its running request (if any) is done; ``away``: only if its client is still
        away then.
        """
        if self.unsupported is not None:
            raise ParkError(f"this server cannot park sessions: {self.unsupported}")
        async with session.lock:
            if session.released:
                raise SessionReleased(f"this session was released ({session.released})", code="released")
            if session.parked is not None:
                return session.parked, 0.0, 0
            if idle_for is not None and time.monotonic() - session.last_active < idle_for:
                raise ParkError("it was used again before it could be parked")
            if away and session.send is not None:
                raise ParkError("its client came back before it could be parked")
            worker = await session.worker()
            tenant = worker.tenant
            if tenant is None:
                raise ParkError("this session has no session folder to park into; it goes on as it was")
            used = await self.used(session.user)
            # What the session wrote in its folder stays while it is parked: it counts too.
            kept = await asyncio.to_thread(tree_size, tenant.folder, PARK_FOLDER)
            limit = None if self.config.quota is None else self.config.quota - used - kept
            if limit is not None and limit <= 0:
                raise ParkError(f"your park quota is used up ({self._quota_text(session.user, used, kept)}): "
                                "release a parked session first; this one goes on as it was")
            folder = tenant.folder / PARK_FOLDER
            try:
                reply = await worker.park(str(folder), limit)
            except WorkerDied as exc:
                raise ParkError(f"the worker died while its namespace was being saved: {exc}") from None
            if not reply.get("ok"):
                if reply.get("ename") == "ParkQuotaExceeded":
                    raise ParkError(f"parking needs more than the {format_size(limit or 0)} left of your park "
                                    f"quota ({self._quota_text(session.user, used, kept)}); nothing was lost, "
                                    "the session goes on as it was")
                raise ParkError(f"the namespace could not be saved ({reply.get('ename')}: {reply.get('evalue')}); "
                                "nothing was lost, the session goes on as it was")
            nbytes = await asyncio.to_thread(tree_size, tenant.folder)
            slots = list(session.slots)
            state = ParkedState(tenant, self.broker.pool_of(slots[0]).name, len(slots), session.priority,
                                tuple(reply.get("names") or ()), dict(reply.get("unsaved") or {}), nbytes,
                                time.time(), reason, session.segments, session.environment)
            old = session.park(state)
            self.isolation.forget(tenant)
            await self.pool.recycle(old, "the session was parked", keep_folder=True)
            self.broker.free(slots)
            await self._seal(tenant)
        await self._record(session, state)
        log.info("parked session %s of %s (%s): %d name(s), %s", session.id[:8], session.user, reason,
                 len(state.names), format_size(nbytes))
        return state, float(reply.get("seconds") or 0.0), int(reply.get("nbytes") or 0)

    async def _record(self, session: Session, state: ParkedState) -> None:
        if session.released:
            return
        record = ParkedRecord(session.id, session.user, state.pool, state.gpus, state.priority,
                              str(state.tenant.folder), state.nbytes, state.names, state.unsaved,
                              state.parked_at, state.reason, session.seq, state.segment,
                              last_code=session.last_code, env=state.environment)
        try:
            await self.store.parked.add(record)
        except Exception:
            log.exception("could not record parked session %s: it would not survive a restart",
                          session.id[:8])

    # -- resuming ---------------------------------------------------------------

    async def resume(self, session: Session, req: int, conn: Replier | None) -> None:
        """Lease, start a worker in the session's folder, restore the namespace.

        Call under the session's lock. Raises LeaseError (a quota), ParkError
        (interrupted while waiting) or WorkerDied (no worker could start);
        the session then stays parked. A namespace that cannot be read back
        is said in a notice, and the session goes on with a fresh one.
        """
        state = session.parked
        if state is None:
            return
        entry = LeaseRequestEntry(self.broker.new_key(), session.user, state.gpus, time.time(),
                                  priority=state.priority, pool=state.pool, environment=state.environment)
        asked = time.monotonic()
        waiting = asyncio.ensure_future(self.broker.wait_for_lease(entry, _Positions(conn, req), "interactive"))
        session.resuming = waiting
        try:
            slots = list(await waiting)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if session.released and (current is None or not current.cancelling()):
                raise SessionReleased(f"this session was released ({session.released})",
                                      code="released") from None
            if waiting.cancelled() and (current is None or not current.cancelling()):
                raise ParkError("interrupted while waiting for a GPU to restore the parked session; "
                                "it stays parked", code="park_refused") from None
            raise
        except ValueError as exc:
            raise LeaseError(f"the parked session cannot be restored: {exc}", code="lease_refused") from None
        finally:
            session.resuming = None
        granted = time.monotonic()
        try:
            if session.released:
                raise SessionReleased(f"this session was released ({session.released})", code="released")
            await asyncio.to_thread(self.isolation.unseal, state.tenant)
            worker = await self.pool.take(slots, session.user, tenant=state.tenant, environment=state.environment)
        except BaseException:
            self.broker.free(slots)
            await self._seal(state.tenant)  # still parked: out of reach again
            raise
        self.isolation.track(state.tenant)
        try:
            reply = await worker.restore(str(state.folder))
        except WorkerDied as exc:
            reply = {"ok": False, "ename": "WorkerDied", "evalue": str(exc)}
        if session.released:  # released meanwhile, as parked: these are not its slots yet
            await self.pool.recycle(worker)
            self.broker.free(slots)
            raise SessionReleased(f"this session was released ({session.released})", code="released")
        session.unpark(worker, slots)
        await asyncio.to_thread(shutil.rmtree, state.folder, True)  # the worker deleted it; to be sure
        try:
            await self.store.parked.resumed(session.id, [str(s) for s in slots])
        except Exception:
            log.exception("could not record that session %s resumed", session.id[:8])
        text = self._restore_text(state, reply, slots, granted - asked, time.monotonic() - granted)
        log.info("resumed session %s of %s on %s", session.id[:8], session.user, ",".join(slots))
        if conn is not None:  # the request's own answer follows
            await conn.send(m.Notice(req, text))
            await conn.send(m.LeaseGranted(req, session.id, [str(s) for s in slots], True, granted - asked,
                                           session.language_info, fingerprint=session.fingerprint))

    def _restore_text(self, state: ParkedState, reply: dict[str, Any], slots: list[SlotId], waited: float,
                      took: float) -> str:
        ago = _ago(time.time() - state.parked_at)
        where = ", ".join(slots)
        wait = f" after waiting {waited:.1f} s for a GPU" if waited >= 0.1 else ""
        if not reply.get("ok"):
            return (f"Could not restore the session parked {ago} ago ({reply.get('ename')}: "
                    f"{reply.get('evalue')}): it goes on on {where} with a fresh worker, and its variables "
                    "are gone.")
        names = list(reply.get("names") or ())
        text = (f"Restored the session parked {ago} ago ({state.reason}) on {where}{wait}: "
                f"{len(names)} name(s), {format_size(int(reply.get('nbytes') or 0))}, in {took:.1f} s.")
        unsaved = dict(reply.get("unsaved") or {})
        if unsaved:
            text += f" Gone, as they could not be saved: {_names(unsaved, unsaved)}."
        failed = dict(reply.get("failed") or {})
        if failed:
            text += f" Gone, as they could not be loaded: {_names(failed, failed)}."
        for note in reply.get("notes") or ():
            text += f" {note}."
        return text

    async def _seal(self, tenant: Tenant) -> None:
        """Put a parked session's folder out of its user's reach (see the module docstring)."""
        try:
            await asyncio.to_thread(self.isolation.seal, tenant)
        except OSError as exc:
            log.warning("the parked folder %s stays in its user's reach: %s", tenant.folder, exc)

    # -- the end, and a restart -------------------------------------------------

    async def discard(self, session: Session, state: ParkedState) -> None:
        """``session`` was released while parked: its files and record go."""
        self.isolation.track(state.tenant)
        await asyncio.to_thread(self.isolation.release, state.tenant)
        try:
            await self.store.parked.remove(session.id)
        except Exception:
            log.exception("could not remove parked session %s from the store", session.id[:8])

    def state_of(self, record: ParkedRecord) -> ParkedState | None:
        """A parked session found in the store, as a state, counted as parked on its
        user's disk; None when its files are not where they should be (it is then
        released). Raises OSError where the user's disk cannot be mounted (the
        session stays parked in the store). Blocks: call in a thread."""
        folder = Path(record.folder)
        self.isolation.disks.folder_root(record.user)
        if not self.isolation.disks.owns(record.user, folder) or folder.is_symlink() \
                or not (folder / PARK_FOLDER).is_dir():
            return None
        tenant = Tenant(record.user, folder, self.isolation.identity(record.user))
        self.isolation.forget(tenant)
        return ParkedState(tenant, record.pool, record.gpus, record.priority, record.names, record.unsaved,
                           record.nbytes, record.parked, record.reason, record.segment, record.env)
