"""The store: users, tokens, sessions, jobs and their output, on any :class:`Database`.

:class:`Store` is the one interface; every query and rule is written once,
here for sessions, jobs, batch jobs and usage, and beside it for what has
rules of its own: users (:mod:`.users`), tokens (:mod:`.tokens`: hashed,
their last use written behind), the output journal's rows (:mod:`.outputs`)
and parked sessions (:mod:`.parked`). :mod:`.database` runs them on SQLite
(the embedded default) and :mod:`.postgres` on PostgreSQL. Every method is a
coroutine and never blocks the event loop.

Sessions and jobs carry the id of the server that runs them
(``server_id``), so that a restarted server recovers only its own work
(:meth:`Store.fail_interrupted_jobs`, :meth:`Store.recover_batch_jobs`)
when several servers share one database. Rows written before ids were
kept have none and count as every server's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.ids import JobId, SessionId

from ..errors import StoreError
from .database import Database, Executor
from .outputs import OutputStore
from .parked import ParkedStore
from .records import (
    JOB_STATES, AttemptRecord, BatchSpec, CellRecord, JobRecord, OutputRow, SessionRecord, TokenInfo,
    slot_count
)
from .schema import migrate
from .tokens import TokenStore
from .users import UserIds

__all__ = ["Store"]

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
        self._users = UserIds(db)
        self._tokens = TokenStore(db, self._users)
        self._outputs = OutputStore(db)
        #: Parked sessions (see :mod:`.parked`).
        self.parked = ParkedStore(db, server_id)

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

    # -- tokens (see :mod:`.tokens`) -----------------------------------------

    @property
    def last_used_period(self) -> float:
        """Seconds between two writes of one token's last use (see :mod:`.tokens`)."""
        return self._tokens.last_used_period

    @last_used_period.setter
    def last_used_period(self, seconds: float) -> None:
        self._tokens.last_used_period = seconds

    async def create_token(self, user: str, days: float | None = None, admin: bool = False,
                           max_gpus: int | None = None, max_waiting: int | None = None) -> tuple[int, str]:
        """Create a token for ``user`` (made if new); return ``(id, token)``, the
        token itself only this once. ``max_gpus`` and ``max_waiting`` set its
        quotas (None: the server's default)."""
        return await self._tokens.create(user, days, admin, max_gpus, max_waiting)

    async def list_tokens(self) -> list[TokenInfo]:
        return await self._tokens.all()

    async def revoke_token(self, token_id: int) -> None:
        await self._tokens.revoke(token_id)

    async def verify_token(self, token: str | None) -> TokenInfo:
        """Return the token's owner, or raise :class:`~..errors.TokenError` saying why."""
        return await self._tokens.verify(token)

    async def write_last_used(self, everything: bool = False) -> None:
        """Write the tokens' last uses that are due (``everything``: all); never raises."""
        await self._tokens.write_last_used(everything)

    # -- sessions -----------------------------------------------------------

    async def create_session(self, session: SessionId, user: str, slots: Sequence[str],
                             notebook: str | None = None, created: float | None = None) -> None:
        """Record a lease; ``created`` (default: now) is when it began, for one
        written after the fact."""
        await self.db.execute(
            "INSERT INTO sessions (id, user_id, slots, created, server_id, notebook) VALUES (?, ?, ?, ?, ?, ?)",
            (session, await self._users.of(user, create=True), ",".join(slots),
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
            (await self._users.of(user, create=True, tx=tx), session, kind, ",".join(slots), code,
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
                (await self._users.of(cell.user, create=True, tx=tx), cell.session, ",".join(cell.slots),
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

    # -- output journal (see :mod:`.outputs`) --------------------------------

    async def append_outputs(self, rows: Sequence[OutputRow]) -> None:
        """Journal rows, in one transaction; a row already there (a retried write) stays as it is."""
        await self._outputs.append(rows)

    async def outputs(self, job: JobId) -> list[tuple[int, str, dict[str, Any]]]:
        return await self._outputs.of_job(job)

    async def outputs_since(self, session: SessionId, seq: int) -> list[OutputRow]:
        return await self._outputs.since(session, seq)

    async def outputs_after(self, job: JobId, seq: int,
                            limit: int = 1000) -> list[tuple[int, int | None, str, dict[str, Any]]]:
        """``job``'s outputs after ``seq``, at most ``limit``: ``(seq, attempt, msg_type, content)``."""
        return await self._outputs.after(job, seq, limit)

    async def last_output_seq(self, job: JobId) -> int:
        return await self._outputs.last_seq(job)

    async def prune_outputs(self, before: float) -> int:
        """Delete the journals of sessions released before ``before``; returns rows deleted."""
        return await self._outputs.prune(before)

    # -- batch jobs ---------------------------------------------------------

    async def create_batch_job(self, user: str, code: str, name: str, gpus: int, priority: str,
                               pool: str | None, timeout: float | None, retries: int,
                               env: str = "default") -> JobId:
        """A queued job of kind ``batch`` and what it asked for (``env``: its Python
        environment), in one transaction."""
        await self._users.of(user, create=True)
        async with self.db.transaction() as tx:
            job = await self.create_job(user, None, code, [], kind="batch", tx=tx)
            await tx.execute(
                "INSERT INTO batch_jobs (job_id, name, gpus, priority, pool, timeout, retries, env) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job, name, gpus, priority, pool, timeout, retries, None if env == "default" else env))
        return job

    async def batch_spec(self, job: JobId) -> BatchSpec | None:
        row = await self.db.fetchone(
            "SELECT job_id, name, gpus, priority, pool, timeout, retries, attempt, env "
            "FROM batch_jobs WHERE job_id = ?", (job,))
        if row is None:
            return None
        return BatchSpec(JobId(int(row[0])), row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                         row[8] or "default")

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
