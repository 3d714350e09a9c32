"""The GPUs fenced on a root server: each worker can open its own GPUs' device files only,
and NVML's check stops a worker found on a GPU it did not lease.

One server in this process (uid mode: each user's workers run as a uid of
their own) with five GPUs of the NVML double, whose device files are
character devices made with ``mknod`` in a stand-in for ``/`` (see
:mod:`fake_gpu_host`): index and minor number differ, and the third GPU has
MIG instances. Alice holds one GPU and attacks; Bob holds two and must stay
untouched. Opening a device file that is there gives ``ENXIO`` (no driver
behind it here), one that is not gives ``ENOENT``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from fake_gpu_host import FakeGpuFiles, make_host
from nvml_double import FakeGpu, FakeNvml
from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_kernel.sync import Session
from remote_gpu_core.ids import SlotId
from remote_gpu_server.app import GpuServer
from remote_gpu_server.config import ServerConfig
from remote_gpu_server.workers.gpu_fence import trespasses
from remote_gpu_server.isolation.policy import IsolationConfig
from remote_gpu_server.processes.ladder import MARK_VAR, Scope
from remote_gpu_server.processes.owners import owner, scopes_of
from remote_gpu_server.gpus.readings import NodeReader, ProcessReading, SlotReading
from remote_gpu_server.gpus.slots import Slot
from stores import BlockingStore
from test_isolation import run
from threaded_server import ThreadedServer
from waiting import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root server isolates with uids; mknod: run as root")

#: By index (PCI order); minor numbers in another order. Minor 5 is a GPU this server does not offer.
GPUS = [FakeGpuFiles("0000:17:00.0", 3), FakeGpuFiles("0000:3b:00.0", 0),
        FakeGpuFiles("0000:5e:00.0", 4, mig=(("gi1", 12), ("gi1/ci0", 13))),
        FakeGpuFiles("0000:86:00.0", 1), FakeGpuFiles("0000:af:00.0", 2)]
SPARE_MINOR, SPARE_CAP = 5, 21
#: What bubblewrap's --dev holds, and so a worker's /dev besides its device files.
BASE_DEV = ["core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom",
            "zero"]
CONTROL = ["nvidia-uvm", "nvidia-uvm-tools", "nvidiactl"]

LIST_DEVICES = r"""
import json, os
def files(folder, prefix=''):
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path) and name == 'nvidia-caps':
            found.update(files(path, name + '/'))
        elif name.startswith('nvidia'):
            st = os.stat(path)
            found[prefix + name] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return found
print(json.dumps({'dev': sorted(os.listdir('/dev')), 'nvidia': files('/dev')}))
"""


def tokens(db: Path, *users: str) -> list[str]:
    store = BlockingStore(str(db))
    try:
        return [store.create_token(user)[1] for user in users]
    finally:
        store.close()


def expected_files(slots: list[str]) -> dict[str, list[int]]:
    """The device files (name → major, minor) a worker on ``slots`` must see, and no others."""
    if not any(s.startswith("gpu") for s in slots):
        return {}
    files = {"nvidiactl": [195, 255], "nvidia-uvm": [508, 0], "nvidia-uvm-tools": [508, 1]}
    for slot in slots:
        gpu = GPUS[int(slot.removeprefix("gpu"))]
        files[f"nvidia{gpu.minor}"] = [195, gpu.minor]
        files.update({f"nvidia-caps/nvidia-cap{n}": [509, n] for _path, n in gpu.mig})
    return files


def devices_of(session: Session) -> dict[str, Any]:
    return dict(json.loads(run(session, LIST_DEVICES)))


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class World:
    server: ThreadedServer
    host: Path
    nvml: FakeNvml
    a: Session
    b: Session
    carol: str
    log: LogLines

    @property
    def gpu(self) -> GpuServer:
        return self.server.server

    def fake(self, slot: str) -> FakeGpu:
        return self.nvml.gpus[int(slot.removeprefix("gpu"))]

    def b_is_untouched(self, b_pid: int) -> None:
        assert run(self.b, "import os; print(b_secret, os.getpid())").split() == ["b-gpu-secret", str(b_pid)]
        assert devices_of(self.b)["nvidia"] == expected_files(self.b.slots)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("gpu-fence")
    # Outside /tmp (which workers see a private one of), where anyone may look
    # for it: the worker must not reach it all the same.
    host = make_host(Path(tempfile.mkdtemp(prefix="rgpu-test-gpus-", dir="/srv")), GPUS,
                     spare_minors=[SPARE_MINOR], spare_caps=[SPARE_CAP])
    nvml = FakeNvml([FakeGpu(f"GPU-{i}", minor=g.minor) for i, g in enumerate(GPUS)])
    db = tmp / "rgpu.sqlite3"
    alice, bob, carol = tokens(db, "alice", "bob", "carol")
    log = LogLines()
    logging.getLogger("remote_gpu_server").addHandler(log)
    config = ServerConfig(port=0, db=db, slots=",".join(str(i) for i in range(len(GPUS))), term_grace=0.5,
                          drain_deadline=0.5, drain_period=0.2,
                          isolation=IsolationConfig(worker_memory="1G", device_root=host))
    umask = os.umask(0o022)  # a uid-mode start sets it for good: later tests get theirs back
    os.umask(umask)
    try:
        server = ThreadedServer(GpuServer(config, nvml=nvml)).start()
        try:
            with Client(server.url, bob).session(gpus=2) as b, Client(server.url, alice).session(gpus=1) as a:
                run(b, "b_secret = 'b-gpu-secret'")
                yield World(server, host, nvml, a, b, carol, log)
        finally:
            server.close()
    finally:
        os.umask(umask)
        logging.getLogger("remote_gpu_server").removeHandler(log)
        shutil.rmtree(host)


def test_each_worker_sees_its_own_gpus_files_and_the_control_files_only(world: World) -> None:
    for session in (world.a, world.b):
        seen = devices_of(session)
        assert seen["nvidia"] == expected_files(session.slots), session.slots
        top = {name.split("/")[0] for name in seen["nvidia"]}
        assert seen["dev"] == sorted(BASE_DEV + list(top))  # nothing else of the host's /dev
    gpu_files = [n for n in devices_of(world.b)["nvidia"] if n[len("nvidia"):].isdigit()]
    assert len(world.b.slots) == 2 and len(gpu_files) == 2  # a 2-GPU lease sees both
    own = next(n for n in expected_files(world.a.slots) if n[len("nvidia"):].isdigit())
    out = run(world.a, f"""
try:
    open('/dev/{own}', 'rb')
except OSError as exc:
    print(exc.errno)
""")
    assert out.split() == [str(errno.ENXIO)]  # its own file is there: only the driver is missing here


def test_a_hostile_cell_cannot_reach_another_gpus_device_file(world: World) -> None:
    b_pid = int(run(world.b, "import os; print(os.getpid())"))
    mine = expected_files(world.a.slots)
    others = sorted(f"nvidia{m}" for m in [*(g.minor for g in GPUS), SPARE_MINOR] if f"nvidia{m}" not in mine)
    others += [f"nvidia-caps/nvidia-cap{n}" for n in (12, 13, SPARE_CAP) if f"nvidia-caps/nvidia-cap{n}" not in mine]
    b_file = next(n for n in expected_files(world.b.slots) if n[len("nvidia"):].isdigit())
    stand_in = world.host / "dev"
    out = run(world.a, f"""
import ctypes, os, shutil, stat, subprocess, sys
def attempt(what, path):
    try:
        os.close(os.open(path, os.O_RDWR))
        print(what, 'OPENED')
    except OSError as exc:
        print(what, exc.errno)
for name in {others!r}:
    attempt('dev', '/dev/' + name)
attempt('stand-in', {str(stand_in / b_file)!r})
attempt('bob-root', '/proc/{b_pid}/root/dev/{b_file}')
attempt('init-root', '/proc/1/root{stand_in / b_file}')
attempt('server-root', '/proc/{os.getpid()}/root{stand_in / b_file}')
for where in ('/tmp/made', '/dev/made'):
    try:
        os.mknod(where, stat.S_IFCHR | 0o666, os.makedev(195, 0))
        print('mknod MADE')
    except OSError as exc:
        print('mknod', where, exc.errno)
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('/tmp/devtmpfs', exist_ok=True)
for source, target, fstype, flags in ((b'devtmpfs', b'/tmp/devtmpfs', b'devtmpfs', 0),
                                      (b'none', b'/dev', None, 0x20),  # remount
                                      ({str(stand_in).encode()!r}, b'/tmp/devtmpfs', None, 0x1000)):  # bind
    print('mount', libc.mount(source, target, fstype, flags, None), ctypes.get_errno())
child = subprocess.run([sys.executable, '-c', "import os\\n"
                        "print(sorted(n for n in os.listdir('/dev') if n.startswith('nvidia')))\\n"
                        "try:\\n    open('/dev/{b_file}')\\nexcept OSError as exc:\\n    print(exc.errno)"],
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES='0,1,2,3,4'), capture_output=True, text=True)
print('child', child.stdout.replace(' ', '').replace(chr(10), ' '))
if shutil.which('unshare'):  # a user namespace of its own: its mounts come locked
    ns = subprocess.run(['unshare', '-Urm', 'sh', '-c', 'umount -l /dev; mount -t devtmpfs d /mnt; ls /dev /mnt'],
                        capture_output=True, text=True)
    print('userns', 'nvidia' + {b_file[len("nvidia"):]!r} in ns.stdout.split())
""")
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("dev ")] == [f"dev {errno.ENOENT}"] * len(others)
    assert f"stand-in {errno.ENOENT}" in lines  # the stand-in for the host's /dev is hidden too
    for what in ("bob-root", "init-root", "server-root"):
        assert f"{what} {errno.EACCES}" in lines, out
    # No capability to make one where it may write, nor a right to write in /dev.
    assert f"mknod /tmp/made {errno.EPERM}" in lines and f"mknod /dev/made {errno.EACCES}" in lines
    assert [line for line in lines if line.startswith("mount ")] == [f"mount -1 {errno.EPERM}"] * 3
    child = next(line for line in lines if line.startswith("child "))
    assert b_file not in child.split()[1] and child.split()[-1] == str(errno.ENOENT), child
    assert "userns True" not in lines and "OPENED" not in out and "MADE" not in out
    world.b_is_untouched(b_pid)


def test_a_lease_of_more_gpus_later_or_fewer_after_a_restart_sees_just_those(world: World) -> None:
    client = Client(world.server.url, world.carol)
    for gpus in (2, 1):
        with client.session(gpus=gpus) as session:
            assert len(session.slots) == gpus
            assert devices_of(session)["nvidia"] == expected_files(session.slots)


def test_processes_on_their_own_gpus_and_other_programs_are_left_alone(world: World) -> None:
    a_slot, b_slot = world.a.slots[0], world.b.slots[0]
    a_pid, child = (int(p) for p in run(world.a, """
import os, subprocess
child = subprocess.Popen(['sleep', '300'])
print(os.getpid(), child.pid)
""").split())
    other = subprocess.Popen(["sleep", "300"])  # a program of the host's, not of any worker
    try:
        world.fake(a_slot).processes = [(a_pid, 1 << 30), (child, 1 << 30)]
        world.fake(b_slot).processes = [(other.pid, 1 << 30)]

        async def read() -> list[Any]:
            await world.gpu.readings.refresh()
            return trespasses(world.gpu.inventory, world.gpu.readings.latest, world.gpu.pool.workers())

        assert world.server.call(read()) == []
        owners = {p.pid: p.owner for p in world.gpu.readings.latest(a_slot).processes}
        assert owners == {a_pid: a_pid, child: a_pid}
        assert [p.owner for p in world.gpu.readings.latest(b_slot).processes] == [None]
        assert run(world.a, "import os; print(os.getpid())") == f"{a_pid}\n"
    finally:
        world.fake(a_slot).processes = world.fake(b_slot).processes = []
        run(world.a, "child.kill(); child.wait()")
        other.kill()
        other.wait()


def test_a_worker_found_on_a_gpu_it_did_not_lease_is_stopped_and_told_why(world: World) -> None:
    b_pid = int(run(world.b, "import os; print(os.getpid())"))
    b_slot = world.b.slots[1]
    index = int(b_slot.removeprefix("gpu"))
    # A daemon that left the worker's process tree and session, on Bob's GPU.
    daemon = int(run(world.a, """
import os
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.execvpe('sleep', ['sleep', '300'], dict(os.environ, CUDA_VISIBLE_DEVICES='0,1,2,3,4'))
    os._exit(0)
os.close(w)
print(os.read(r, 20).decode())
os.wait()
"""))
    assert psutil.Process(daemon).ppid() != int(run(world.a, "import os; print(os.getpid())"))
    failed: list[BaseException] = []
    running = threading.Event()

    def long_cell() -> None:
        try:
            world.a.execute("import time; print('running', flush=True); time.sleep(120)",
                            on_output=lambda _output: running.set())
        except BaseException as exc:
            failed.append(exc)

    cell = threading.Thread(target=long_cell)
    cell.start()
    try:
        assert running.wait(60)
        world.fake(b_slot).processes = [(daemon, 2 << 30)]
        world.server.call(world.gpu.readings.refresh())
        cell.join(60)
    finally:
        world.fake(b_slot).processes = []
    cause = f"it used GPU {index} (slot {b_slot}), which this session did not lease"
    assert len(failed) == 1 and isinstance(failed[0], WorkerDied) and cause in str(failed[0]), failed
    assert any(f"on GPU {index}, which its lease does not hold: stopping it" in line and "alice's" in line
               for line in world.log.lines), world.log.lines
    wait_for(lambda: not _alive(daemon), what="the daemon's end")
    # The session goes on with a fresh worker, fenced as the old one was.
    assert devices_of(world.a)["nvidia"] == expected_files(world.a.slots)
    world.b_is_untouched(b_pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_worker_on_cpu_slots_sees_no_nvidia_file(tmp_path: Path) -> None:
    host = make_host(Path(tempfile.mkdtemp(prefix="rgpu-test-gpus-", dir="/srv")), GPUS)
    (alice,) = tokens(tmp_path / "rgpu.sqlite3", "alice")
    config = ServerConfig(port=0, db=tmp_path / "rgpu.sqlite3", slots="cpu:1",
                          isolation=IsolationConfig(worker_memory="1G", device_root=host))
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        server = ThreadedServer(GpuServer(config, nvml=FakeNvml([FakeGpu("GPU-0", minor=3)]))).start()
        try:
            with Client(server.url, alice).session() as session:
                assert session.slots == ["cpu0"]
                assert devices_of(session) == {"dev": BASE_DEV, "nvidia": {}}
                out = run(session, f"""
import os, subprocess, sys
for path in ('/dev/nvidia3', '/dev/nvidiactl', {str(host / 'dev' / 'nvidia3')!r}):
    try:
        open(path)
    except OSError as exc:
        print(exc.errno)
print(subprocess.run([sys.executable, '-c', "import os; print([n for n in os.listdir('/dev') if 'nvidia' in n])"],
                     env=dict(os.environ, CUDA_VISIBLE_DEVICES='0'), capture_output=True, text=True).stdout)
""")
                assert out.split() == [str(errno.ENOENT)] * 3 + ["[]"]
        finally:
            server.close()
    finally:
        os.umask(umask)
        shutil.rmtree(host)


# -- whose a process is (no server) --------------------------------------------------


def test_a_process_belongs_to_the_worker_whose_tree_session_or_mark_it_is_in() -> None:
    mark = "w9-test.0123"
    script = r"""
import os, subprocess, sys, time
child = subprocess.Popen(['sleep', '60'])
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.execvp('sleep', ['sleep', '60'])
    os._exit(0)
os.close(w)
daemon = os.read(r, 20).decode()
os.waitpid(-1, 0)  # the middle one: the daemon is an orphan now
print(child.pid, daemon, flush=True)
time.sleep(60)
"""
    root = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, **{MARK_VAR: mark}))
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        assert root.stdout is not None
        child, daemon = (int(p) for p in root.stdout.readline().split())
        assert owner(child, [Scope(root.pid)]) == root.pid  # its tree
        assert owner(daemon, [Scope(root.pid)]) is None  # left the tree and the session, no mark asked
        assert owner(daemon, [Scope(root.pid, mark=mark)]) == root.pid  # its mark
        assert owner(daemon, scopes_of([root.pid])) == root.pid  # the mark, read from the worker's process
        assert owner(stranger.pid, scopes_of([root.pid])) is None
    finally:
        for proc in psutil.Process(root.pid).children(recursive=True) + [psutil.Process(root.pid)]:
            proc.kill()
        for pid in (locals().get("daemon"),):
            if isinstance(pid, int) and _alive(pid):
                os.kill(pid, 9)
        root.wait()
        root.stdout.close() if root.stdout else None
        stranger.kill()
        stranger.wait()


def test_a_node_tells_whose_each_process_on_its_gpus_is() -> None:
    root = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '60'])"],
                            start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        child = wait_for(lambda: psutil.Process(root.pid).children(), what="the worker's child")[0].pid
        gpu = FakeGpu("GPU-0", processes=[(child, 1 << 30), (stranger.pid, 1 << 20)])
        reader = NodeReader(FakeNvml([FakeGpu("GPU-9"), gpu]))
        try:  # as a Ray node's agent is asked: each slot's workers, and the GPU Ray gave each
            reading = reader.read([("n1/gpu0", 1, [root.pid]), ("n1/gpu1", 0, [])])
        finally:
            reader.close()
        assert reading["n1/gpu0"].device == 1
        assert {p.pid: p.owner for p in reading["n1/gpu0"].processes} == {child: root.pid, stranger.pid: None}
    finally:
        for proc in psutil.Process(root.pid).children(recursive=True):
            proc.kill()
        root.kill()
        root.wait()
        stranger.kill()
        stranger.wait()


@dataclass
class _RayProcess:
    """What the check reads of a Ray worker's process: the GPUs Ray gave it."""

    devices: list[int]


@dataclass(eq=False)
class _Worker:
    """The parts of a :class:`~remote_gpu_server.workers.worker.Worker` the check reads (a Ray
    node's real GPUs cannot be had here)."""

    pid: int
    slots: list[Slot]
    process: _RayProcess
    node: str = "node-a"
    alive: bool = True


def test_on_a_node_the_gpus_ray_gave_a_worker_are_its_own_whatever_its_slot_says() -> None:
    slots = [Slot(SlotId(f"n1/gpu{i}"), "gpu", i, f"GPU {i}", node="n1") for i in (0, 1)]
    # Leased slot gpu1, Ray gave it the GPU of index 0.
    worker = _Worker(100, [slots[1]], _RayProcess([0]))
    readings = {slots[0].id: SlotReading(device=0, processes=(ProcessReading(100, 1 << 30, owner=100),)),
                slots[1].id: SlotReading(device=1)}
    assert trespasses(slots, readings.__getitem__, [worker]) == []  # type: ignore[list-item]
    readings[slots[1].id] = SlotReading(device=1, processes=(ProcessReading(101, 1 << 30, owner=100),))
    found = trespasses(slots, readings.__getitem__, [worker])  # type: ignore[list-item]
    assert [(t.pid, t.device) for t in found] == [(101, 1)]
    assert found[0].cause == "it used GPU 1 of node node-a, which this session did not lease"
