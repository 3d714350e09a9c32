"""The store: users, tokens, sessions, jobs and their output, on any :class:`Database`.

Every query and rule is here once; :mod:`.database` runs them on SQLite
(the embedded default) and :mod:`.postgres` on PostgreSQL. Every method is
a coroutine and never blocks the event loop.

Only a SHA-256 hash of each token is stored: tokens are 256 random bits,
so a plain hash is enough, and the lookup is by hash followed by a
constant-time comparison. Verifying a token (every HTTP request and
connection) reads it every time, so a revoked token is refused at once,
but writes its last use only once per :data:`LAST_USED_PERIOD`: the uses
in between are kept here and written by :meth:`Store.write_last_used`
(called periodically by the server) and at :meth:`Store.close`.

Sessions and jobs carry the id of the server that runs them
(``server_id``), so that a restarted server recovers only its own work
(:meth:`Store.fail_interrupted_jobs`, :meth:`Store.recover_batch_jobs`)
when several servers share one database. Rows written before ids were
kept have none and count as every server's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.ids import JobId, SessionId

from ..errors import StoreError, TokenError
from .database import Database, DatabaseUnavailable, Executor
from .records import (
    JOB_STATES, AttemptRecord, BatchSpec, CellRecord, JobRecord, OutputRow, SessionRecord, TokenInfo,
    slot_count
)
from .parked import ParkedStore
from .schema import migrate

__all__ = ["LAST_USED_PERIOD", "Store", "TOKEN_PREFIX", "hash_token"]

log = logging.getLogger("remote_gpu_server")

TOKEN_PREFIX = "rgpu_"
#: Seconds between two writes of one token's last use (see the module docstring).
LAST_USED_PERIOD = 60.0

_JOB_SELECT = (
    "SELECT j.id, u.name, j.session_id, j.kind, j.slots, j.code, j.state, j.error, "
    "j.created, j.started, j.ended, s.notebook FROM jobs j JOIN users u ON u.id = j.user_id "
    "LEFT JOIN sessions s ON s.id = j.session_id"
)


def _job_filter(user: str | None, state: str | None, kind: str | None) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or nothing) and its arguments, for the jobs of a user, state and kind."""
    where, args = [], []
    for column, value in (("u.name", user), ("j.state", state), ("j.kind", kind)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    return (" WHERE " + " AND ".join(where) if where else ""), args
_TOKEN_SELECT = (
    "SELECT t.id, u.name, t.admin, t.created, t.expires, t.revoked, t.last_used, "
    "t.max_gpus, t.max_waiting, t.hash FROM tokens t JOIN users u ON u.id = t.user_id"
)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token(row: Sequence[Any]) -> TokenInfo:
    return TokenInfo(int(row[0]), row[1], bool(row[2]), row[3], row[4], row[5], row[6], row[7], row[8])


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(JobId(int(row[0])), *row[1:])


def _check_state(state: str) -> None:
    if state not in JOB_STATES:
        raise StoreError(f"unknown job state {state!r}")


class Store:
    """Open with :meth:`open`; call :meth:`close` when done.

    ``server_id`` names the server that uses it (None for the CLI, which
    owns no jobs).
    """

    def __init__(self, db: Database, server_id: str | None = None) -> None:
        self.db = db
        self.server_id = server_id
        self._user_ids: dict[str, int] = {}
        #: Parked sessions (see :mod:`.parked`).
        self.parked = ParkedStore(db, server_id)
        #: See :data:`LAST_USED_PERIOD`.
        self.last_used_period = LAST_USED_PERIOD
        self._last_used: dict[int, float] = {}  # token id -> its latest use, not yet written
        self._last_written: dict[int, float] = {}  # token id -> when its use was written (monotonic)

    @classmethod
    async def open(cls, location: str | Any, server_id: str | None = None) -> Store:
        """The store at ``location``: a ``postgresql://`` URL or a SQLite file's path.

        The schema is brought up to date; :class:`~.schema.SchemaTooNew` is
        raised for a store that a newer version wrote.
        """
        text = str(location)
        db: Database
        if text.startswith(("postgresql://", "postgres://")):
            from .postgres import PostgresDatabase

            db = await PostgresDatabase.connect(text)
        else:
            from .database import SqliteDatabase

            sqlite = SqliteDatabase(text)
            await sqlite.open()
            db = sqlite
        try:
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, server_id)

    async def close(self) -> None:
        """Write the tokens' last uses that wait, then close the database."""
        await self.write_last_used(everything=True)
        await self.db.close()

    # -- users and tokens ---------------------------------------------------

    async def _user_id(self, name: str, create: bool = False, tx: Executor | None = None) -> int:
        # Users are never deleted or renamed, so their ids can be cached:
        # this lookup sits on every cell's path.
        cached = self._user_ids.get(name)
        if cached is not None:
            return cached
        db = tx or self.db
        if create:
            await db.execute("INSERT INTO users (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                             (name, time.time()))
        row = await db.fetchone("SELECT id FROM users WHERE name = ?", (name,))
        if row is None:
            raise StoreError(f"no user named {name!r}")
        self._user_ids[name] = int(row[0])
        return self._user_ids[name]

    async def create_token(self, user: str, days: float | None = None, admin: bool = False,
                           max_gpus: int | None = None, max_waiting: int | None = None) -> tuple[int, str]:
        """Create a token for ``user`` (made if new); return ``(id, token)``.

        The token itself is returned once and never stored. ``max_gpus`` and
        ``max_waiting`` set this token's quotas (None: the server's default).
        """
        if not user or len(user) > 64 or not user.replace("-", "").replace("_", "").replace(".", "").isalnum() \
                or not user.isascii():
            raise StoreError("a user name is 1 to 64 ASCII letters, digits, '-', '_' and '.'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires = now + days * 86400 if days else None
        user_id = await self._user_id(user, create=True)
        row = await self.db.fetchone(
            "INSERT INTO tokens (user_id, hash, admin, created, expires, max_gpus, max_waiting) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (user_id, hash_token(token), int(admin), now, expires, max_gpus, max_waiting),
        )
        assert row is not None
        return int(row[0]), token

    async def list_tokens(self) -> list[TokenInfo]:
        return [_token(r) for r in await self.db.fetchall(_TOKEN_SELECT + " ORDER BY t.id")]

    async def revoke_token(self, token_id: int) -> None:
        changed = await self.db.execute(
            "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), token_id))
        if changed == 0:
            if await self.db.fetchone("SELECT id FROM tokens WHERE id = ?", (token_id,)) is None:
                raise StoreError(f"no token with id {token_id}")
            raise StoreError(f"token {token_id} is already revoked")

    async def verify_token(self, token: str | None) -> TokenInfo:
        """Return the token's owner, or raise :class:`TokenError` saying why."""
        if not token:
            raise TokenError("missing token: send 'Authorization: Bearer TOKEN'")
        digest = hash_token(token)
        row = await self.db.fetchone(_TOKEN_SELECT + " WHERE t.hash = ?", (digest,))
        # compare_digest keeps the final comparison constant-time even though
        # the index lookup already found the row by its hash.
        if row is None or not hmac.compare_digest(row[9], digest):
            raise TokenError("invalid token: no such token on this server")
        info = _token(row)
        now = time.time()
        if info.revoked is not None:
            raise TokenError(f"revoked token: token {info.id} was revoked; ask for a new one")
        if info.expires is not None and info.expires < now:
            raise TokenError(f"expired token: token {info.id} expired; ask for a new one")
        self._last_used[info.id] = now
        written = self._last_written.get(info.id)
        if written is None or time.monotonic() - written >= self.last_used_period:
            await self._write_last_used([info.id])
        return info

    async def write_last_used(self, everything: bool = False) -> None:
        """Write the last use of each token whose write is due (its last was
        :data:`LAST_USED_PERIOD` ago), or of every token (``everything``).

        Never raises: a use that cannot be written now waits for the next call.
        """
        mono = time.monotonic()
        due = [token for token in self._last_used if everything
               or mono - self._last_written.get(token, -self.last_used_period) >= self.last_used_period]
        await self._write_last_used(due)

    async def _write_last_used(self, tokens: Sequence[int]) -> None:
        uses = {token: self._last_used.pop(token) for token in tokens if token in self._last_used}
        if not uses:
            return
        mono = time.monotonic()
        for token in uses:
            self._last_written[token] = mono
        try:
            # Never backwards: another server sharing the database may have written a later use.
            await self.db.executemany(
                "UPDATE tokens SET last_used = ? WHERE id = ? AND (last_used IS NULL OR last_used < ?)",
                [(when, token, when) for token, when in uses.items()])
        except (DatabaseUnavailable, OSError, sqlite3.Error) as exc:
            for token, when in uses.items():  # kept for the next write (a later use wins)
                self._last_used[token] = max(when, self._last_used.get(token, when))
            log.warning("could not record when %d token(s) were last used: %s; trying again later",
                        len(uses), exc)

    # -- sessions -----------------------------------------------------------

    async def create_session(self, session: SessionId, user: str, slots: Sequence[str],
                             notebook: str | None = None, created: float | None = None) -> None:
        """Record a lease; ``created`` (default: now) is when it began, for one
        written after the fact."""
        await self.db.execute(
            "INSERT INTO sessions (id, user_id, slots, created, server_id, notebook) VALUES (?, ?, ?, ?, ?, ?)",
            (session, await self._user_id(user, create=True), ",".join(slots),
             time.time() if created is None else created, self.server_id, notebook),
        )

    async def release_session(self, session: SessionId, reason: str, when: float | None = None) -> None:
        """Record a lease's end, ``when`` (default: now)."""
        # A parked session held no slot since it was parked: its lease ended then.
        await self.db.execute(
            "UPDATE sessions SET released = COALESCE(parked, ?), reason = ? WHERE id = ? AND released IS NULL",
            (time.time() if when is None else when, reason, session),
        )

    async def open_sessions(self) -> list[SessionRecord]:
        """Sessions not yet released, oldest first."""
        rows = await self.db.fetchall(
            "SELECT s.id, u.name, s.slots, s.created, s.notebook FROM sessions s "
            "JOIN users u ON u.id = s.user_id WHERE s.released IS NULL ORDER BY s.created")
        return [SessionRecord(SessionId(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    # -- jobs ---------------------------------------------------------------

    async def create_job(self, user: str, session: SessionId | None, code: str, slots: Sequence[str],
                         kind: str = "cell", running: bool = False, tx: Executor | None = None) -> JobId:
        """A new job, ``queued``; or already ``running`` (one write, for a cell)."""
        now = time.time()
        row = await (tx or self.db).fetchone(
            "INSERT INTO jobs (user_id, session_id, kind, slots, code, state, created, started, server_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (await self._user_id(user, create=True, tx=tx), session, kind, ",".join(slots), code,
             "running" if running else "queued", now, now if running else None, self.server_id),
        )
        assert row is not None
        return JobId(int(row[0]))

    async def finish_job(self, job: JobId, state: str, error: str | None = None,
                         ended: float | None = None) -> None:
        """Record how a job ended, and when (``ended``, default: now)."""
        _check_state(state)
        await self.db.execute("UPDATE jobs SET state = ?, error = ?, ended = ? WHERE id = ?",
                              (state, error, time.time() if ended is None else ended, job))

    async def record_cell(self, cell: CellRecord) -> JobId:
        """The job of a cell that ran while the database was away, written now
        with its own times and end, its journaled outputs linked to it (the
        journal wrote them first, with no job), in one transaction."""
        _check_state(cell.state)
        async with self.db.transaction() as tx:
            row = await tx.fetchone(
                "INSERT INTO jobs (user_id, session_id, kind, slots, code, state, error, created, started, "
                "ended, server_id) VALUES (?, ?, 'cell', ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (await self._user_id(cell.user, create=True, tx=tx), cell.session, ",".join(cell.slots),
                 cell.code, cell.state, cell.error, cell.started, cell.started, cell.ended, self.server_id))
            assert row is not None
            job = JobId(int(row[0]))
            for first, last in cell.outputs:
                await tx.execute("UPDATE outputs SET job_id = ? WHERE session_id = ? AND seq >= ? AND seq <= ? "
                                 "AND job_id IS NULL", (job, cell.session, first, last))
        return job

    async def job(self, job: JobId) -> JobRecord:
        row = await self.db.fetchone(_JOB_SELECT + " WHERE j.id = ?", (job,))
        if row is None:
            raise StoreError(f"no job with id {job}")
        return _job(row)

    async def jobs(self, user: str | None = None, state: str | None = None, kind: str | None = None,
                   limit: int = 100) -> list[JobRecord]:
        where, args = _job_filter(user, state, kind)
        rows = await self.db.fetchall(_JOB_SELECT + where + " ORDER BY j.id DESC LIMIT ?", (*args, limit))
        return [_job(r) for r in rows]

    async def count_jobs(self, user: str | None = None, state: str | None = None,
                         kind: str | None = None) -> int:
        """How many jobs :meth:`jobs` would list with no limit."""
        where, args = _job_filter(user, state, kind)
        row = await self.db.fetchone("SELECT COUNT(*) FROM jobs j JOIN users u ON u.id = j.user_id" + where,
                                     tuple(args))
        return int(row[0]) if row is not None else 0

    def _mine(self, column: str) -> tuple[str, tuple[Any, ...]]:
        """A condition: rows of this server, or of none (written before ids were kept)."""
        return f"({column} IS NULL OR {column} = ?)", (self.server_id,)

    async def fail_interrupted_jobs(self, reason: str) -> int:
        """Mark cells this server left queued or running, and its open sessions, as ended.

        Batch jobs are left alone: :meth:`recover_batch_jobs` re-queues them.
        """
        now = time.time()
        mine, me = self._mine("server_id")
        async with self.db.transaction() as tx:
            count = await tx.execute(
                "UPDATE jobs SET state = 'failed', error = ?, ended = ? "
                f"WHERE state IN ('queued', 'running') AND kind != 'batch' AND {mine}", (reason, now, *me))
            await tx.execute("UPDATE sessions SET released = ?, reason = ? "  # parked ones are resumed later
                             f"WHERE released IS NULL AND parked IS NULL AND {mine}", (now, reason, *me))
        return count

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs by ``(kind, state)``."""
        rows = await self.db.fetchall("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # -- output journal -----------------------------------------------------

    async def append_outputs(self, rows: Sequence[OutputRow]) -> None:
        """Journal rows, in one transaction. A row already there (same session and
        seq: a retried write) is left as it is, so a retry never writes twice."""
        if not rows:
            return
        await self.db.executemany(
            "INSERT INTO outputs (session_id, seq, job_id, msg_type, content) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id, seq) DO NOTHING",
            [(r.session, r.seq, r.job, r.msg_type, json.dumps(r.content, default=str)) for r in rows],
        )

    async def outputs(self, job: JobId) -> list[tuple[int, str, dict[str, Any]]]:
        rows = await self.db.fetchall(
            "SELECT seq, msg_type, content FROM outputs WHERE job_id = ? ORDER BY seq", (job,))
        return [(int(r[0]), r[1], json.loads(r[2])) for r in rows]

    async def outputs_since(self, session: SessionId, seq: int) -> list[OutputRow]:
        rows = await self.db.fetchall(
            "SELECT seq, job_id, msg_type, content FROM outputs WHERE session_id = ? AND seq > ? ORDER BY seq",
            (session, seq))
        return [OutputRow(session, int(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]

    async def outputs_after(self, job: JobId, seq: int,
                            limit: int = 1000) -> list[tuple[int, int | None, str, dict[str, Any]]]:
        """``job``'s outputs after ``seq``, at most ``limit``: ``(seq, attempt, msg_type, content)``.

        ``attempt`` is the batch attempt that printed it (None for a cell).
        """
        rows = await self.db.fetchall(
            "SELECT o.seq, a.attempt, o.msg_type, o.content FROM outputs o "
            "LEFT JOIN job_attempts a ON a.job_id = o.job_id AND a.session_id = o.session_id "
            "WHERE o.job_id = ? AND o.seq > ? ORDER BY o.seq LIMIT ?", (job, seq, limit))
        return [(int(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]

    async def last_output_seq(self, job: JobId) -> int:
        row = await self.db.fetchone("SELECT MAX(seq) FROM outputs WHERE job_id = ?", (job,))
        return int(row[0] or 0) if row else 0

    async def prune_outputs(self, before: float) -> int:
        """Delete the journals of sessions released before ``before`` (epoch
        seconds); jobs, sessions and so usage totals stay. Returns rows deleted."""
        return await self.db.execute(
            "DELETE FROM outputs WHERE session_id IN "
            "(SELECT id FROM sessions WHERE released IS NOT NULL AND released < ?)", (before,))

    # -- batch jobs ---------------------------------------------------------

    async def create_batch_job(self, user: str, code: str, name: str, gpus: int, priority: str,
                               pool: str | None, timeout: float | None, retries: int) -> JobId:
        """A queued job of kind ``batch`` and what it asked for, in one transaction."""
        await self._user_id(user, create=True)
        async with self.db.transaction() as tx:
            job = await self.create_job(user, None, code, [], kind="batch", tx=tx)
            await tx.execute(
                "INSERT INTO batch_jobs (job_id, name, gpus, priority, pool, timeout, retries) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (job, name, gpus, priority, pool, timeout, retries))
        return job

    async def batch_spec(self, job: JobId) -> BatchSpec | None:
        row = await self.db.fetchone(
            "SELECT job_id, name, gpus, priority, pool, timeout, retries, attempt "
            "FROM batch_jobs WHERE job_id = ?", (job,))
        return BatchSpec(JobId(int(row[0])), *row[1:]) if row else None

    async def start_attempt(self, job: JobId, session: SessionId, slots: Sequence[str]) -> int:
        """Record a new attempt of ``job`` on ``slots``; the job becomes running."""
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE batch_jobs SET attempt = attempt + 1 WHERE job_id = ?", (job,))
            row = await tx.fetchone("SELECT attempt FROM batch_jobs WHERE job_id = ?", (job,))
            assert row is not None
            attempt = int(row[0])
            await tx.execute(
                "INSERT INTO job_attempts (job_id, attempt, session_id, slots, started, state) "
                "VALUES (?, ?, ?, ?, ?, 'running')", (job, attempt, session, ",".join(slots), now))
            await tx.execute(
                "UPDATE jobs SET state = 'running', session_id = ?, slots = ?, "
                "started = COALESCE(started, ?), server_id = ? WHERE id = ?",
                (session, ",".join(slots), now, self.server_id, job))
        return attempt

    async def finish_attempt(self, job: JobId, attempt: int, state: str, error: str | None = None) -> None:
        _check_state(state)
        await self.db.execute(
            "UPDATE job_attempts SET state = ?, error = ?, ended = ? "
            "WHERE job_id = ? AND attempt = ? AND ended IS NULL", (state, error, time.time(), job, attempt))

    async def requeue_job(self, job: JobId, error: str | None = None) -> None:
        """Put a job back to ``queued`` (a retry); ``error`` says why the last attempt ended."""
        await self.db.execute("UPDATE jobs SET state = 'queued', error = ? WHERE id = ?", (error, job))

    async def attempts(self, job: JobId) -> list[AttemptRecord]:
        rows = await self.db.fetchall(
            "SELECT job_id, attempt, session_id, slots, started, ended, state, error "
            "FROM job_attempts WHERE job_id = ? ORDER BY attempt", (job,))
        return [AttemptRecord(JobId(int(r[0])), *r[1:]) for r in rows]

    async def recover_batch_jobs(self, reason: str) -> list[JobId]:
        """After a restart: this server's batch jobs to queue again, oldest first.

        A job it left running has its attempt ended as failed with
        ``reason``; it is queued again if it has retries left, else it
        fails. Jobs that were only queued stay queued.
        """
        now = time.time()
        mine, me = self._mine("server_id")
        ours = f"kind = 'batch' AND {mine}"
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE job_attempts SET state = 'failed', error = ?, ended = ? WHERE ended IS NULL "
                f"AND job_id IN (SELECT id FROM jobs WHERE {ours})", (reason, now, *me))
            await tx.execute(
                f"UPDATE jobs SET state = 'failed', error = ?, ended = ? WHERE {ours} AND state = 'running' "
                "AND id IN (SELECT job_id FROM batch_jobs WHERE attempt > retries)", (reason, now, *me))
            await tx.execute(f"UPDATE jobs SET state = 'queued', error = ? WHERE {ours} AND state = 'running'",
                             (reason, *me))
            rows = await tx.fetchall(f"SELECT id FROM jobs WHERE {ours} AND state = 'queued' ORDER BY id", me)
        return [JobId(int(r[0])) for r in rows]

    # -- usage --------------------------------------------------------------

    async def gpu_seconds_by_user(self, since: float | None = None) -> dict[str, float]:
        """Slot-seconds every user's leases held since ``since`` (open leases up to now)."""
        # Summed in SQL: the sidebar asks for this every few seconds, and the
        # sessions table only grows. A lease's slot count is its commas + 1.
        big = self.db.dialect.greatest
        now, start = time.time(), since or 0.0
        rows = await self.db.fetchall(
            "SELECT u.name, SUM((LENGTH(s.slots) - LENGTH(REPLACE(s.slots, ',', '')) "
            "+ CASE WHEN s.slots != '' THEN 1 ELSE 0 END) "
            f"* {big}(0.0, COALESCE(s.released, s.parked, ?) - {big}(s.created, ?))) "
            "FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE COALESCE(s.released, s.parked, ?) >= ? GROUP BY u.name", (now, start, now, start))
        return {r[0]: float(r[1] or 0.0) for r in rows}

    async def job_gpu_seconds(self, job: JobRecord) -> float:
        """Slot-seconds a job held: each batch attempt, or a cell's run."""
        now = time.time()
        if job.kind == "batch":
            return sum(slot_count(a.slots) * max(0.0, (a.ended or now) - a.started)
                       for a in await self.attempts(job.id))
        if job.started is None:
            return 0.0
        return slot_count(job.slots) * max(0.0, (job.ended or now) - job.started)
