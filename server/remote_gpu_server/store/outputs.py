"""The output journal's rows in the store: what every session printed, by
sequence number, and the job each row belongs to (none for output under no
cell). :mod:`.journal` writes them in the background."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.ids import JobId, SessionId

from .database import Database
from .records import OutputRow

__all__ = ["OutputStore"]


class OutputStore:
    """The journal's rows in the store on ``db``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, rows: Sequence[OutputRow]) -> None:
        """Journal rows, in one transaction. A row already there (same session and
        seq: a retried write) is left as it is, so a retry never writes twice."""
        if not rows:
            return
        await self.db.executemany(
            "INSERT INTO outputs (session_id, seq, job_id, msg_type, content) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id, seq) DO NOTHING",
            [(r.session, r.seq, r.job, r.msg_type, json.dumps(r.content, default=str)) for r in rows],
        )

    async def of_job(self, job: JobId) -> list[tuple[int, str, dict[str, Any]]]:
        """``job``'s outputs in order: ``(seq, msg_type, content)``."""
        rows = await self.db.fetchall(
            "SELECT seq, msg_type, content FROM outputs WHERE job_id = ? ORDER BY seq", (job,))
        return [(int(r[0]), r[1], json.loads(r[2])) for r in rows]

    async def since(self, session: SessionId, seq: int) -> list[OutputRow]:
        """``session``'s outputs after ``seq``, in order."""
        rows = await self.db.fetchall(
            "SELECT seq, job_id, msg_type, content FROM outputs WHERE session_id = ? AND seq > ? ORDER BY seq",
            (session, seq))
        return [OutputRow(session, int(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]

    async def after(self, job: JobId, seq: int,
                    limit: int = 1000) -> list[tuple[int, int | None, str, dict[str, Any]]]:
        """``job``'s outputs after ``seq``, at most ``limit``: ``(seq, attempt, msg_type, content)``.

        ``attempt`` is the batch attempt that printed it (None for a cell).
        """
        rows = await self.db.fetchall(
            "SELECT o.seq, a.attempt, o.msg_type, o.content FROM outputs o "
            "LEFT JOIN job_attempts a ON a.job_id = o.job_id AND a.session_id = o.session_id "
            "WHERE o.job_id = ? AND o.seq > ? ORDER BY o.seq LIMIT ?", (job, seq, limit))
        return [(int(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]

    async def last_seq(self, job: JobId) -> int:
        """The sequence number of ``job``'s latest output (0: none)."""
        row = await self.db.fetchone("SELECT MAX(seq) FROM outputs WHERE job_id = ?", (job,))
        return int(row[0] or 0) if row else 0

    async def prune(self, before: float) -> int:
        """Delete the journals of sessions released before ``before`` (epoch
        seconds); jobs, sessions and so usage totals stay. Returns rows deleted."""
        return await self.db.execute(
            "DELETE FROM outputs WHERE session_id IN "
            "(SELECT id FROM sessions WHERE released IS NOT NULL AND released < ?)", (before,))
