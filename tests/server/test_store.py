"""The store's schema versions, restart recovery per server, retention, and the journal writer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from remote_gpu_core.ids import SessionId
from remote_gpu_server.store.journal import Journal
from remote_gpu_server.store import (
    SCHEMA_VERSION, CellRecord, DatabaseUnavailable, OutputRow, SchemaTooNew, Store
)
from remote_gpu_server.sessions.unrecorded import UnrecordedCell
from remote_gpu_server.store.schema import _v1 as version_1_tables
from stores import BlockingStore, execute_raw, is_postgres
from waiting import async_wait_for

#: The tables as the first released version wrote them: no schema_version, no quotas on tokens.
OLD_SCHEMA = """
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
    hash TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    expires REAL, revoked REAL, last_used REAL);
CREATE TABLE sessions (id TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
    slots TEXT NOT NULL, created REAL NOT NULL, released REAL, reason TEXT);
CREATE TABLE jobs (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
    session_id TEXT REFERENCES sessions(id), kind TEXT NOT NULL DEFAULT 'cell',
    slots TEXT NOT NULL DEFAULT '', code TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
    created REAL NOT NULL, started REAL, ended REAL);
CREATE TABLE outputs (session_id TEXT NOT NULL, seq INTEGER NOT NULL, job_id INTEGER REFERENCES jobs(id),
    msg_type TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (session_id, seq));
INSERT INTO users VALUES (1, 'alice', 1.0);
INSERT INTO sessions VALUES ('old', 1, 'cpu0', 1.0, NULL, NULL);
INSERT INTO jobs VALUES (1, 1, 'old', 'cell', 'cpu0', 'print(1)', 'running', NULL, 1.0, 1.0, NULL);
"""


def test_a_sqlite_store_and_its_files_are_readable_by_their_owner_alone(tmp_path: Path) -> None:
    old = os.umask(0o022)  # what a server that is not root (and the CLI) runs with
    try:
        fresh = tmp_path / "fresh.sqlite3"
        with BlockingStore(fresh) as store:
            store.create_token("alice")
            modes = {s: oct(os.stat(f"{fresh}{s}").st_mode & 0o777) for s in ("", "-wal", "-shm")}
        assert modes == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}
        # A store an earlier version left readable is made private when opened.
        earlier = tmp_path / "earlier.sqlite3"
        sqlite3.connect(earlier).close()
        os.chmod(earlier, 0o644)
        with BlockingStore(earlier) as store:
            store.create_token("bob")
            assert oct(os.stat(earlier).st_mode & 0o777) == "0o600"
            assert oct(os.stat(f"{earlier}-wal").st_mode & 0o777) == "0o600"
    finally:
        os.umask(old)


def test_a_store_from_before_versions_were_kept_is_upgraded(tmp_path: Path) -> None:
    # Only SQLite stores were written before versions were kept.
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    with BlockingStore(path, server_id="a") as store:
        assert store.job(1).code == "print(1)"
        _, token = store.create_token("alice", max_gpus=2)
        assert store.verify_token(token).max_gpus == 2
        # Rows from before server ids were kept count as every server's.
        assert store.fail_interrupted_jobs("restarted") == 1
    version = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == SCHEMA_VERSION


def test_a_version_1_store_is_upgraded_and_keeps_its_rows(store_location: str) -> None:
    engine = "postgres" if is_postgres(store_location) else "sqlite"
    for statement in version_1_tables(engine):
        execute_raw(store_location, statement)
    execute_raw(store_location, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
    execute_raw(store_location, "INSERT INTO schema_version (version) VALUES (1)")
    [(user,)] = execute_raw(store_location, "INSERT INTO users (name, created) VALUES ('alice', 1.0) RETURNING id")
    execute_raw(store_location, "INSERT INTO sessions (id, user_id, slots, created) VALUES ('old', ?, 'cpu0', 1.0)",
                (user,))
    [(job,)] = execute_raw(
        store_location, "INSERT INTO jobs (user_id, session_id, kind, slots, code, state, created, started) "
        "VALUES (?, 'old', 'cell', 'cpu0', 'print(1)', 'running', 1.0, 1.0) RETURNING id", (user,))
    with BlockingStore(store_location, server_id="a") as store:
        assert store.job(job).code == "print(1)"
        assert [s.id for s in store.open_sessions()] == ["old"]
        assert store.fail_interrupted_jobs("restarted") == 1  # no server id yet: every server's
        again = store.create_job("alice", None, "2", ["cpu0"])
        assert again > job
    assert execute_raw(store_location, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_newer_store_is_refused_with_a_clear_message(store_location: str) -> None:
    BlockingStore(store_location).close()
    execute_raw(store_location, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        BlockingStore(store_location)


def test_two_stores_opening_one_database_at_once_migrate_it_once(store_location: str) -> None:
    async def scenario() -> None:
        stores = await asyncio.gather(*(Store.open(store_location, f"s{i}") for i in range(4)))
        for store in stores:
            await store.close()

    asyncio.run(scenario())
    assert execute_raw(store_location, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_restart_recovers_only_its_own_jobs(store_location: str) -> None:
    with BlockingStore(store_location, server_id="a") as a, BlockingStore(store_location, server_id="b") as b:
        cells = {}
        batches = {}
        for store, name in ((a, "a"), (b, "b")):
            session = SessionId(f"s-{name}")
            store.create_session(session, "alice", ["cpu0"])
            cells[name] = store.create_job("alice", session, "1", ["cpu0"], running=True)
            batches[name] = store.create_batch_job("alice", "2", "job", 1, "normal", "default", None, 0)
        assert a.fail_interrupted_jobs("a restarted") == 1
        assert a.recover_batch_jobs("a restarted") == [batches["a"]]
        assert a.job(cells["a"]).state == "failed"
        assert b.job(cells["b"]).state == "running"  # b's work is b's
        assert [s.id for s in b.open_sessions()] == ["s-b"]


def test_old_journals_are_pruned_and_usage_keeps_its_totals(store_location: str) -> None:
    with BlockingStore(store_location, server_id="a") as store:
        old, new = SessionId("old"), SessionId("new")
        for session in (old, new):
            store.create_session(session, "alice", ["cpu0"])
            job = store.create_job("alice", session, "print(1)", ["cpu0"], running=True)
            store.append_outputs([OutputRow(session, 1, job, "stream", {"name": "stdout", "text": "1\n"})])
        store.release_session(old, "done")
        usage = store.gpu_seconds_by_user()
        assert store.prune_outputs(before=time.time() + 1) == 1
        assert store.outputs_since(old, 0) == [] and len(store.outputs_since(new, 0)) == 1
        assert store.gpu_seconds_by_user()["alice"] >= usage["alice"]


def test_a_retried_journal_write_never_writes_a_row_twice(store_location: str) -> None:
    with BlockingStore(store_location) as store:
        store.create_session(SessionId("s"), "alice", ["cpu0"])
        row = OutputRow(SessionId("s"), 1, None, "stream", {"name": "stdout", "text": "x"})
        store.append_outputs([row])
        store.append_outputs([row, OutputRow(SessionId("s"), 2, None, "stream", {"name": "stdout", "text": "y"})])
        assert [(r.seq, r.content["text"]) for r in store.outputs_since(SessionId("s"), 0)] == [(1, "x"), (2, "y")]


def test_text_with_quotes_percent_signs_and_question_marks_is_kept(store_location: str) -> None:
    code = "print('100% done?', \"it's\", '%s', '?')"
    with BlockingStore(store_location) as store:
        job = store.create_job("alice", None, code, [])
        assert store.job(job).code == code
        assert [j.id for j in store.jobs(user="alice", state="queued")] == [job]


def test_the_journal_writes_in_order_through_failures() -> None:
    written: list[int] = []
    failures = [3]

    async def write(rows: Sequence[OutputRow]) -> None:
        await asyncio.sleep(0)
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("the database went away")
        written.extend(row.seq for row in rows)

    async def scenario() -> None:
        journal = Journal(write)
        for seq in range(1, 6):
            journal.append(OutputRow(SessionId("s"), seq, None, "stream", {}))
        await asyncio.sleep(0)
        journal.append(OutputRow(SessionId("s"), 6, None, "stream", {}))
        assert await journal.flush(timeout=10)
        assert written == [1, 2, 3, 4, 5, 6] and journal.pending == 0
        await journal.close()

    asyncio.run(scenario())


def test_late_writes_go_in_turn_with_the_rows_and_a_wrong_one_holds_nothing_up() -> None:
    written: list[object] = []
    away = [2]

    async def write(rows: Sequence[OutputRow]) -> None:
        if away[0]:
            away[0] -= 1
            raise DatabaseUnavailable("the database went away")
        written.extend(row.seq for row in rows)

    async def late(name: str) -> None:
        if away[0]:
            away[0] -= 1
            raise DatabaseUnavailable("the database went away")
        written.append(name)

    async def wrong() -> None:
        raise ValueError("not a database outage")

    async def scenario() -> None:
        journal = Journal(write)
        journal.append(OutputRow(SessionId("s"), 1, None, "stream", {}))
        journal.later(lambda: late("job"), "a job")
        journal.append(OutputRow(SessionId("s"), 2, None, "stream", {}))
        journal.later(wrong, "a wrong record")
        journal.later(lambda: late("release"), "a release")
        journal.append(OutputRow(SessionId("s"), 3, None, "stream", {}))
        assert await journal.flush(timeout=30)
        assert written == [1, "job", 2, "release", 3] and journal.pending == 0
        await journal.close()

    asyncio.run(scenario())


def test_an_unrecorded_cell_keeps_its_outputs_as_runs() -> None:
    cell = UnrecordedCell("print(1)", ("cpu0",))
    for seq in (4, 5, 6, 9, 11, 12):
        cell.output(seq)
    record = cell.record("alice", SessionId("s"), "completed", None)
    assert record.outputs == ((4, 6), (9, 9), (11, 12))
    assert record.ended >= record.started and record.slots == ("cpu0",)


def test_a_cell_recorded_late_keeps_its_times_and_gets_its_outputs(store_location: str) -> None:
    with BlockingStore(store_location) as store:
        session = SessionId("late")
        store.create_session(session, "alice", ["cpu0"], created=100.0)
        store.append_outputs([OutputRow(session, seq, None, "stream", {"text": str(seq)}) for seq in (1, 2, 3, 4)])
        record = CellRecord("alice", session, "print(1)", ("cpu0",), 200.0, 230.0, "completed", None,
                            ((1, 2), (4, 4)))
        job = store.record_cell(record)
        found = store.job(job)
        assert (found.state, found.started, found.ended, found.code) == ("completed", 200.0, 230.0, "print(1)")
        assert [seq for seq, _, _ in store.outputs(job)] == [1, 2, 4]  # 3 was not this cell's
        assert store.job_gpu_seconds(found) == 30.0
        store.release_session(session, "done", when=300.0)
        assert store.gpu_seconds_by_user(since=0)["alice"] == 200.0


@contextlib.contextmanager
def write_lock_held(location: str) -> Iterator[None]:
    """Another program holds the store's write lock (SQLite) or the users table (PostgreSQL)."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location) as holder:
            holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            yield
            holder.commit()
        return
    holder = sqlite3.connect(location, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as a CLI write in progress would
    try:
        yield
        holder.execute("COMMIT")
    finally:
        holder.close()


def test_store_calls_do_not_block_the_event_loop(store_location: str) -> None:
    """A write waiting on another program's lock stalls the store, not the loop."""
    BlockingStore(store_location).close()

    async def scenario() -> None:
        store = await Store.open(store_location)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        with write_lock_held(store_location):
            ticker = asyncio.get_running_loop().create_task(tick())
            write = asyncio.get_running_loop().create_task(store.create_token("carol"))
            await async_wait_for(lambda: ticks >= 20, 10, "20 ticks of the loop")
            assert not write.done()  # the loop kept running while the write waited
        await asyncio.wait_for(write, 10)
        ticker.cancel()
        await store.close()

    asyncio.run(scenario())
