"""Sessions: a worker replaced once however it dies, and a bounded memory of released sessions."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from remote_gpu_kernel import Client, RemoteTimeout
from remote_gpu_core.ids import SlotId
from remote_gpu_server.sessions import manager as sessions_module
from remote_gpu_server.scheduling.broker import LeaseBroker
from remote_gpu_server.store.journal import Journal
from remote_gpu_server.scheduling.scheduler import LeaseRequestEntry, SchedulerConfig
from remote_gpu_server.sessions.session import SessionContext
from remote_gpu_server.sessions.manager import SessionManager
from remote_gpu_server.store import Store
from servers import ServerProcess
from waiting import wait_for


def worker_processes(server: ServerProcess) -> list[psutil.Process]:
    """The live worker kernels the server started (warm or leased)."""
    assert server.proc is not None
    found = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "remote_gpu_server.worker_process.kernel" in " ".join(
                    child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_worker_that_dies_within_the_kill_grace_is_replaced_once(fresh_server: ServerProcess) -> None:
    # The cell runs past its timeout; the interrupt makes the worker exit at
    # once, inside the kill grace. Both the cell's timeout and the worker's
    # watch see it die: one replacement must start, and none be left over.
    fresh_server.start()
    notices: list[str] = []
    with Client(fresh_server.url, fresh_server.token()).session(on_notice=notices.append) as session:
        with pytest.raises(RemoteTimeout, match="timeout of 1 s"):
            session.execute("import os, signal, time\n"
                            "signal.signal(signal.SIGINT, lambda *a: os._exit(9))\n"
                            "time.sleep(60)", timeout=1, on_output=lambda _: None)
        assert session.execute("'still here'", on_output=lambda _: None).ok  # on the replacement
        assert any("restarted" in n for n in notices)
        # Every replacement the session started has been spawned by now: one, the one in use.
        assert len(worker_processes(fresh_server)) == 1
        started = sum(" ready on " in line for line in fresh_server.log)
    # Released: its worker goes, a warm one takes the slot, and nothing else is left.
    wait_for(lambda: sum(" ready on " in line for line in fresh_server.log) > started, 60,
             "a warm worker after the release")
    assert len(worker_processes(fresh_server)) == 1


class StandInWorker:
    """What a session reads of its worker, with no process: what is tested is
    the manager's memory, over more leases than real workers could start."""

    def __init__(self) -> None:
        self.died = asyncio.Event()
        self.language_info: dict[str, Any] = {}
        self.fingerprint: dict[str, str] = {}
        self.alive = True


class StandInPool:
    async def take(self, slot_ids: list[SlotId], user: str = "", tenant: Any = None,
                   environment: str = "default") -> StandInWorker:
        return StandInWorker()

    def unknown_environment(self, name: str) -> str | None:
        return None if name == "default" else f"there is no environment {name!r}"

    def cold_start(self, slot_ids: list[SlotId], environment: str) -> str | None:
        return None

    async def replace(self, worker: Any, reason: str | None = None) -> StandInWorker:
        return StandInWorker()

    async def recycle(self, worker: Any, reason: str | None = None, keep_folder: bool = False) -> None:
        pass


class Listener:
    def queue_position(self, key: int, position: int) -> None:
        pass


def test_released_sessions_are_remembered_up_to_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "RELEASED_REMEMBERED", 5)

    async def scenario() -> list[str | None]:
        store = await Store.open(tmp_path / "rgpu.sqlite3", "test")
        broker = LeaseBroker([SlotId("cpu0")], SchedulerConfig())
        context = SessionContext(StandInPool(), store, Journal(store.append_outputs), 1.0)  # type: ignore[arg-type]
        manager = SessionManager(context, broker, grace=1.0, idle_timeout=60.0)
        ids = []
        try:
            for n in range(8):
                entry = LeaseRequestEntry(broker.new_key(), "alice", 1, time.time())
                slots = await broker.wait_for_lease(entry, Listener())
                session = await manager.open("alice", slots)
                ids.append(session.id)
                await manager.release(session, f"reason {n}")
            return [manager.release_reason(i) for i in ids]
        finally:
            await context.journal.close()
            await store.close()

    reasons = asyncio.run(scenario())
    assert reasons == [None] * 3 + [f"reason {n}" for n in range(3, 8)]  # the oldest are forgotten
