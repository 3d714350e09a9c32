"""Store benchmark: SQLite against PostgreSQL, in one run.

    python bench/bench_store.py [--jobs 10000] [--lines 20] [--calls 50] [--cells 300] [--smoke]

1. The store on its own, the way the server calls it, for each backend:
   ``--jobs`` cells in sessions of 10 (``create_session``, then
   ``create_job(running=True)`` one after the other, and again from 16
   tasks at once), ``--lines`` stream rows of output per job through the
   server's :class:`Journal` writer, every job ended (``finish_job``),
   1,000 batch submissions (a transaction each), then listings (the newest
   100 jobs; one user's completed jobs; one job's output) and usage
   (``gpu_seconds_by_user``) on the full tables, median of ``--calls``.
2. A trivial cell's round trip (``session.execute("1+1")``) on two servers
   (``rgpu serve --slots cpu:1``, ready when ``/api/status`` shows the slot
   warm: ``warm_server.py``), one per backend, taking turns.

PostgreSQL runs on a Unix socket in a temporary folder, started by this
script (``tests/postgres.py``) with its defaults, so every commit waits for
its WAL flush (``synchronous_commit = on``); the column "postgres, async
commit" is the same cluster with ``synchronous_commit = off`` for the
database, which, like SQLite's WAL mode with ``synchronous = NORMAL``, may
lose the last commits on a power loss but never corrupts. Both keep their
files on the same disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from reporting import finish, parse_args
from rounds import interleaved
from warm_server import WarmServer

from postgres import PostgresCluster, unavailable  # noqa: E402  (tests/, put on the path by warm_server)
from remote_gpu_kernel.sync import Session
from remote_gpu_core.ids import JobId, SessionId
from remote_gpu_server.store.journal import Journal
from remote_gpu_server.store import OutputRow, Store

PER_SESSION = 10
USERS = 20
BATCH_JOBS = 1000
SMOKE = {"jobs": 100, "lines": 2, "calls": 3, "cells": 5}


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await work()
    return time.perf_counter() - start


async def median_ms(call: Callable[[], Awaitable[object]], runs: int = 50) -> float:
    times = []
    for _ in range(runs + 3):
        times.append(await timed(call))
    return statistics.median(times[3:]) * 1000


async def store_phases(location: str, jobs: int, lines: int, calls: int) -> dict[str, float]:
    """What each phase costs on the store at ``location`` (empty)."""
    store = await Store.open(location, "bench")
    out: dict[str, float] = {}
    cells: list[tuple[SessionId, JobId]] = []

    async def submit() -> None:
        for s in range(jobs // PER_SESSION):
            session, user = SessionId(f"s{s}"), f"user{s % USERS}"
            await store.create_session(session, user, ["cpu0"])
            for _ in range(PER_SESSION):
                cells.append((session, await store.create_job(user, session, "print(i)", ["cpu0"], running=True)))

    out["submit: cells, one after another (jobs/s)"] = jobs / await timed(submit)

    async def submit_concurrently() -> None:
        async def one_task(t: int) -> None:
            for _ in range(jobs // 16):
                await store.create_job(f"user{t % USERS}", None, "print(i)", [], running=True)

        await asyncio.gather(*(one_task(t) for t in range(16)))

    out["submit: cells from 16 tasks at once (jobs/s)"] = (jobs // 16 * 16) / await timed(submit_concurrently)

    async def journal_writes() -> None:
        journal = Journal(store.append_outputs)
        for seq_base, (session, job) in enumerate(cells):
            seq = (seq_base % PER_SESSION) * lines
            for line in range(lines):
                journal.append(OutputRow(session, seq + line + 1, job, "stream",
                                         {"name": "stdout", "text": f"line {line} of job {job}\n"}))
            await asyncio.sleep(0)  # the loop turns once per job, as a server's would
        assert await journal.flush(timeout=600)
        await journal.close()

    out["journal writes (rows/s)"] = len(cells) * lines / await timed(journal_writes)

    async def finish() -> None:
        for _, job in cells:
            await store.finish_job(job, "completed")
        for s in range(jobs // PER_SESSION):
            await store.release_session(SessionId(f"s{s}"), "done")

    out["finish_job (jobs/s)"] = len(cells) / await timed(finish)

    async def batch() -> None:
        for i in range(min(BATCH_JOBS, jobs)):
            await store.create_batch_job(f"user{i % USERS}", "print(1)", "job", 1, "normal", "default", None, 0)

    out["submit: batch jobs, a transaction each (jobs/s)"] = min(BATCH_JOBS, jobs) / await timed(batch)
    middle = cells[len(cells) // 2][1]
    out["list the newest 100 jobs (ms)"] = await median_ms(lambda: store.jobs(limit=100), calls)
    out["list one user's completed jobs, 100 (ms)"] = await median_ms(
        lambda: store.jobs(user="user7", state="completed", limit=100), calls)
    out["one job's output (ms)"] = await median_ms(lambda: store.outputs_after(middle, 0), calls)
    out["usage: gpu_seconds_by_user (ms)"] = await median_ms(store.gpu_seconds_by_user, calls)
    await store.close()
    return out


def cell_round_trips(locations: dict[str, str], runs: int, folder: Path) -> dict[str, float]:
    """Median ms of ``1+1`` on a server per backend, the servers taking turns."""
    with contextlib.ExitStack() as stack:
        servers = {name: WarmServer(folder / name, "cpu:1", db=db) for name, db in locations.items()}
        for server in servers.values():
            stack.callback(server.stop)
            server.launch()
        for server in servers.values():
            server.wait_warm()
        sessions = {name: stack.enter_context(server.client().session()) for name, server in servers.items()}

        def cell(session: Session) -> Callable[[], None]:
            def run() -> None:
                assert session.execute("1+1", on_output=lambda _: None).ok
            return run

        spreads = interleaved({"cell": {name: cell(s) for name, s in sessions.items()}}, runs, warmup=5)["cell"]
    return {name: spread.median * 1000 for name, spread in spreads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=20, help="output rows per job")
    parser.add_argument("--calls", type=int, default=50, help="calls per listing timed (median)")
    parser.add_argument("--cells", type=int, default=300, help="round trips per backend")
    args = parse_args(parser, SMOKE)
    reason = unavailable()
    if reason:
        sys.exit(f"bench_store: {reason}")
    cluster = PostgresCluster(durable=True).start()
    import psycopg

    try:
        with tempfile.TemporaryDirectory(prefix="rgpu-bench-store-") as tmp:
            folder = Path(tmp)
            with psycopg.connect(cluster.url(), autocommit=True) as admin:
                for name in ("bench_sync", "bench_async", "bench_cells"):
                    admin.execute(f"CREATE DATABASE {name}")
                admin.execute("ALTER DATABASE bench_async SET synchronous_commit = off")
            backends = {"sqlite": str(folder / "bench.sqlite3"), "postgres": cluster.url("bench_sync"),
                        "postgres, async commit": cluster.url("bench_async")}
            results = {name: asyncio.run(store_phases(location, args.jobs, args.lines, args.calls))
                       for name, location in backends.items()}
            cells = cell_round_trips({"sqlite": str(folder / "cells.sqlite3"),
                                      "postgres": cluster.url("bench_cells")}, args.cells, folder)
    finally:
        cluster.destroy()

    print(f"\n{args.jobs} jobs, {args.lines} output rows each\n")
    print("| what | " + " | ".join(backends) + " |")
    print("| --- |" + " ---: |" * len(backends))
    for what in results["sqlite"]:
        print(f"| {what} | " + " | ".join(f"{results[name][what]:,.1f}" for name in backends) + " |")
    print(f"| trivial cell `1+1` round trip, median of {args.cells} (ms) | "
          f"{cells['sqlite']:.2f} | {cells['postgres']:.2f} | |")
    finish(args, ("psycopg", "psycopg-pool"))


if __name__ == "__main__":
    main()
