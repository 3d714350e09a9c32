"""Many GPU machines behind one server: a real Ray cluster of two nodes with two GPUs each.

The server joins the cluster as its head (``rgpu serve --ray ADDRESS``);
every worker is a Ray actor on the node our scheduler chose. The GPUs are
Ray's counts only (there is no GPU here), which is what placement needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient
from servers import ServerProcess

pytestmark = pytest.mark.timeout(300)

WHERE = "import os; print(os.environ['RGPU_SLOTS'], os.environ['CUDA_VISIBLE_DEVICES'])"


def where(session: Any) -> tuple[str, str, str]:
    """(node, slot, CUDA_VISIBLE_DEVICES) of a session's worker, as the worker sees them."""
    slot, cuda = session.execute(WHERE, on_output=lambda _: None).stdout.split()
    return slot.split("/")[0], slot, cuda


def test_four_leases_land_on_four_distinct_gpus_and_a_fifth_waits(ray_server: ServerProcess) -> None:
    tokens = [ray_server.token(user) for user in ("alice", "bob", "carol", "dave", "erin")]
    sessions = [Client(ray_server.url, token).session() for token in tokens[:4]]
    try:
        places = [where(s) for s in sessions]
        assert len({(node, cuda) for node, _, cuda in places}) == 4  # four distinct (node, GPU) pairs
        # Isolated on their nodes as on one machine: a uid per user (the head's), never root.
        uids = [s.execute("import os; print(os.getuid())", on_output=lambda _: None).stdout.strip()
                for s in sessions]
        assert len(set(uids)) == 4 and "0" not in uids
        assert len({node for node, _, _ in places}) == 2
        assert sorted(s.slots[0] for s in sessions) == sorted(slot for _, slot, _ in places)
        positions: list[int] = []
        fifth: list[Any] = []
        waiter = threading.Thread(target=lambda: fifth.append(
            Client(ray_server.url, tokens[4]).session(on_queue=positions.append)))
        waiter.start()
        deadline = time.monotonic() + 30
        while not positions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert positions == [1] and not fifth  # it waits in our queue, not in Ray's
        freed = sessions.pop(2)
        freed_slot = freed.slots[0]
        freed.release()
        waiter.join(60)
        assert fifth and fifth[0].slots == [freed_slot]
        assert where(fifth[0])[1] == freed_slot
        sessions.append(fifth[0])
        api = ApiClient(ray_server.url, tokens[0])
        status = api.status()
        assert len({s["node"] for s in status["slots"]}) == 2  # every GPU with its node
        # Each node reads its own slots (no NVML here: its workers' processes) for the head.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                s["readings"]["processes"] for s in status["slots"]):
            time.sleep(0.5)
            status = api.status()
        assert all(s["readings"]["memory_used"] for s in status["slots"]), status["slots"]
        # rgpu status and /metrics show every GPU with its node, too.
        nodes = {s["node"] for s in status["slots"]}
        shown = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "status", "--url", ray_server.url,
                                "--token", tokens[0]], capture_output=True, text=True, check=True,
                               env=dict(os.environ, COLUMNS="250")).stdout
        assert all(node.split(" (")[-1].rstrip(")") in shown for node in nodes)
        metrics = urllib.request.urlopen(ray_server.url.replace("ws://", "http://") + "/metrics").read().decode()
        assert all(f'node="{node}"' in metrics for node in nodes)
    finally:
        for session in sessions:
            session.release()


def test_variables_and_files_cross_to_a_node_and_back_whole(ray_server: ServerProcess, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the head and the node's sealed data channel: every piece, in order, both ways."""
    array = np.random.default_rng(7).random(3 << 20)  # 24 MiB: more pieces than the channel has in flight
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(os.urandom(9 << 20))
    with Client(ray_server.url, ray_server.token("grace")).session() as session:
        session.push(x=array)
        assert session.execute("print(float(x.sum()))", on_output=lambda _: None).stdout == f"{float(array.sum())}\n"
        assert np.array_equal(session.pull("x")["x"], array)
        assert session.upload("weights.bin") == [("weights.bin", 9 << 20)]
        session.execute("open('copy.bin', 'wb').write(open('weights.bin', 'rb').read()[::-1])",
                        on_output=lambda _: None)
        session.download("copy.bin", into=tmp_path / "back")
    assert (tmp_path / "back" / "copy.bin").read_bytes() == (tmp_path / "weights.bin").read_bytes()[::-1]


def test_priorities_and_fair_share_hold_across_nodes(ray_server: ServerProcess) -> None:
    alice, bob, carol, dave = (Client(ray_server.url, ray_server.token(u)) for u in
                               ("alice", "bob", "carol", "dave"))
    held = [alice.session(), alice.session(), alice.session(), bob.session()]
    assert len({where(s)[0] for s in held}) == 2  # both nodes are in use
    granted: list[tuple[str, list[str]]] = []
    lock = threading.Lock()

    def wait(name: str, client: Client, priority: str) -> None:
        session = client.session(priority=priority)
        with lock:
            granted.append((name, session.slots))
        held.append(session)

    threads = [threading.Thread(target=wait, args=args) for args in
               (("alice", alice, "normal"), ("carol", carol, "normal"), ("dave", dave, "high"))]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # queued in this order
        # Release one GPU on one node, then one on the other: the high request
        # first, then carol (she holds none) before alice (she holds three).
        first_node = where(held[0])[0]
        other = next(s for s in held[1:4] if where(s)[0] != first_node)
        for session in (held[0], other):
            before = len(granted)
            session.release()
            held.remove(session)
            deadline = time.monotonic() + 60
            while len(granted) == before and time.monotonic() < deadline:
                time.sleep(0.05)
        assert [name for name, _ in granted] == ["dave", "carol"]
    finally:
        for session in list(held):
            session.release()
        for thread in threads:
            thread.join(60)
        for session in list(held):
            session.release()


def test_the_stop_ladder_runs_on_the_workers_node(ray_server: ServerProcess) -> None:
    """A cell on a node that ignores interrupts, with a child in a session of its own: the second
    interrupt replaces the worker there, and the child goes too (the nodes run on this machine)."""
    import asyncio

    import psutil

    from remote_gpu_kernel import WorkerDied
    from remote_gpu_kernel.sync import run

    code = ("import os, signal, subprocess, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "child = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            "print(os.getpid(), child.pid, flush=True)\ntime.sleep(600)")
    with Client(ray_server.url, ray_server.token("alice")).session() as session:
        inner = session._session

        async def scenario() -> tuple[list[int], str]:
            printed: asyncio.Queue[str] = asyncio.Queue()
            notices: asyncio.Queue[str] = asyncio.Queue()
            cell = asyncio.ensure_future(inner.execute(
                code, lambda out: printed.put_nowait(out.content.get("text", "")), on_notice=notices.put_nowait))
            pids = [int(p) for p in (await asyncio.wait_for(printed.get(), 60)).split()]
            await inner.interrupt()
            assert "ignores interrupts" in await asyncio.wait_for(notices.get(), 30)
            await inner.interrupt()
            try:
                await asyncio.wait_for(cell, 60)
            except WorkerDied as exc:
                return pids, str(exc)
            raise AssertionError("the cell was not stopped")

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        pids, error = run(scenario())
        assert "interrupted twice" in error
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, f"processes {pids} outlived the ladder on their node"
            time.sleep(0.1)
        assert session.execute("print('fresh')", on_output=lambda _: None).stdout == "fresh\n"
