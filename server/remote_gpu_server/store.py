"""The embedded store: users, tokens, sessions, jobs and their output.

SQLite in WAL mode, one file, opened by the server and by the CLI. Calls are
synchronous and short (well under a millisecond); the server makes them from
its event loop. Only a SHA-256 hash of each token is stored: tokens are 256
random bits, so a plain hash is enough, and the lookup is by hash followed by
a constant-time comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from remote_gpu_kernel.typing import JobId, SessionId

from .errors import StoreError, TokenError

__all__ = ["AttemptRecord", "BatchSpec", "JobRecord", "Store", "TokenInfo", "TOKEN_PREFIX"]

TOKEN_PREFIX = "rgpu_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    last_used REAL,
    max_gpus INTEGER,
    max_waiting INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    slots TEXT NOT NULL,
    created REAL NOT NULL,
    released REAL,
    reason TEXT,
    notebook TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    session_id TEXT REFERENCES sessions(id),
    kind TEXT NOT NULL DEFAULT 'cell',
    slots TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outputs (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    job_id INTEGER REFERENCES jobs(id),
    msg_type TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS outputs_job ON outputs(job_id, seq);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions(released);
CREATE TABLE IF NOT EXISTS batch_jobs (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    name TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    priority TEXT NOT NULL,
    pool TEXT,
    timeout REAL,
    retries INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_attempts (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    session_id TEXT,
    slots TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    state TEXT NOT NULL,
    error TEXT,
    PRIMARY KEY (job_id, attempt)
);
"""

JOB_STATES = ("queued", "running", "completed", "failed", "cancelled", "timed_out")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    admin: bool
    created: float
    expires: float | None
    revoked: float | None
    last_used: float | None
    #: Quotas set on this token; None: the server's defaults.
    max_gpus: int | None = None
    max_waiting: int | None = None


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: JobId
    user: str
    session: SessionId | None
    kind: str
    slots: str
    code: str
    state: str
    error: str | None
    created: float
    started: float | None
    ended: float | None
    #: The notebook of the job's session (a cell's), when its client named one.
    notebook: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a batch job asked for; ``attempt`` counts the attempts started so far."""

    id: JobId
    name: str
    gpus: int
    priority: str
    pool: str | None
    timeout: float | None
    retries: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One run of a batch job on its own lease."""

    job: JobId
    attempt: int
    session: SessionId | None
    slots: str
    started: float
    ended: float | None
    state: str
    error: str | None


def slot_count(slots: str) -> int:
    """How many slots a stored comma-separated slot list names."""
    return len([s for s in slots.split(",") if s])


class Store:
    """One SQLite file. Call :meth:`close` when done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._user_ids: dict[str, int] = {}
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add columns that later versions introduced to an older file."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}
        for name in ("max_gpus", "max_waiting"):
            if name not in columns:
                self._db.execute(f"ALTER TABLE tokens ADD COLUMN {name} INTEGER")
        if "notebook" not in {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}:
            self._db.execute("ALTER TABLE sessions ADD COLUMN notebook TEXT")

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, *args: Any) -> Any:
        return self._db.execute(sql, args).fetchone()

    # -- users and tokens ---------------------------------------------------

    def _user_id(self, name: str, create: bool = False) -> int:
        # Users are never deleted or renamed, so their ids can be cached:
        # this lookup sits on every cell's path.
        cached = self._user_ids.get(name)
        if cached is not None:
            return cached
        row = self._one("SELECT id FROM users WHERE name = ?", name)
        if row:
            self._user_ids[name] = int(row[0])
            return int(row[0])
        if not create:
            raise StoreError(f"no user named {name!r}")
        cur = self._db.execute("INSERT INTO users (name, created) VALUES (?, ?)", (name, time.time()))
        self._user_ids[name] = int(cur.lastrowid or 0)
        return self._user_ids[name]

    def create_token(self, user: str, days: float | None = None, admin: bool = False,
                     max_gpus: int | None = None, max_waiting: int | None = None) -> tuple[int, str]:
        """Create a token for ``user`` (made if new); return ``(id, token)``.

        The token itself is returned once and never stored. ``max_gpus`` and
        ``max_waiting`` set this token's quotas (None: the server's default).
        """
        if not user or not user.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise StoreError("a user name is letters, digits, '-', '_' and '.'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires = now + days * 86400 if days else None
        user_id = self._user_id(user, create=True)
        cur = self._db.execute(
            "INSERT INTO tokens (user_id, hash, admin, created, expires, max_gpus, max_waiting) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, hash_token(token), int(admin), now, expires, max_gpus, max_waiting),
        )
        return int(cur.lastrowid or 0), token

    def list_tokens(self) -> list[TokenInfo]:
        rows = self._db.execute(
            "SELECT t.id, u.name, t.admin, t.created, t.expires, t.revoked, t.last_used, "
            "t.max_gpus, t.max_waiting FROM tokens t JOIN users u ON u.id = t.user_id ORDER BY t.id"
        ).fetchall()
        return [TokenInfo(r[0], r[1], bool(r[2]), r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    def revoke_token(self, token_id: int) -> None:
        cur = self._db.execute(
            "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), token_id)
        )
        if cur.rowcount == 0:
            if self._one("SELECT id FROM tokens WHERE id = ?", token_id) is None:
                raise StoreError(f"no token with id {token_id}")
            raise StoreError(f"token {token_id} is already revoked")

    def verify_token(self, token: str | None) -> TokenInfo:
        """Return the token's owner, or raise :class:`TokenError` saying why."""
        if not token:
            raise TokenError("missing token: send 'Authorization: Bearer TOKEN'")
        digest = hash_token(token)
        row = self._one(
            "SELECT t.id, u.name, t.admin, t.created, t.expires, t.revoked, t.last_used, t.hash, "
            "t.max_gpus, t.max_waiting FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = ?",
            digest,
        )
        # compare_digest keeps the final comparison constant-time even though
        # the index lookup already found the row by its hash.
        if row is None or not hmac.compare_digest(row[7], digest):
            raise TokenError("invalid token: no such token on this server")
        info = TokenInfo(row[0], row[1], bool(row[2]), row[3], row[4], row[5], row[6], row[8], row[9])
        now = time.time()
        if info.revoked is not None:
            raise TokenError(f"revoked token: token {info.id} was revoked; ask for a new one")
        if info.expires is not None and info.expires < now:
            raise TokenError(f"expired token: token {info.id} expired; ask for a new one")
        self._db.execute("UPDATE tokens SET last_used = ? WHERE id = ?", (now, info.id))
        return info

    # -- sessions -----------------------------------------------------------

    def create_session(self, session: SessionId, user: str, slots: list[str],
                       notebook: str | None = None) -> None:
        """Record a new lease; ``notebook`` is the path its client named, if any."""
        self._db.execute(
            "INSERT INTO sessions (id, user_id, slots, created, notebook) VALUES (?, ?, ?, ?, ?)",
            (session, self._user_id(user, create=True), ",".join(slots), time.time(), notebook),
        )

    def release_session(self, session: SessionId, reason: str) -> None:
        self._db.execute(
            "UPDATE sessions SET released = ?, reason = ? WHERE id = ? AND released IS NULL",
            (time.time(), reason, session),
        )

    # -- jobs ---------------------------------------------------------------

    def create_job(self, user: str, session: SessionId | None, code: str,
                   slots: list[str], kind: str = "cell", running: bool = False) -> JobId:
        """A new job, ``queued``; or already ``running`` (one write, for a cell)."""
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO jobs (user_id, session_id, kind, slots, code, state, created, started) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self._user_id(user, create=True), session, kind, ",".join(slots), code,
             "running" if running else "queued", now, now if running else None),
        )
        return JobId(int(cur.lastrowid or 0))

    def start_job(self, job: JobId) -> None:
        self._db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?", (time.time(), job))

    def finish_job(self, job: JobId, state: str, error: str | None = None) -> None:
        if state not in JOB_STATES:
            raise StoreError(f"unknown job state {state!r}")
        self._db.execute(
            "UPDATE jobs SET state = ?, error = ?, ended = ? WHERE id = ?",
            (state, error, time.time(), job),
        )

    def job(self, job: JobId) -> JobRecord:
        row = self._one(_JOB_SELECT + " WHERE j.id = ?", job)
        if row is None:
            raise StoreError(f"no job with id {job}")
        return JobRecord(*row)

    def jobs(self, user: str | None = None, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        where, args = [], []
        if user:
            where.append("u.name = ?")
            args.append(user)
        if state:
            where.append("j.state = ?")
            args.append(state)
        sql = _JOB_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._db.execute(sql + " ORDER BY j.id DESC LIMIT ?", (*args, limit)).fetchall()
        return [JobRecord(*r) for r in rows]

    def fail_interrupted_jobs(self, reason: str) -> int:
        """Mark cells an earlier server run left queued or running as failed.

        Batch jobs are left alone: :meth:`recover_batch_jobs` re-queues them.
        """
        cur = self._db.execute(
            "UPDATE jobs SET state = 'failed', error = ?, ended = ? "
            "WHERE state IN ('queued', 'running') AND kind != 'batch'",
            (reason, time.time()),
        )
        self._db.execute(
            "UPDATE sessions SET released = ?, reason = ? WHERE released IS NULL",
            (time.time(), reason),
        )
        return cur.rowcount

    # -- output journal -----------------------------------------------------

    def append_output(self, session: SessionId, seq: int, job: JobId | None,
                      msg_type: str, content: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO outputs (session_id, seq, job_id, msg_type, content) VALUES (?, ?, ?, ?, ?)",
            (session, seq, job, msg_type, json.dumps(content, default=str)),
        )

    def append_outputs(self, rows: list[tuple[SessionId, int, JobId | None, str, dict[str, Any]]]) -> None:
        """Several :meth:`append_output` rows in one transaction."""
        if not rows:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT INTO outputs (session_id, seq, job_id, msg_type, content) VALUES (?, ?, ?, ?, ?)",
                [(sid, seq, job, kind, json.dumps(content, default=str)) for sid, seq, job, kind, content in rows],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def outputs(self, job: JobId) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self._db.execute(
            "SELECT seq, msg_type, content FROM outputs WHERE job_id = ? ORDER BY seq", (job,)
        ).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def outputs_since(self, session: SessionId, seq: int) -> list[tuple[int, JobId | None, str, dict[str, Any]]]:
        rows = self._db.execute(
            "SELECT seq, job_id, msg_type, content FROM outputs WHERE session_id = ? AND seq > ? "
            "ORDER BY seq",
            (session, seq),
        ).fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    # -- batch jobs ---------------------------------------------------------

    def create_batch_job(self, user: str, code: str, name: str, gpus: int, priority: str,
                         pool: str | None, timeout: float | None, retries: int) -> JobId:
        """A queued job of kind ``batch`` and what it asked for, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            job = self.create_job(user, None, code, [], kind="batch")
            self._db.execute(
                "INSERT INTO batch_jobs (job_id, name, gpus, priority, pool, timeout, retries) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job, name, gpus, priority, pool, timeout, retries),
            )
        return job

    def batch_spec(self, job: JobId) -> BatchSpec | None:
        row = self._one(
            "SELECT job_id, name, gpus, priority, pool, timeout, retries, attempt "
            "FROM batch_jobs WHERE job_id = ?", job,
        )
        return BatchSpec(*row) if row else None

    def start_attempt(self, job: JobId, session: SessionId, slots: list[str]) -> int:
        """Record a new attempt of ``job`` on ``slots``; the job becomes running."""
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE batch_jobs SET attempt = attempt + 1 WHERE job_id = ?", (job,))
            attempt = int(self._one("SELECT attempt FROM batch_jobs WHERE job_id = ?", job)[0])
            self._db.execute(
                "INSERT INTO job_attempts (job_id, attempt, session_id, slots, started, state) "
                "VALUES (?, ?, ?, ?, ?, 'running')",
                (job, attempt, session, ",".join(slots), now),
            )
            self._db.execute(
                "UPDATE jobs SET state = 'running', session_id = ?, slots = ?, "
                "started = COALESCE(started, ?) WHERE id = ?",
                (session, ",".join(slots), now, job),
            )
        return attempt

    def finish_attempt(self, job: JobId, attempt: int, state: str, error: str | None = None) -> None:
        if state not in JOB_STATES:
            raise StoreError(f"unknown job state {state!r}")
        self._db.execute(
            "UPDATE job_attempts SET state = ?, error = ?, ended = ? "
            "WHERE job_id = ? AND attempt = ? AND ended IS NULL",
            (state, error, time.time(), job, attempt),
        )

    def requeue_job(self, job: JobId, error: str | None = None) -> None:
        """Put a job back to ``queued`` (a retry); ``error`` says why the last attempt ended."""
        self._db.execute("UPDATE jobs SET state = 'queued', error = ? WHERE id = ?", (error, job))

    def attempts(self, job: JobId) -> list[AttemptRecord]:
        rows = self._db.execute(
            "SELECT job_id, attempt, session_id, slots, started, ended, state, error "
            "FROM job_attempts WHERE job_id = ? ORDER BY attempt", (job,),
        ).fetchall()
        return [AttemptRecord(*r) for r in rows]

    def recover_batch_jobs(self, reason: str) -> list[JobId]:
        """After a restart: batch jobs to queue again, oldest first.

        A job an earlier server left running has its attempt ended as
        failed with ``reason``; it is queued again if it has retries left,
        else it fails. Jobs that were only queued stay queued.
        """
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "UPDATE job_attempts SET state = 'failed', error = ?, ended = ? WHERE ended IS NULL",
                (reason, now),
            )
            self._db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, ended = ? WHERE kind = 'batch' "
                "AND state = 'running' AND id IN (SELECT job_id FROM batch_jobs WHERE attempt > retries)",
                (reason, now),
            )
            self._db.execute(
                "UPDATE jobs SET state = 'queued', error = ? WHERE kind = 'batch' AND state = 'running'",
                (reason,),
            )
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE kind = 'batch' AND state = 'queued' ORDER BY id"
            ).fetchall()
        return [JobId(r[0]) for r in rows]

    def job_counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs by ``(kind, state)``."""
        rows = self._db.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # -- usage --------------------------------------------------------------

    def open_sessions(self) -> list[tuple[SessionId, str, str, float]]:
        """Sessions not yet released: ``(id, user, slots, created)``."""
        rows = self._db.execute(
            "SELECT s.id, u.name, s.slots, s.created FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE s.released IS NULL ORDER BY s.created"
        ).fetchall()
        return [(SessionId(r[0]), r[1], r[2], r[3]) for r in rows]

    def gpu_seconds_by_user(self, since: float | None = None) -> dict[str, float]:
        """Slot-seconds every user's leases held since ``since`` (open leases up to now)."""
        # Summed in SQL: the sidebar asks for this every few seconds, and the
        # sessions table only grows. A lease's slot count is its commas + 1.
        rows = self._db.execute(
            "SELECT u.name, SUM((LENGTH(s.slots) - LENGTH(REPLACE(s.slots, ',', '')) + (s.slots != '')) "
            "* MAX(0.0, COALESCE(s.released, :now) - MAX(s.created, :since))) "
            "FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE COALESCE(s.released, :now) >= :since GROUP BY u.name",
            {"now": time.time(), "since": since or 0.0},
        ).fetchall()
        return {r[0]: float(r[1] or 0.0) for r in rows}

    def job_gpu_seconds(self, job: JobRecord) -> float:
        """Slot-seconds a job held: each batch attempt, or a cell's run."""
        now = time.time()
        if job.kind == "batch":
            return sum(slot_count(a.slots) * max(0.0, (a.ended or now) - a.started)
                       for a in self.attempts(job.id))
        if job.started is None:
            return 0.0
        return slot_count(job.slots) * max(0.0, (job.ended or now) - job.started)

    def outputs_after(self, job: JobId, seq: int,
                      limit: int = 1000) -> list[tuple[int, int | None, str, dict[str, Any]]]:
        """``job``'s outputs after ``seq``, at most ``limit``: ``(seq, attempt, msg_type, content)``.

        ``attempt`` is the batch attempt that printed it (None for a cell).
        """
        rows = self._db.execute(
            "SELECT o.seq, a.attempt, o.msg_type, o.content FROM outputs o "
            "LEFT JOIN job_attempts a ON a.job_id = o.job_id AND a.session_id = o.session_id "
            "WHERE o.job_id = ? AND o.seq > ? ORDER BY o.seq LIMIT ?",
            (job, seq, limit),
        ).fetchall()
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def last_output_seq(self, job: JobId) -> int:
        row = self._one("SELECT MAX(seq) FROM outputs WHERE job_id = ?", job)
        return int(row[0] or 0)


_JOB_SELECT = (
    "SELECT j.id, u.name, j.session_id, j.kind, j.slots, j.code, j.state, j.error, "
    "j.created, j.started, j.ended, s.notebook FROM jobs j JOIN users u ON u.id = j.user_id "
    "LEFT JOIN sessions s ON s.id = j.session_id"
)
