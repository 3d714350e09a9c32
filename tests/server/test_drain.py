"""Draining and Xid errors: a slot goes back only when a stopped worker really let go of it.

GPU slots come from ``FakeNvml`` (no GPU here): the double keeps listing a
killed worker's pid as holding GPU memory, or reports an Xid error. A CPU
slot drains for real: a process of the worker frozen by the cgroup freezer
outlives SIGKILL until it is thawed, as a process stuck in a driver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nvml_double import FakeGpu, FakeNvml
from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.cli import main as rgpu
from remote_gpu_server.app import GpuServer
from remote_gpu_server.config import ServerConfig
from remote_gpu_server.workers.drain import Drainer
from remote_gpu_server.gpus.readings import process_holders
from servers import ServerProcess
from stores import BlockingStore
from waiting import async_wait_for, wait_for

FREEZER = Path("/sys/fs/cgroup/freezer")


def quiet(_: object) -> None:
    pass


@asynccontextmanager
async def gpu_server(db: Path, nvml: FakeNvml, **config: Any) -> AsyncIterator[GpuServer]:
    server = GpuServer(ServerConfig(port=0, db=db, slots="0", drain_deadline=0.5, drain_period=0.2,
                                    **config), nvml=nvml)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def rgpu_status(url: str, token: str) -> str:
    """What ``rgpu status`` prints on a terminal wide enough for every cell."""
    out = io.StringIO()
    os.environ["COLUMNS"] = "400"
    try:
        with contextlib.redirect_stdout(out):
            assert rgpu(["status", "--url", url, "--token", token]) == 0
    finally:
        del os.environ["COLUMNS"]
    return out.getvalue()


def tokens(db: Path, *users: str, admin: str | None = None) -> list[str]:
    """A token for each of ``users``, then one for ``admin`` (an admin's) if named."""
    store = BlockingStore(str(db))
    try:
        made = [store.create_token(user)[1] for user in users]
        return made + ([store.create_token(admin, admin=True)[1]] if admin else [])
    finally:
        store.close()


class Waiter:
    """A lease request in a thread: ``granted`` once it got a slot."""

    def __init__(self, url: str, token: str) -> None:
        self.granted = threading.Event()
        self.session: Any = None
        self.positions: list[int] = []
        self._url, self._token = url, token
        self._thread = threading.Thread(target=self._wait)
        self._thread.start()

    def _wait(self) -> None:
        self.session = Client(self._url, self._token).session(on_queue=self.positions.append)
        self.granted.set()

    def join(self) -> None:
        self._thread.join(30)


def test_a_gpu_that_a_stopped_worker_still_holds_is_draining_until_it_lets_go(tmp_path: Path) -> None:
    gpu0 = FakeGpu("GPU-0")
    alice, bob, root = tokens(tmp_path / "rgpu.sqlite3", "alice", "bob", admin="root")

    async def scenario() -> None:
        async with gpu_server(tmp_path / "rgpu.sqlite3", FakeNvml([gpu0])) as server:
            url = f"ws://127.0.0.1:{server.port}"
            api = ApiClient(url, alice)
            session = await asyncio.to_thread(lambda: Client(url, alice).session())
            pid = int((await asyncio.to_thread(session.execute, "import os; print(os.getpid())", quiet)).stdout)
            gpu0.processes = [(pid, 3 << 30)]  # its CUDA context outlives the kill
            await asyncio.to_thread(session.release)

            slot = (await asyncio.to_thread(ApiClient(url, root).status))["slots"][0]
            assert slot["healthy"] is False and slot["draining"]["pids"] == [pid]
            assert slot["draining"]["processes"] == [{"pid": pid, "memory": 3 << 30}]
            assert f"process(es) {pid} (3072 MiB) of a stopped worker still hold it" in slot["problem"]
            # A user sees that it drains and how much is held, not which pids (an admin's to see).
            slot = (await asyncio.to_thread(api.status))["slots"][0]
            assert slot["healthy"] is False and slot["draining"]["pids"] == []
            assert slot["draining"]["processes"] == [{"pid": None, "memory": 3 << 30}]
            assert slot["problem"] == ("draining: 1 process(es) of a stopped worker still hold it (3072 MiB); "
                                       "not leased until they exit")
            metrics = await asyncio.to_thread(api.metrics)
            node = socket.gethostname()
            assert f'rgpu_slot_draining{{node="{node}",slot="gpu0"}} 1.0' in metrics
            assert (f'rgpu_slot_draining_process_bytes{{node="{node}",pid="{pid}",slot="gpu0"}} 3.221225472e+09'
                    in metrics)
            assert f'rgpu_slot_healthy{{node="{node}",slot="gpu0"}} 0.0' in metrics
            shown = await asyncio.to_thread(rgpu_status, url, root)
            assert f"draining: held by pid {pid} (3 GiB)" in shown
            shown = await asyncio.to_thread(rgpu_status, url, alice)
            assert "draining: held by 1 process(es) of a stopped worker" in shown and str(pid) not in shown

            waiter = Waiter(url, bob)
            await async_wait_for(lambda: waiter.positions or waiter.granted.is_set(), 30, "bob's place in the queue")
            reads = gpu0.process_reads
            await async_wait_for(lambda: gpu0.process_reads >= reads + 2, 30, "two more looks at who holds gpu0")
            assert not waiter.granted.is_set() and waiter.positions == [1]  # not leased while draining
            gpu0.processes = []  # the driver let go of it
            assert await asyncio.to_thread(waiter.granted.wait, 20)
            await asyncio.to_thread(waiter.join)
            assert waiter.session.slots == ["gpu0"]
            slot = (await asyncio.to_thread(api.status))["slots"][0]
            assert slot["draining"] is None and slot["healthy"] is True
            await asyncio.to_thread(waiter.session.release)

    asyncio.run(scenario())


@pytest.mark.parametrize(("xid", "lost", "meaning"), [(13, False, "a graphics engine exception"),
                                                     (79, True, "the GPU fell off the bus")])
def test_an_xid_error_is_part_of_the_cause_and_the_gpu_is_checked_before_the_next_lease(
        tmp_path: Path, xid: int, lost: bool, meaning: str) -> None:
    gpu0 = FakeGpu("GPU-0")
    nvml = FakeNvml([gpu0])
    (alice,) = tokens(tmp_path / "rgpu.sqlite3", "alice")

    async def scenario() -> None:
        async with gpu_server(tmp_path / "rgpu.sqlite3", nvml) as server:
            url = f"ws://127.0.0.1:{server.port}"
            session = await asyncio.to_thread(lambda: Client(url, alice).session())
            nvml.xid(gpu0, xid)
            await async_wait_for(lambda: server.scheduler.unhealthy, 5, "gpu0 held out after the Xid error")
            assert server.scheduler.unhealthy == ["gpu0"]  # held out at once, though it reads healthy
            gpu0.lost = lost
            with pytest.raises(WorkerDied, match=f"the GPU reported Xid {xid} \\({meaning}\\) while it ran"):
                await asyncio.to_thread(session.execute, "import os; os._exit(1)", quiet)
            await asyncio.to_thread(session.release)
            if lost:  # the check found it unreadable: it stays out, and says why
                assert server.scheduler.unhealthy == ["gpu0"]
                assert "NVML cannot read this GPU" in str(server.readings.latest("gpu0").problem)
            else:  # read again and healthy: back in the pool
                assert server.scheduler.free == ["gpu0"]

    asyncio.run(scenario())


def test_a_cpu_slot_drains_while_a_process_of_the_worker_still_runs(tmp_path: Path) -> None:
    changes: list[tuple[str, bool]] = []
    stray = subprocess.Popen(["sleep", "60"])

    async def scenario() -> None:
        async def holders(slot: str, pids: frozenset[int]) -> Any:
            return await asyncio.to_thread(process_holders, pids)

        drainer = Drainer(holders, lambda slot, draining: changes.append((slot, draining)),
                          deadline=0.3, period=0.1)
        started = time.monotonic()
        assert await drainer.settle(["cpu0"], frozenset({stray.pid, 1 << 22})) == {"cpu0"}
        assert time.monotonic() - started >= 0.3
        draining = drainer.draining("cpu0")
        assert draining is not None and draining.pids == [stray.pid] and changes == [("cpu0", True)]
        stray.kill()
        stray.wait()  # reaped: a zombie would not count either
        await async_wait_for(lambda: drainer.draining("cpu0") is None, 2.5, "cpu0 drained")
        assert changes == [("cpu0", True), ("cpu0", False)]
        assert await drainer.settle(["cpu0"], frozenset({stray.pid})) == frozenset()  # free at once
        await drainer.close()

    try:
        asyncio.run(scenario())
    finally:
        stray.kill()


def _freeze(pid: int, group: Path) -> None:
    group.mkdir()
    (group / "cgroup.procs").write_text(str(pid))
    (group / "freezer.state").write_text("FROZEN")


def test_a_process_that_outlives_sigkill_keeps_its_cpu_slot_draining(fresh_server: ServerProcess) -> None:
    group = FREEZER / f"rgpu-test-{os.getpid()}"
    if os.geteuid() != 0 or not os.access(FREEZER, os.W_OK):
        pytest.skip("needs root and cgroup v1's freezer to make a process that SIGKILL cannot end")
    fresh_server.args = ["--drain-deadline", "0.5", "--term-grace", "0.5"]
    fresh_server.start()
    alice = fresh_server.token("alice")
    api = ApiClient(fresh_server.url, fresh_server.token("root", "--admin"))  # an admin sees the pids
    session = Client(fresh_server.url, alice).session()
    stuck = int(session.execute("import subprocess\nprint(subprocess.Popen(['sleep', '600']).pid)",
                                on_output=quiet).stdout)
    _freeze(stuck, group)
    try:
        session.release()
        slot = api.status()["slots"][0]
        assert slot["draining"]["pids"] == [stuck] and not slot["healthy"]
        waiter = Waiter(fresh_server.url, alice)
        wait_for(lambda: waiter.positions or waiter.granted.is_set(), 30, "alice's place in the queue")
        assert not waiter.granted.is_set()
        (group / "freezer.state").write_text("THAWED")  # the pending SIGKILL ends it now
        assert waiter.granted.wait(30)
        waiter.join()
        waiter.session.release()
    finally:
        (group / "freezer.state").write_text("THAWED")
        wait_for(lambda: _removed(group), 5, f"{group} emptied and removed", every=0.05)


def _removed(group: Path) -> bool:
    """Remove the cgroup ``group``; False while a process is still in it."""
    try:
        group.rmdir()
    except OSError:
        return False
    return True
