"""Hostile cells: user A attacks while user B works, on a root server.

The server runs as root, so each user's workers run as a uid of their own
in a private mount namespace (``--run-as dynamic``). Every attack must fail
with a permission error or be contained, and after each one B's worker (same
process, same variables, same session folder) and the server must be as
they were: B runs a cell and gets the right answer.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.sync import Session
from servers import ServerProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root server isolates with uids: run as root")

SECRET = "b-secret-4711"
SERVER_ONLY = "RGPU_TEST_SERVER_ONLY"
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
    server = ServerProcess(tmp, "cpu:3", "--worker-memory", "1G", "--worker-pids", str(PIDS),
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
    root = world.b_folder.parent
    assert Path(a_cwd).parent == root and Path(a_cwd) != world.b_folder
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711  # walk through, never list
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
    assert not folder.exists()
    assert (world.b_folder / "secret.txt").read_text() == SECRET and db.exists()
    world.b_is_untouched()


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
