"""The store's schema versions, restart recovery per server, retention, and the journal writer."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from remote_gpu_kernel.typing import SessionId
from remote_gpu_server.journal import Journal
from remote_gpu_server.store import SCHEMA_VERSION, OutputRow, SchemaTooNew, Store
from stores import BlockingStore

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


def test_an_old_store_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
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


def test_a_newer_store_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    BlockingStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        BlockingStore(path)


def test_a_restart_recovers_only_its_own_jobs(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with BlockingStore(path, server_id="a") as a, BlockingStore(path, server_id="b") as b:
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


def test_old_journals_are_pruned_and_usage_keeps_its_totals(tmp_path: Path) -> None:
    with BlockingStore(tmp_path / "db.sqlite3", server_id="a") as store:
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


def test_a_retried_journal_write_never_writes_a_row_twice(tmp_path: Path) -> None:
    with BlockingStore(tmp_path / "db.sqlite3") as store:
        store.create_session(SessionId("s"), "alice", ["cpu0"])
        row = OutputRow(SessionId("s"), 1, None, "stream", {"name": "stdout", "text": "x"})
        store.append_outputs([row])
        store.append_outputs([row, OutputRow(SessionId("s"), 2, None, "stream", {"name": "stdout", "text": "y"})])
        assert [(r.seq, r.content["text"]) for r in store.outputs_since(SessionId("s"), 0)] == [(1, "x"), (2, "y")]


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


def test_store_calls_do_not_block_the_event_loop(tmp_path: Path) -> None:
    """A CLI process holding SQLite's write lock stalls the store's thread, not the loop."""
    path = tmp_path / "db.sqlite3"
    BlockingStore(path).close()

    async def scenario() -> None:
        store = await Store.open(path)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # as a CLI write in progress would
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.get_running_loop().create_task(tick())
        write = asyncio.get_running_loop().create_task(store.create_token("carol"))
        await asyncio.sleep(0.5)
        assert not write.done() and ticks >= 20  # the loop kept running while the write waited
        holder.execute("COMMIT")
        await asyncio.wait_for(write, 10)
        ticker.cancel()
        holder.close()
        await store.close()

    asyncio.run(scenario())
