"""Parked sessions in the store: what resuming one needs, after a restart too.

A parked session keeps its row in ``sessions`` (same id, not released),
with ``parked`` set to when it was parked: from then on it holds no slot,
and usage (:meth:`~.base.Store.gpu_seconds_by_user`) stops counting it.
When it resumes, the lease it had is written down as a closed row of its
own (id ``SESSION/N``, released when it was parked) and the session's row
starts again at the resume, on its new slots; so every lease a session
held counts once, for the time it held slots. ``parked_sessions`` holds the
rest: its pool, size, priority and session folder, the names saved, the
journal's last sequence number, for the server that parked it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from remote_gpu_core.ids import SessionId

from .database import Database

__all__ = ["ParkedRecord", "ParkedStore"]


@dataclasses.dataclass(frozen=True)
class ParkedRecord:
    """One parked session as the store keeps it."""

    session: SessionId
    user: str
    pool: str
    gpus: int
    priority: str
    #: The session folder on this server's machine (the files are in it).
    folder: str
    nbytes: int
    names: tuple[str, ...]
    unsaved: Mapping[str, str]
    #: When it was parked (epoch seconds) and why.
    parked: float
    reason: str
    #: The session's last journal sequence number: its output goes on from there.
    seq: int
    #: How many leases the session held before this one was parked.
    segment: int
    slots: str = ""
    notebook: str | None = None
    last_code: str | None = None
    #: The Python environment it resumes in.
    env: str = "default"


class ParkedStore:
    """The store's parked-session queries; reached as ``Store.parked``."""

    def __init__(self, db: Database, server_id: str | None) -> None:
        self.db = db
        self.server_id = server_id

    async def add(self, record: ParkedRecord) -> None:
        """``record``'s session is parked now: it holds no slot from ``record.parked`` on."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE sessions SET parked = ? WHERE id = ?", (record.parked, record.session))
            await tx.execute(
                "INSERT INTO parked_sessions (session_id, server_id, pool, gpus, priority, folder, nbytes, "
                "names, unsaved, parked, reason, seq, segment, last_code, env) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.session, self.server_id, record.pool, record.gpus, record.priority, record.folder,
                 record.nbytes, json.dumps(list(record.names)), json.dumps(dict(record.unsaved)),
                 record.parked, record.reason, record.seq, record.segment, record.last_code,
                 None if record.env == "default" else record.env))

    async def resumed(self, session: SessionId, slots: Sequence[str]) -> None:
        """``session`` holds ``slots`` again from now on (see the module docstring)."""
        now = time.time()
        async with self.db.transaction() as tx:
            row = await tx.fetchone(
                "SELECT s.user_id, s.slots, s.created, s.parked, s.notebook, p.segment FROM sessions s "
                "JOIN parked_sessions p ON p.session_id = s.id WHERE s.id = ?", (session,))
            if row is None:
                return
            user_id, old_slots, created, parked, notebook, segment = row
            await tx.execute(
                "INSERT INTO sessions (id, user_id, slots, created, released, reason, server_id, notebook) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (f"{session}/{int(segment) + 1}", user_id, old_slots, created, parked, "parked",
                 self.server_id, notebook))
            await tx.execute("UPDATE sessions SET created = ?, parked = NULL, slots = ? WHERE id = ?",
                             (now, ",".join(slots), session))
            await tx.execute("DELETE FROM parked_sessions WHERE session_id = ?", (session,))

    async def remove(self, session: SessionId) -> None:
        """``session`` is no longer parked here (released; its files are gone)."""
        await self.db.execute("DELETE FROM parked_sessions WHERE session_id = ?", (session,))

    async def mine(self) -> list[ParkedRecord]:
        """This server's parked sessions, oldest first."""
        rows = await self.db.fetchall(
            "SELECT p.session_id, u.name, p.pool, p.gpus, p.priority, p.folder, p.nbytes, p.names, p.unsaved, "
            "p.parked, p.reason, p.seq, p.segment, s.slots, s.notebook, p.last_code, p.env FROM parked_sessions p "
            "JOIN sessions s ON s.id = p.session_id JOIN users u ON u.id = s.user_id "
            "WHERE (p.server_id IS NULL OR p.server_id = ?) AND s.released IS NULL ORDER BY p.parked",
            (self.server_id,))
        return [_record(r) for r in rows]


def _record(row: Sequence[Any]) -> ParkedRecord:
    return ParkedRecord(
        SessionId(row[0]), row[1], row[2], int(row[3]), row[4], row[5], int(row[6]),
        tuple(str(n) for n in json.loads(row[7])), {str(k): str(v) for k, v in json.loads(row[8]).items()},
        float(row[9]), row[10], int(row[11]), int(row[12]), row[13] or "", row[14], row[15], row[16] or "default")
