"""Losing PostgreSQL mid-run, on a cluster of this module's own (it is stopped and started).

A stopped database makes store calls fail fast with DatabaseUnavailable and
work again once it is back; a transaction cut in the middle leaves nothing;
and a whole server goes on running a printing cell through
``pg_ctl stop -m immediate`` and a restart: nothing written before is lost,
nothing is written twice, the journal keeps its order, and a job submitted
while the database is down gets a clear error and leaves no row. Cells
run, and leases taken and released, while it is down get their records
(jobs with their outputs, times and GPU time) once it is back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import postgres as pg
from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient, ApiError
from remote_gpu_core.protocol import messages as m
from remote_gpu_server.store import DatabaseUnavailable, Store
from raw_client import RawClient
from servers import ServerProcess
from stores import BlockingStore, execute_raw
from waiting import async_wait_for, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg.PostgresCluster]:
    pg.require()
    own = pg.PostgresCluster().start()
    yield own
    own.destroy()


@pytest.fixture
def url(cluster: pg.PostgresCluster) -> Iterator[str]:
    with cluster.database() as made:
        yield made



def test_calls_fail_fast_while_the_database_is_down_and_work_once_it_is_back(
        cluster: pg.PostgresCluster, url: str) -> None:
    async def scenario() -> None:
        store = await Store.open(url, "a")
        await asyncio.gather(*(store.create_token(f"u{i}") for i in range(4)))  # several pooled connections
        await asyncio.to_thread(cluster.stop, "immediate")
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="unavailable"):
                await store.create_token("bob")
            with pytest.raises(DatabaseUnavailable):
                await store.jobs()
            assert time.monotonic() - started < 30
        finally:
            await asyncio.to_thread(cluster.start)
        # The connections the restart cut are replaced: no call fails now.
        made = await asyncio.gather(*(store.create_token(f"v{i}") for i in range(4)))
        assert [(await store.verify_token(token)).user for _, token in made] == ["v0", "v1", "v2", "v3"]
        await store.close()

    asyncio.run(scenario())


def test_a_transaction_cut_in_the_middle_leaves_nothing(url: str) -> None:
    """The job's row is written, its batch row waits on a lock, and the connection dies."""
    async def scenario() -> None:
        store = await Store.open(url, "a")
        with psycopg.connect(url) as locker, psycopg.connect(url, autocommit=True) as admin:
            locker.execute("LOCK TABLE batch_jobs IN ACCESS EXCLUSIVE MODE")
            submit = asyncio.get_running_loop().create_task(
                store.create_batch_job("alice", "print(1)", "job", 1, "normal", "default", None, 0))
            waiting = await async_wait_for(lambda: admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'INSERT INTO batch_jobs%' "
                "AND wait_event_type = 'Lock'").fetchone(), 30, "the store's insert to wait on the lock")
            admin.execute("SELECT pg_terminate_backend(%s)", waiting)
            with pytest.raises(DatabaseUnavailable):
                await submit
            locker.rollback()
        assert execute_raw(url, "SELECT COUNT(*) FROM jobs") == [(0,)]
        job = await store.create_batch_job("alice", "print(2)", "job", 1, "normal", "default", None, 0)
        assert (await store.batch_spec(job)) is not None
        await store.close()

    asyncio.run(scenario())


#: Waits for a file in the test's folder: the server runs it unisolated (an
#: isolated worker has a /tmp of its own).
CELL = """\
import os, time
i = 0
while not os.path.exists({flag!r}):
    i += 1
    print("line", i, flush=True)
    time.sleep(0.02)
print("done", i, flush=True)
"""


def test_a_server_runs_on_through_a_database_crash_and_loses_nothing(
        cluster: pg.PostgresCluster, url: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "cpu:1", "--no-isolation", db=url)
    token = server.token("alice")
    server.start()
    flag = tmp_path / "stop"
    received: list[m.Output] = []
    outcome: dict[str, object] = {}
    try:
        session = Client(server.url, token).session()

        def run() -> None:
            try:
                outcome["result"] = session.execute(CELL.format(flag=str(flag)), on_output=received.append)
            except BaseException as exc:  # handed to the test's thread
                outcome["error"] = exc

        cell = threading.Thread(target=run, daemon=True)
        cell.start()
        wait_for(lambda: len(received) >= 5, what="the cell's first lines")
        cluster.stop("immediate")
        try:
            server.wait_for_log("writing the output journal failed", timeout=60)
            before = len(received)
            wait_for(lambda: len(received) >= before + 10, what="output while the database is down")
            with pytest.raises(ApiError, match="database is unavailable"):
                ApiClient(server.url, token).submit("print('never')", name="during the outage")
        finally:
            cluster.start()
        server.wait_for_log("the output journal is written again", timeout=60)
        flag.touch()
        cell.join(60)
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.ok  # type: ignore[attr-defined]
        printed = "".join(o.content.get("text", "") for o in received if o.msg_type == "stream")
        assert printed.endswith(f"done {printed.count('line ')}\n")
        job = result.job  # type: ignore[attr-defined]
        api = ApiClient(server.url, token)
        assert api.job(job)["state"] == "completed"
        submitted = api.submit("print('after')", name="after the outage")
        assert submitted["state"] == "queued"
        session.release()
    finally:
        server.stop()
    with BlockingStore(url) as store:
        journal = store.outputs(job)
        seqs = [seq for seq, _, _ in journal]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none missing, none twice
        assert {o.seq for o in received} <= set(seqs)  # all the client saw (and execute_input)
        stored = "".join(content.get("text", "") for _, msg_type, content in journal if msg_type == "stream")
        assert stored == printed
        batch = [j.id for j in store.jobs(kind="batch")]
        assert len(batch) == 1 and store.batch_spec(batch[0]) is not None  # only the one after
    assert execute_raw(url, "SELECT COUNT(*) FROM batch_jobs") == [(1,)]


def test_cells_and_a_lease_while_the_database_is_away_are_recorded_once_it_is_back(
        cluster: pg.PostgresCluster, url: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "cpu:2", "--no-isolation", db=url)
    token = server.token("alice")
    server.start()
    try:
        api = ApiClient(server.url, token)
        session = Client(server.url, token).session()  # leased before the outage
        assert session.execute("import time", on_output=lambda _: None).ok
        with RawClient(server.url, token) as raw:  # connected before the outage
            raw.hello()
            cluster.stop("immediate")
            try:
                away = session.execute("time.sleep(0.5); print('while away')", on_output=lambda _: None)
                assert away.ok and away.stdout == "while away\n" and away.job == 0  # it ran, with no job yet
                # A lease taken while the database is away, a cell in it, and its release.
                granted = raw.lease(req=1)
                raw.send(m.Execute(2, "print('leased while away')"))
                done = raw.answer(2, m.ExecuteDone, timeout=60)
                assert isinstance(done, m.ExecuteDone) and done.status == "ok" and done.job == 0
                raw.send(m.Release(3))
                assert isinstance(raw.answer(3, m.Released), m.Released)
            finally:
                cluster.start()
        server.wait_for_log(r"the job of a cell of session \w+ \(completed\) is written", timeout=60)
        server.wait_for_log(r"the release of session \w+ is written", timeout=60)

        def recorded() -> dict[str, dict[str, Any]]:
            found = {j["first_line"]: j for j in api.jobs()}
            wanted = ("time.sleep(0.5); print('while away')", "print('leased while away')")
            return found if all(line in found for line in wanted) else {}

        jobs = wait_for(recorded, what="the cells run while the database was away, in alice's jobs")
        slept = jobs["time.sleep(0.5); print('while away')"]
        assert slept["state"] == "completed" and slept["session"] == session.id
        assert slept["gpu_seconds"] >= 0.5 and slept["ended"] - slept["started"] >= 0.5
        assert [(o["msg_type"], o["text"]) for o in api.outputs(slept["id"])] == [
            ("execute_input", ""), ("stream", "while away\n")]  # as any cell's
        leased = jobs["print('leased while away')"]
        assert leased["state"] == "completed" and leased["session"] == granted.session
        assert [o["text"] for o in api.outputs(leased["id"]) if o["msg_type"] == "stream"] == [
            "leased while away\n"]
        session.release()
    finally:
        server.stop()
    (lease,) = execute_raw(url, "SELECT created, released FROM sessions WHERE id = ?", (granted.session,))
    assert lease[0] is not None and lease[1] is not None and lease[1] >= lease[0]
