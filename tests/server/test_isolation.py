"""Hostile cells: user A attacks while user B works, on a root server.

The server runs as root, so each user's workers run as a uid of their own
in a private mount namespace (``--run-as dynamic``). Every attack must fail
with a permission error or be contained, and after each one B's worker (same
process, same variables, same session folder) and the server must be as
they were: B runs a cell and gets the right answer.

Each user's session folders are in a filesystem of their own of
``--session-disk`` (16M here): filling it stops only that user's writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.sync import Session
from servers import ServerProcess
from waiting import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root server isolates with uids: run as root")

SECRET = "b-secret-4711"
SERVER_ONLY = "RGPU_TEST_SERVER_ONLY"
#: Each user's disk for session folders (--session-disk).
DISK = 16 << 20
#: From <linux/fs.h>: freeze a filesystem's writes, and thaw them.
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
#: --worker-pids of the world: small, so that a fork bomb stops soon; an idle worker runs about 15 threads.
PIDS = 96

#: Forks copies of itself that wait on a pipe, until a fork fails; the error
#: ends the cell and the children go on holding their pids until the worker ends.
FORK_BOMB = """\
import os
read, write = os.pipe()
children = []
while len(children) < 10_000:
    pid = os.fork()
    if pid == 0:
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    children.append(pid)
"""
#: A fork bomb in a child process, which sees the error itself: only the cgroup can tell the cell.
CHILD_FORK_BOMB = """\
import subprocess, sys
bomb = {bomb!r}.replace("while len", "try:\\n  while len").replace("\\n    ", "\\n      ")
subprocess.run([sys.executable, "-c", bomb + "\\nexcept OSError as exc:\\n  print('child:', exc)"], check=True)
"""


def quiet(_: object) -> None:
    pass


def run(session: Session, code: str) -> str:
    """Run ``code``; what it printed. The cell itself must not fail."""
    result = session.execute(code, on_output=quiet)
    assert result.ok, result.error
    return "".join(o.content.get("text", "") for o in result.outputs if o.msg_type == "stream")


@dataclass
class World:
    server: ServerProcess
    a: Session
    b: Session
    b_pid: int
    b_folder: Path
    alice: str

    def a_pid(self) -> int:
        return int(run(self.a, "import os; print(os.getpid())"))

    def b_is_untouched(self) -> None:
        out = run(self.b, "import os\nprint(b_secret, os.getpid(), os.getcwd(), open('secret.txt').read(), "
                          "sum(range(10)))")
        assert out.split() == [SECRET, str(self.b_pid), str(self.b_folder), SECRET, "45"]
        assert self.server.proc is not None and self.server.proc.poll() is None
        assert run(self.a, "print('server still serves')") == "server still serves\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    # A third slot for tests that need a session of their own.
    server = ServerProcess(tmp, "cpu:3", "--worker-memory", "1G", "--session-disk", "16M",
                           "--worker-pids", str(PIDS),
                           env={SERVER_ONLY: "the server's own"})
    alice, bob = server.token("alice"), server.token("bob")  # the store exists before the server
    server.start()
    try:
        with Client(server.url, bob).session() as b, Client(server.url, alice).session() as a:
            run(b, f"b_secret = {SECRET!r}\nopen('secret.txt', 'w').write(b_secret)")
            b_pid, b_folder = run(b, "import os; print(os.getpid(), os.getcwd())").split()
            yield World(server, a, b, int(b_pid), Path(b_folder), alice)
    finally:
        server.stop()


def test_users_run_as_distinct_unprivileged_uids_in_their_own_folders(world: World) -> None:
    a_uid, a_cwd = run(world.a, "import os; print(os.getuid(), os.getcwd())").split()
    b_uid = os.stat(world.b_folder).st_uid
    assert int(a_uid) not in (0, os.getuid(), b_uid) and b_uid not in (0, os.getuid())
    # Each user's folders are in a disk of their own (see user_disks), in the session root.
    a_disk, b_disk = Path(a_cwd).parent, world.b_folder.parent
    assert a_disk != b_disk and a_disk.parent == b_disk.parent == world.server.tmp / "sessions"
    for folder in (a_disk, b_disk, b_disk.parent):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o711  # walk through, never list
    assert os.stat(a_disk).st_dev != os.stat(b_disk).st_dev != os.stat(b_disk.parent).st_dev
    assert stat.S_IMODE(os.stat(world.b_folder).st_mode) == 0o700
    uids = json.loads(world.server.db.with_name("rgpu.sqlite3-uids.json").read_text())["uids"]
    assert uids == {"alice": int(a_uid), "bob": b_uid}
    world.b_is_untouched()


def test_the_store_and_the_uid_map_are_the_servers_alone(world: World) -> None:
    db = world.server.db
    files = [db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-uids.json"))]
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path  # 0644 when the tokens were made
    out = run(world.a, f"""
for path in {[str(p) for p in files]!r}:
    for mode in ('rb', 'r+b'):
        try:
            open(path, mode)
            print('OPENED', path)
        except (PermissionError, FileNotFoundError) as exc:
            print(type(exc).__name__)
""")
    assert "OPENED" not in out and len(out.split()) == 2 * len(files)
    world.b_is_untouched()


def test_b_connection_file_is_out_of_reach_and_its_key_does_not_help(world: World) -> None:
    cmdline = Path(f"/proc/{world.b_pid}/cmdline").read_bytes().split(b"\0")
    connection_file = cmdline[cmdline.index(b"-f") + 1].decode()
    info = json.loads(Path(connection_file).read_text())  # as if it had leaked
    world.a.push(info=info, path=connection_file)
    out = run(world.a, """
import os, queue, jupyter_client
for target in (path, info['ip'] + '-' + str(info['shell_port'])):
    try:
        open(target, 'rb')
        print('OPENED')
    except (PermissionError, FileNotFoundError) as exc:
        print(type(exc).__name__)
kc = jupyter_client.BlockingKernelClient()
kc.load_connection_info(info)
kc.start_channels()
kc.execute("hijacked = True")
try:
    kc.get_shell_msg(timeout=3)
    print('REPLIED')
except queue.Empty:
    print('no reply')
kc.stop_channels()
""")
    assert "OPENED" not in out and "REPLIED" not in out and "no reply" in out
    assert run(world.b, "print('hijacked' in globals())") == "False\n"
    world.b_is_untouched()


def test_signals_to_b_worker_and_the_server_are_refused(world: World) -> None:
    server_pid = world.server.proc.pid if world.server.proc else 0
    out = run(world.a, f"""
import os, signal
for pid in ({world.b_pid}, {server_pid}):
    for send in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(os.getpgid(pid), signal.SIGKILL),
                 lambda: os.kill(pid, signal.SIGTERM), lambda: os.kill(pid, signal.SIGSTOP)):
        try:
            send()
            print('SENT')
        except PermissionError:
            print('refused')
""")
    assert out.split() == ["refused"] * 8
    world.b_is_untouched()


def test_the_environment_memory_and_ptrace_of_others_are_refused(world: World) -> None:
    server_pid = world.server.proc.pid if world.server.proc else 0
    out = run(world.a, f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for pid in ({world.b_pid}, {server_pid}):
    for name in ('environ', 'mem', 'cwd', 'root', 'fd'):
        try:
            path = f'/proc/{{pid}}/{{name}}'
            os.listdir(path) if name in ('cwd', 'root', 'fd') else open(path, 'rb').read(1)
            print('READ', path)
        except PermissionError:
            print('refused')
    print('attached' if libc.ptrace(16, pid, None, None) == 0 else os.strerror(ctypes.get_errno()))
""")
    assert out.count("refused") == 10 and out.count("Operation not permitted") == 2, out
    world.b_is_untouched()


def test_the_worker_environment_is_an_allow_list(world: World) -> None:
    names = json.loads(run(world.a, "import os, json; print(json.dumps(sorted(os.environ)))"))
    assert SERVER_ONLY not in names
    assert {"HOME", "USER", "PATH", "CUDA_VISIBLE_DEVICES"} <= set(names)
    assert not [n for n in names if "TOKEN" in n or n.startswith(("PYTEST", "RGPU_DB"))]
    environ = Path(f"/proc/{world.server.proc.pid if world.server.proc else 0}/environ").read_bytes()
    assert SERVER_ONLY.encode() in environ  # the server has it; the worker does not
    world.b_is_untouched()


def test_no_server_descriptor_leaks_into_a_worker(world: World) -> None:
    a_pid = world.a_pid()
    server_pid = world.server.proc.pid if world.server.proc else 0

    def targets(pid: int) -> set[str]:
        folder = Path(f"/proc/{pid}/fd")
        found = set()
        for fd in folder.iterdir():
            try:
                found.add(os.readlink(fd))
            except FileNotFoundError:
                pass
        return found

    # Every socket, pipe and file has a name of its own (anonymous inodes
    # share one): only its stdin and output pipes and its shared-memory ring
    # are the server's too; no socket, no store, no log, no other worker's.
    shared = {t for t in targets(a_pid) & targets(server_pid) if not t.startswith("anon_inode:")}
    assert "/memfd:rgpu-ring (deleted)" in shared, shared
    assert all(t.startswith(("pipe:", "/memfd:rgpu-ring")) for t in shared), shared
    assert len([t for t in shared if t.startswith("pipe:")]) <= 2, shared
    world.b_is_untouched()


def test_runtime_folders_are_private_to_the_server(world: World) -> None:
    cmdline = Path(f"/proc/{world.b_pid}/cmdline").read_bytes().split(b"\0")
    connection_file = Path(cmdline[cmdline.index(b"-f") + 1].decode())
    worker_dir, runtime = connection_file.parent, connection_file.parent.parent
    for folder in (runtime, worker_dir):  # jupyter_client adds the sticky bit to the worker's
        assert os.stat(folder).st_mode & 0o777 == 0o700 and os.stat(folder).st_uid == 0, folder
    assert os.stat(connection_file).st_mode & 0o777 == 0o600
    world.b_is_untouched()


def test_filling_tmp_is_contained_in_the_worker(world: World) -> None:
    out = run(world.a, """
import os
try:
    with open('/tmp/fill', 'wb') as f:
        while True:
            f.write(b'x' * (16 << 20))
            f.flush()
except OSError as exc:
    print(exc.strerror)
os.remove('/tmp/fill')
""")
    assert out == "No space left on device\n"
    assert not Path("/tmp/fill").exists()  # the host's /tmp never saw it
    assert run(world.b, "open('/tmp/b-ok', 'w').write('ok'); print(open('/tmp/b-ok').read())") == "ok\n"
    world.b_is_untouched()


def test_allocating_past_the_memory_limit_stops_only_that_worker(world: World) -> None:
    with pytest.raises(WorkerDied, match=r"out of host memory \(limit 1 GiB\)"):
        world.a.execute("x = bytearray(3 << 30)", on_output=quiet)
    world.b_is_untouched()  # A's session goes on with a fresh worker; B never noticed


def test_a_symlink_out_of_the_session_folder_leads_nowhere(world: World) -> None:
    db = world.server.db
    links = {"b_file": world.b_folder / "secret.txt", "b_dir": world.b_folder, "store": db,
             "b_cwd": Path(f"/proc/{world.b_pid}/cwd/secret.txt")}
    a2 = Client(world.server.url, world.alice).session()
    out = run(a2, f"""
import os
for name, target in {dict((k, str(v)) for k, v in links.items())!r}.items():
    os.symlink(target, name)
    try:
        os.listdir(name) if name == 'b_dir' else open(name).read()
        print('FOLLOWED', name)
    except (PermissionError, FileNotFoundError) as exc:
        print(type(exc).__name__)
""")
    assert "FOLLOWED" not in out and len(out.split()) == len(links)
    folder = Path(run(a2, "import os; print(os.getcwd())").strip())
    # Releasing the session removes its folder, links and all, without following them.
    a2.release()
    wait_for(lambda: not folder.exists(), what="the released session's folder to be deleted")
    assert (world.b_folder / "secret.txt").read_text() == SECRET and db.exists()
    world.b_is_untouched()


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


def inet_listeners(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket listening, and every UDP socket
    bound, that process ``pid`` holds (addresses as /proc/net prints them)."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A" if table.startswith("tcp") else True
            if listening and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((address, int(port, 16)))
    return found


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


def test_b_worker_listens_on_no_port_and_its_iopub_pipe_is_out_of_reach(world: World) -> None:
    # What a hostile cell finds in /proc/net/tcp, narrowed to B's worker (the
    # test is root and can tell): the ports it sends 200 MB to. ipykernel's
    # IOPub pipe used to be one, on 127.0.0.1.
    ports = inet_listeners(world.b_pid)
    assert ports == []
    inodes = socket_inodes(world.b_pid)
    pipes = [line.split()[-1] for line in Path(f"/proc/{world.b_pid}/net/unix").read_text().splitlines()[1:]
             if line.split()[6] in inodes and "rgpu-iopub-" in line]
    assert len(pipes) == 1 and pipes[0].startswith("/tmp/")  # in B's private /tmp
    before = vm_rss(world.b_pid)
    out = run(world.a, f"""
import os, socket, zmq
payload = bytes(200 << 20)
ctx = zmq.Context()
for address, port in {ports!r}:
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(f'tcp://127.0.0.1:{{port}}')
    push.send_multipart([os.urandom(16), payload])
    push.close()
ctx.term()
for path in ({pipes[0]!r}, '/proc/{world.b_pid}/root' + {pipes[0]!r}):
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.connect(path)
        raw.sendall(payload)
        print('SENT', path)
    except (FileNotFoundError, PermissionError, ConnectionRefusedError) as exc:
        print(type(exc).__name__)
    finally:
        raw.close()
""")
    assert out.split() == ["FileNotFoundError", "PermissionError"], out
    world.b_is_untouched()
    assert vm_rss(world.b_pid) - before < 64 << 20  # B's worker holds nothing of it


def test_output_of_forked_children_still_shows(world: World) -> None:
    out = run(world.a, """
import glob, multiprocessing, os
fork = multiprocessing.get_context('fork')
child = fork.Process(target=print, args=('from a forked child',))
child.start()
child.join()
pipe, = glob.glob('/tmp/rgpu-iopub-*/pipe')
print(os.stat(pipe).st_uid == os.getuid())
""")
    assert out == "from a forked child\nTrue\n"


def test_sysv_shared_memory_is_the_workers_own_held_to_its_limit_and_gone_with_it(world: World) -> None:
    key = 0x52470000 + os.getpid() % 0xFFFF
    attack = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p

def result(value):
    return value if value not in (-1, ctypes.c_void_p(-1).value) else errno.errorcode[ctypes.get_errno()]
"""
    a2 = Client(world.server.url, world.alice).session()
    out = run(a2, attack + f"""
shmid = libc.shmget({key}, 64 << 20, 0o1666)  # readable and writable by anyone who sees it
ctypes.memset(libc.shmat(shmid, None, 0), 1, 64 << 20)
print(shmid, os.readlink('/proc/self/ns/ipc'), result(libc.shmget(0, 2 << 30, 0o1600)))
""")
    shmid, namespace, past_limit = out.split()
    assert past_limit == "EINVAL"  # 2 GiB of shared memory is past the worker's 1 GiB
    host = Path("/proc/sysvipc/shm").read_text().split("\n")[1:]
    assert not [line for line in host if line.split() and int(line.split()[0]) == key]
    seen_by_b = run(world.b, attack + f"""
print(result(libc.shmget({key}, 0, 0)), result(libc.shmat({shmid}, None, 0)), os.readlink('/proc/self/ns/ipc'))
""")
    assert seen_by_b.split()[:2] == ["ENOENT", "EINVAL"] and seen_by_b.split()[2] != namespace
    pid = int(run(a2, "import os; print(os.getpid())"))
    a2.release()

    def in_namespace() -> list[str]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "ns" / "ipc") == namespace:
                    found.append(proc.name)
            except OSError:
                pass
        return found

    # The kernel frees a namespace's segments with it, when its last process ends.
    wait_for(lambda: not in_namespace(), what=f"worker {pid}'s IPC namespace to end")
    world.b_is_untouched()


def test_a_cell_cannot_make_a_user_namespace(world: World) -> None:
    out = run(world.a, r"""
import ctypes, os, subprocess
print(subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True,
                     text=True).stderr.strip())
libc = ctypes.CDLL(None, use_errno=True)
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # single-threaded, as unshare(CLONE_NEWUSER) needs
    failed = libc.unshare(0x10000000)
    os.write(write, os.strerror(ctypes.get_errno()).encode() if failed else b'UNSHARED')
    os._exit(0)
os.close(write)
print(os.read(read, 200).decode())
os.waitpid(pid, 0)
""")
    assert out.splitlines() == ["unshare: unshare failed: Operation not permitted", "Operation not permitted"]
    world.b_is_untouched()


def test_a_second_server_on_the_host_never_gives_out_the_uids_of_the_first(world: World,
                                                                         tmp_path: Path) -> None:
    # Its own store, the host's registry (here the first server's, as both are this test's).
    other = ServerProcess(tmp_path, "cpu:1", "--worker-memory", "1G",
                          env={"RGPU_UID_REGISTRY": world.server.env["RGPU_UID_REGISTRY"]})
    carol = other.token("carol")
    other.start()
    try:
        with Client(other.url, carol).session() as c:
            c_uid = int(run(c, "import os; print(os.getuid())"))
            b_uid = os.stat(world.b_folder).st_uid
            a_uid = int(run(world.a, "import os; print(os.getuid())"))
            assert c_uid not in (a_uid, b_uid, 0)
            out = run(c, f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name in ('environ', 'mem', 'cwd/secret.txt'):
    try:
        open(f'/proc/{world.b_pid}/{{name}}', 'rb').read(1)
        print('READ', name)
    except PermissionError:
        print('refused')
print('attached' if libc.ptrace(16, {world.b_pid}, None, None) == 0 else os.strerror(ctypes.get_errno()))
""")
            assert out.split() == ["refused"] * 3 + ["Operation", "not", "permitted"], out
    finally:
        other.stop()
    world.b_is_untouched()


def test_filling_the_users_disk_fails_only_that_users_writes(world: World) -> None:
    filled = world.a.execute("""
chunk = b'x' * (1 << 20)
with open('fill.bin', 'wb') as f:
    for _ in range(32):
        f.write(chunk)
""", on_output=quiet)
    error = filled.error
    assert error is not None and error.ename == "OSError" and "No space left on device" in error.evalue
    hint = error.traceback[-1]
    assert "share 16 MiB of disk (rgpu serve --session-disk)" in hint and "delete files" in hint
    disk = ApiClient(world.server.url, world.alice).status()["disk"]
    assert disk["enforced_by"] == "filesystem" and disk["limit"] == DISK and "users" not in disk
    assert disk["you"]["limit"] - (2 << 20) < disk["you"]["used"] <= disk["you"]["limit"] <= DISK  # full
    everyone = ApiClient(world.server.url, world.server.token("admin", "--admin")).status()["disk"]["users"]
    used = {u["user"]: u["used"] for u in everyone}
    assert used["alice"] >= disk["you"]["limit"] - (2 << 20) and used["bob"] < 1 << 20  # an admin sees all
    # B's disk is B's own: all of it is there, whatever A did.
    assert run(world.b, "open('mine.bin', 'wb').write(b'y' * (12 << 20))\nimport os\n"
                        "print(os.path.getsize('mine.bin')); os.remove('mine.bin')") == f"{12 << 20}\n"
    world.b_is_untouched()
    # A frees space, and writes again.
    assert run(world.a, "import os\nos.remove('fill.bin')\nopen('again.bin', 'wb').write(b'z' * (4 << 20))\n"
                        "os.remove('again.bin')\nprint('written')") == "written\n"


def test_a_parked_folder_is_out_of_reach_of_its_users_other_sessions(world: World) -> None:
    api = ApiClient(world.server.url, world.alice)
    with Client(world.server.url, world.alice).session() as parked:  # A's second session
        folder = run(parked, "import os\nopen('notes.txt', 'w').write('parked notes')\nprint(os.getcwd())").strip()
        # A's first session (the same uid) keeps a door open into it before the park.
        run(world.a, f"door = open({folder + '/door.bin'!r}, 'wb')")
        parked.park()
        out = run(world.a, f"""
import os
for attempt in (lambda: os.listdir({folder!r}), lambda: open({folder + '/notes.txt'!r}).read(),
                lambda: open({folder + '/new.bin'!r}, 'wb'), lambda: os.chmod({folder!r}, 0o777)):
    try:
        attempt()
        print('REACHED')
    except PermissionError:
        print('refused')
""")
        assert out.split() == ["refused"] * 4
        # What the open door lets through counts where it counts: in A's own disk.
        used = api.status()["disk"]["you"]["used"]
        run(world.a, "door.write(b'w' * (4 << 20)); door.close()")
        assert api.status()["disk"]["you"]["used"] >= used + (4 << 20)
        assert run(parked, "print(open('notes.txt').read())") == "parked notes\n"  # resumed: its own again
    world.b_is_untouched()


def test_deleting_a_released_folder_does_not_hold_up_the_server(world: World) -> None:
    session = Client(world.server.url, world.alice).session()
    folder = Path(run(session, "import os\nos.mkdir('many')\nfor i in range(500):\n"
                               "    open(f'many/{i}', 'w').write('x')\nprint(os.getcwd())").strip())
    # Every write to A's disk now waits, deleting the folder too, until it is thawed.
    disk = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.ioctl(disk, FIFREEZE, 0)
    try:
        releasing = threading.Thread(target=session.release)
        releasing.start()
        world.server.wait_for_log(f"deleting {folder}")
        # The deletion is stuck, and the server still answers everyone.
        status = ApiClient(world.server.url, world.alice).status()
        assert status["disk"]["you"]["user"] == "alice" and folder.exists()
        world.b_is_untouched()
        releasing.join(30)
        assert not releasing.is_alive()
    finally:
        fcntl.ioctl(disk, FITHAW, 0)
        os.close(disk)
    wait_for(lambda: not folder.exists(), what="the folder to be deleted once its disk thawed")


def test_a_memfd_past_the_memory_limit_stops_only_that_worker(world: World) -> None:
    """A cgroup counts memfd pages, which RLIMIT_DATA does not."""
    with pytest.raises(WorkerDied, match=r"out of host memory \(limit 1 GiB\)"):
        world.a.execute("""
import os
fd = os.memfd_create('hoard')
chunk = b'x' * (16 << 20)
for _ in range(3 << 6):  # 3 GiB
    os.write(fd, chunk)
""", on_output=quiet)
    world.b_is_untouched()


def _pids_group(session: Session) -> Path:
    """The worker's cgroup in the v1 pids hierarchy, as its own /proc/self/cgroup says."""
    line = next(line for line in run(session, "print(open('/proc/self/cgroup').read())").splitlines()
                if line.split(":")[1] == "pids")
    return Path("/sys/fs/cgroup/pids") / line.split(":", 2)[2].lstrip("/")


def test_a_fork_bomb_stops_at_the_workers_process_limit_and_nobody_else_notices(world: World) -> None:
    status = ApiClient(world.server.url, world.alice).status()["isolation"]
    if "cgroup" not in status["processes"]:
        pytest.skip(f"no pids cgroup here: {status['processes']}")
    assert status["processes"] == f"{PIDS} processes and threads per slot (cgroup v1 pids)"
    a_group = _pids_group(world.a)
    # In a child process: the child sees the error; the cell is told by a line of the worker's.
    child = world.a.execute(CHILD_FORK_BOMB.format(bomb=FORK_BOMB), on_output=quiet)
    assert child.ok, child.error
    assert "child: [Errno 11] Resource temporarily unavailable" in child.stdout
    told = "".join(o.content.get("text", "") for o in child.outputs if o.content.get("name") == "stderr")
    assert f"this worker reached its process limit ({PIDS} processes and threads, rgpu serve --worker-pids)" \
        in told
    # In the worker itself: the error says why, and the children go on holding every pid.
    bomb = world.a.execute(FORK_BOMB, on_output=quiet)
    assert bomb.error is not None
    assert (f"Resource temporarily unavailable: this worker reached its process limit ({PIDS} processes "
            "and threads, rgpu serve --worker-pids)") in str(bomb.error)
    assert int((a_group / "pids.current").read_text()) >= PIDS - 2
    # Meanwhile the server starts threads and processes, and another user works as usual.
    assert run(world.b, """
import subprocess, threading
done = threading.Event()
threads = [threading.Thread(target=done.wait) for _ in range(20)]
for thread in threads:
    thread.start()
print(subprocess.run(['echo', 'forked'], capture_output=True, text=True).stdout.strip(), len(threads))
done.set()
""") == "forked 20\n"
    bob = ApiClient(world.server.url, world.server.token("bob-too"))
    with Client(world.server.url, world.server.token("bob-too")).session() as fresh:  # a new worker
        assert run(fresh, "import threading; print(threading.active_count() > 1)") == "True\n"
        assert any(s["user"] == "bob-too" for s in bob.status()["sessions"])
    world.b_is_untouched()
    # The bomber's next cell runs; what needs a process says why it cannot have one.
    assert run(world.a, "print('next cell')") == "next cell\n"
    refused = world.a.execute("""
import subprocess
started = []
try:
    while len(started) < 200:
        started.append(subprocess.Popen(['sleep', '60']))
finally:
    for process in started:
        process.kill()
        process.wait()
""", on_output=quiet)
    assert refused.error is not None and f"process limit ({PIDS} processes" in str(refused.error)
    # A restart ends every child with the worker; the fresh worker starts processes again.
    world.a.restart()
    assert run(world.a, "import subprocess; print(subprocess.run(['true']).returncode)") == "0\n"
    assert not a_group.exists()
    world.b_is_untouched()
