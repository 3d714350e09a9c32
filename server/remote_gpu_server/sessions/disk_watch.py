"""The users' disk use, and the limit where the server holds it: :class:`DiskWatch`.

Where each user has a filesystem of their own (``filesystem`` mode, see
:mod:`.user_disks`), the kernel holds the limit, and a user's use is what
their filesystem says it holds. Elsewhere (``server`` mode: bubblewrap, or
no loop devices) the server holds it, like this:

- every :data:`PERIOD` seconds while a user has a cell running, and once
  after, one thread measures that user's session folders, live and parked
  (:func:`~.user_disks.allocated_bytes`: blocks taken, links not followed);
  one measure at a time, off the event loop;
- a measure that finds the user past the limit stops each of their running
  cells (an interrupt, then the stop ladder if the cell ignores it), and
  the cell fails with :data:`ENAME` and a message that says what happened
  and how to free space; unless that measure found less used than the one
  before it: a cell that frees space is let be.

So past the limit a user's cells fail until they free space: a cell that
deletes files (it ends before the next look, or is seen to free space),
``%gpu download`` first what they want to keep, a parked session released.
Nobody else is affected. What this does not stop: what one cell writes in
one :data:`PERIOD` goes past the limit before it is seen (workers have
``RLIMIT_FSIZE`` of the limit, so no one file outgrows it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..isolation.policy import Isolation
from remote_gpu_core.sizes import format_size
from .session import Session
from ..isolation.user_disks import DiskMode, allocated_bytes

__all__ = ["ENAME", "PERIOD", "DiskWatch"]

log = logging.getLogger("remote_gpu_server")

#: Seconds between two measures of a user whose cell runs.
PERIOD = 1.0
#: The error a cell stopped for its user's disk fails with.
ENAME = "SessionDiskFull"


class DiskWatch:
    """See the module docstring. ``sessions`` lists the server's sessions. Run
    :meth:`run` as a task in ``server`` mode; :meth:`status_json` in any."""

    def __init__(self, isolation: Isolation, sessions: Callable[[], Iterable[Session]],
                 period: float = PERIOD) -> None:
        self.isolation = isolation
        self.disks = isolation.disks
        self._sessions = sessions
        self.period = period
        self._used: dict[str, int] = {}  # the latest measure of each user (server mode)
        self._watched: set[str] = set()  # users whose cells ran at the latest look

    @property
    def enforcing(self) -> bool:
        """The server holds the limit (and :meth:`run` must run)."""
        return self.disks.mode is DiskMode.SERVER

    def used(self, user: str) -> int | None:
        """Bytes ``user``'s session folders take, as last known; None: not known."""
        if self.disks.mode is DiskMode.FILESYSTEM:
            return self.disks.used(user)
        return self._used.get(user)

    async def run(self) -> None:
        """Look every :data:`PERIOD` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.period)
            running = {s.user for s in self._sessions() if s.running and not s.released}
            for user in sorted(running | self._watched):  # once more after their cells ended
                try:
                    await self.check(user)
                except Exception:
                    log.exception("measuring %s's session folders failed", user)
            self._watched = running

    async def check(self, user: str) -> int:
        """Measure ``user``'s session folders now and stop their cells if past the
        limit (see the module docstring); returns the bytes used."""
        folders = self.isolation.folders_of(user)
        used = await asyncio.to_thread(allocated_bytes, folders)
        before = self._used.get(user)
        self._used[user] = used
        limit = self.disks.limit
        if limit is None or used <= limit or (before is not None and used < before):
            return used
        reason = self.refusal(used, limit)
        for session in self._sessions():
            if session.user == user and session.running and not session.released:
                log.info("session %s of %s: its session folders hold %s, past --session-disk %s: "
                         "stopping its cell", session.id[:8], user, format_size(used), format_size(limit))
                session.fail_cell(ENAME, reason)
        return used

    @staticmethod
    def refusal(used: int, limit: int) -> str:
        return (f"your session folders and packages on this GPU server hold {format_size(used)}, past your limit of "
                f"{format_size(limit)} (rgpu serve --session-disk), so this cell was stopped; your cells "
                "are stopped until you free space: delete files you no longer need (os.remove, "
                "shutil.rmtree; %gpu download what you want to keep first), release a parked session, "
                "or remove the packages you installed (%gpu env reset)")

    def status_json(self, user: str, admin: bool) -> dict[str, Any]:
        """The ``disk`` object of ``GET /api/status``: the limit, how it holds, and
        the caller's use (every user's for an admin)."""
        data = self.disks.status_json()
        data["you"] = {"user": user, "used": self.used(user), "limit": self.disks.capacity(user)}
        if admin:
            users = sorted(set(self.disks.users()) | set(self._used) | self.isolation.users())
            data["users"] = [{"user": u, "used": self.used(u), "limit": self.disks.capacity(u)} for u in users]
        return data
