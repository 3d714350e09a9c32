"""Many GPU machines behind one server: a real Ray cluster of two nodes with two GPUs each.

The server joins the cluster as its head (``rgpu serve --ray ADDRESS``);
every worker is a Ray actor on the node our scheduler chose. The GPUs are
Ray's counts only (there is no GPU here), which is what placement needs.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kernels import LocalKernel
from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient
from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess
from test_isolation import run
from unprivileged import launcher
from waiting import wait_for
from warm_workers import all_free_and_warm, worker_waits
from wheels import tiny_wheel

pytestmark = pytest.mark.timeout(300)


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip, saying ``why``, where this test does not run as root (a server that is not
    root isolates its workers with bubblewrap: one uid for all, a pid namespace each)."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"{why}: run as root")

WHERE = "import os; print(os.environ['RGPU_SLOTS'], os.environ['CUDA_VISIBLE_DEVICES'])"


def where(session: Any) -> tuple[str, str, str]:
    """(node, slot, CUDA_VISIBLE_DEVICES) of a session's worker, as the worker sees them."""
    slot, cuda = session.execute(WHERE, on_output=lambda _: None).stdout.split()
    return slot.split("/")[0], slot, cuda


@needs_root("a root head gives each user a uid of their own on every node")
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
        wait_for(lambda: positions, 30, "the fifth request's place in the queue", every=0.05)
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
        def read_by_every_node() -> dict[str, Any] | None:
            status = api.status()
            return status if all(s["readings"]["processes"] for s in status["slots"]) else None

        status = wait_for(read_by_every_node, 30, "every node's readings of its workers' processes", every=0.5)
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
        # A file only the notebook's folder (here: the working folder) holds, fetched as the cell opens it.
        beside = os.urandom(5 << 20)
        (tmp_path / "beside.bin").write_bytes(beside)
        read = session.execute("import hashlib; print(hashlib.sha256(open('beside.bin', 'rb').read()).hexdigest())",
                               on_output=lambda _: None, on_fetched=lambda _: None)
        assert read.stdout == f"{hashlib.sha256(beside).hexdigest()}\n"
    assert (tmp_path / "back" / "copy.bin").read_bytes() == (tmp_path / "weights.bin").read_bytes()[::-1]


@needs_root("a root node runs each user's worker as their uid, which must reach their own site")
def test_pip_install_on_a_node_goes_into_the_users_own_site_there(ray_server: ServerProcess, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A node keeps its users' sites in its own data folder, made by a process whose
    umask is 077: the user's uid must still get through to theirs."""
    monkeypatch.chdir(tmp_path)
    wheel = tiny_wheel(tmp_path, "rgpu_node_probe", "1.0", "on the node")
    with Client(ray_server.url, ray_server.token("heidi")).session() as session:
        session.upload(wheel.name)
        installed = session.execute(f"%pip install --no-index {wheel.name}", on_output=lambda _: None)
        assert installed.ok and "Successfully installed rgpu-node-probe-1.0" in installed.stdout, installed.stdout
        assert "for this session only" not in installed.stdout
        shown = run(session, "import rgpu_node_probe; print(rgpu_node_probe.VALUE)\n%rgpu_env show")
        assert shown.startswith("on the node\nRemote GPU: your own site (kept across sessions): "), shown
        assert shown.endswith("Remote GPU: rgpu_node_probe 1.0\n") and "could not" not in shown


def test_priorities_and_fair_share_hold_across_nodes(ray_server: ServerProcess) -> None:
    alice, bob, carol, dave = (Client(ray_server.url, ray_server.token(u)) for u in
                               ("alice", "bob", "carol", "dave"))
    held = [alice.session(), alice.session(), alice.session(), bob.session()]
    assert len({where(s)[0] for s in held}) == 2  # both nodes are in use
    granted: list[tuple[str, list[str]]] = []
    queued: dict[str, list[int]] = {"alice": [], "carol": [], "dave": []}
    lock = threading.Lock()

    def wait(name: str, client: Client, priority: str) -> None:
        session = client.session(priority=priority, on_queue=queued[name].append)
        with lock:
            granted.append((name, session.slots))
        held.append(session)

    threads = [threading.Thread(target=wait, args=args) for args in
               (("alice", alice, "normal"), ("carol", carol, "normal"), ("dave", dave, "high"))]
    try:
        for thread, name in zip(threads, queued):  # queued in this order
            thread.start()
            wait_for(lambda: queued[name], 30, f"{name}'s place in the queue", every=0.05)
        # Release one GPU on one node, then one on the other: the high request
        # first, then carol (she holds none) before alice (she holds three).
        first_node = where(held[0])[0]
        other = next(s for s in held[1:4] if where(s)[0] != first_node)
        for session in (held[0], other):
            before = len(granted)
            session.release()
            held.remove(session)
            wait_for(lambda: len(granted) > before, 60, "a grant for the released GPU", every=0.05)
        assert [name for name, _ in granted] == ["dave", "carol"]
    finally:
        for session in list(held):
            session.release()
        for thread in threads:
            thread.join(60)
        for session in list(held):
            session.release()


def test_a_lease_takes_a_warm_worker_not_the_one_just_released(ray_server: ServerProcess) -> None:
    # A Ray actor takes seconds to start: a lease soon after a release must
    # not wait for the released slot's while another slot's worker is warm.
    token = ray_server.token("frank")
    api = ApiClient(ray_server.url, token)
    wait_for(lambda: all_free_and_warm(api), timeout=180, what="every slot free, each with a warm worker")
    before = worker_waits(api)
    client = Client(ray_server.url, token)
    first = client.session()
    released = first.slots
    first.release()
    second = client.session()
    try:
        assert second.slots != released
        after = worker_waits(api)
        assert {found: after[found] - before[found] for found in after} == {"warm": 2, "starting": 0, "cold": 0}
        assert where(second)[1] == second.slots[0]
    finally:
        second.release()


@needs_root("the pids a worker prints are this machine's only where the head is root")
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
        wait_for(lambda: not any(alive(p) for p in pids), 20, f"the end of processes {pids} on their node")
        assert session.execute("print('fresh')", on_output=lambda _: None).stdout == "fresh\n"


HOSTILE = """
import glob, os, subprocess, sys
os.environ["RAY_NUM_REDIS_GET_RETRIES"] = "1"  # one try: more would only be refused again
print("env:", sorted(k for k in os.environ if k.startswith("RAY_AUTH")))
for path in ({token_path!r}, os.path.expanduser("~/.ray/auth_token"), "/root/.ray/auth_token"):
    try:
        print("READ", open(path).read())
    except OSError as exc:
        print("cannot read:", type(exc).__name__)
shown = []
for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
    try:
        if b"RAY_AUTH" in open(path, "rb").read():
            shown.append(path)
    except OSError:
        pass
print("processes showing Ray's token or its file:", shown)
from ray._raylet import GcsClient
try:
    GcsClient(address={gcs!r})
    print("THE GCS LET ME IN")
except Exception as exc:
    print("GCS:", type(exc).__name__)
import ray
try:
    ray.init(address={gcs!r}, log_to_driver=False)
    print("JOINED THE CLUSTER")
except Exception as exc:
    print("ray.init:", type(exc).__name__)
guess = subprocess.run([sys.executable, "-c", "from ray._raylet import GcsClient; GcsClient(address={gcs!r})"],
                       env=dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                       capture_output=True, text=True)
print("with a guessed token:", guess.returncode, "AuthenticationError" in guess.stderr)
"""


@needs_root("the fence checked here is a root head's: a uid per user, and the token file's mode")
def test_a_cell_on_a_node_can_neither_use_the_cluster_nor_read_its_token(ray_server: ServerProcess,
                                                                          ray_cluster: Any) -> None:
    """Ray's token authentication is the cluster's fence: a cell that knows the GCS's
    address is refused without the token, and no file, environment or process shows it."""
    with Client(ray_server.url, ray_server.token("victor")).session() as victor, \
            Client(ray_server.url, ray_server.token("mallory")).session() as mallory:
        run(victor, "kept = 'victor-4711'")
        out = run(mallory, HOSTILE.format(token_path=str(ray_cluster.token_path), gcs=ray_cluster.address))
        assert ray_cluster.token not in out
        lines = out.splitlines()
        # The token's file is in a folder anyone may enter: its mode (0600) is the fence.
        assert lines[:3] == ["env: []", "cannot read: PermissionError", "cannot read: FileNotFoundError"], out
        assert lines[3] in ("cannot read: PermissionError", "cannot read: FileNotFoundError"), out
        assert "processes showing Ray's token or its file: []" in lines, out
        assert "GCS: AuthenticationError" in lines and "THE GCS LET ME IN" not in out, out
        assert "JOINED THE CLUSTER" not in out and any(line.startswith("ray.init: ") for line in lines), out
        assert lines[-1] == "with a guessed token: 1 True", out
        assert run(victor, "print(kept)") == "victor-4711\n"
    isolation = ApiClient(ray_server.url, ray_server.token("victor")).status()["isolation"]
    assert isolation["isolated"] is True and isolation["ray"]["token_auth"] is True
    assert {(n["mode"], n["used"]) for n in isolation["ray"]["nodes"]} == {("uids", True)}


@needs_root("the node is started as another uid")
def test_a_node_that_cannot_isolate_workers_is_left_out_and_the_status_says_why(
        ray_server: ServerProcess, ray_cluster: Any) -> None:
    """Its Ray runs as a uid that is not root, with no bubblewrap on its PATH: every user
    would run there as that uid, so the head (which isolates) leases none of its GPUs."""
    uid = 1_899_990_000 + secrets.randbelow(9_000)  # no account, unique to this run
    folder = Path(tempfile.mkdtemp(prefix="rgpu-n-"))  # short: Ray's socket paths are limited
    api = ApiClient(ray_server.url, ray_server.token("alice"))
    try:
        with ray_cluster.node_as(launcher(str(folder), uid), folder, gpus=1) as node_id:
            left_out = wait_for(lambda: [n for n in api.status()["isolation"]["ray"]["nodes"] if not n["used"]],
                                120, "the head to hear how the node isolates workers", every=0.5)
            assert len(left_out) == 1 and left_out[0]["mode"] == "none" and left_out[0]["uid"] == uid
            assert f"every user's code would run there as uid {uid}" in left_out[0]["problem"]
            assert "bubblewrap" in left_out[0]["problem"]
            status = api.status()
            assert left_out[0]["node"] not in {s["node"] for s in status["slots"]}
            assert not [s for s in status["slots"] if s["id"].startswith(node_id[:8])]
            assert len(status["slots"]) == 2 * len(ray_cluster.nodes)  # only the nodes that isolate
            assert status["isolation"]["isolated"] is True
            ray_server.wait_for_log("is left out, its GPUs are not leased: it cannot isolate workers")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_head_without_the_clusters_token_does_not_start_and_says_what_to_do(
        ray_cluster: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0", "--db", str(tmp_path / "db"),
         "--ray", ray_cluster.address], env=dict(os.environ, RAY_AUTH_MODE="disabled"),
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"rgpu serve: the Ray cluster at {ray_cluster.address} requires Ray's token authentication: start " \
           "rgpu serve with RAY_AUTH_MODE=token" in done.stderr, done.stderr


def test_the_magic_and_the_remote_gpu_kernel_work_against_the_head(
        ray_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """%%gpu and the Remote GPU kernel, unchanged, against the head (on this module's
    server: a head of its own would cost a server start and wait for the cluster's GPUs)."""
    token = ray_server.token("frank")
    kernel = LocalKernel(dict(os.environ, RGPU_URL=ray_server.url, RGPU_TOKEN=token))
    try:
        assert kernel.run("%load_ext remote_gpu_kernel").reply["status"] == "ok"
        cell = kernel.run("%%gpu\nimport os\nprint(os.environ['RGPU_SLOTS'])\n6 * 7")
        assert cell.reply["status"] == "ok", cell.reply
        assert "/gpu" in cell.stdout
        kernel.run("%gpu release")
    finally:
        kernel.close()
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(tmp_path / "prefix")))
    driver = KernelDriver(kernel_env(tmp_path, ray_server.url, token)).start()
    try:
        done = driver.run("import os\nx = os.environ['RGPU_SLOTS']\nx")
        assert done.status == "ok" and "/gpu" in done.text()[0]
    finally:
        driver.shutdown()
