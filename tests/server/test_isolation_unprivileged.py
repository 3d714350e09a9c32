"""A server that is not root: bubblewrap sandboxes, or one user only.

From a root test the real server runs as a bare unprivileged uid (see
``unprivileged.py``). With bubblewrap it sandboxes each worker: user A
cannot see B's folder, the store or any process outside its sandbox, and B
carries on; A's fork bomb stops at A's own process limit (RLIMIT_NPROC,
which Linux counts per sandbox). No cgroup is delegated to the server here,
so it says that memfd and shared memory are not counted. Without bubblewrap
nothing can isolate: the server serves the first user only and says so;
``--no-isolation`` serves everyone and says that workers are not isolated.

Such a server cannot mount a filesystem per user: it holds each user's disk
limit (``--session-disk``, 16M here) itself, by measuring their folders
while their cells run and stopping the cells of a user past it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel import AuthenticationError, Client, RemoteTimeout
from remote_gpu_kernel.api import ApiClient
from servers import ServerProcess
from test_isolation import FORK_BOMB, inet_listeners, quiet, run
from tls_certs import issue
from unprivileged import SERVER_UID, launcher
from wheels import tiny_wheel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the server as another uid: run as root")
#: --worker-pids of the sandboxed server: small, so that a fork bomb stops soon.
PIDS = 64




@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    tmp = tmp_path_factory.mktemp("sandboxed")
    server = ServerProcess(tmp, "cpu:2", "--worker-memory", "1G", "--session-disk", "16M",
                           launcher=launcher(str(tmp)), env={"RGPU_WORKER_PIDS": str(PIDS)})  # the flag's variable
    server.tokens = {user: server.token(user) for user in ("alice", "bob")}  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


def test_sandboxed_workers_see_only_their_own_things(sandboxed: ServerProcess) -> None:
    assert any("isolated in bubblewrap sandboxes" in line for line in sandboxed.log)
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    server_pid = sandboxed.proc.pid if sandboxed.proc else 0
    with Client(sandboxed.url, tokens["bob"]).session() as b, \
            Client(sandboxed.url, tokens["alice"]).session() as a:
        run(b, "b_secret = 'sealed'; open('secret.txt', 'w').write(b_secret)")
        b_folder = run(b, "import os; print(os.getcwd())").strip()
        assert os.stat(Path(b_folder)).st_uid == SERVER_UID  # one uid for all: namespaces separate them
        out = run(a, f"""
import os, signal
me = os.getcwd()
print(os.listdir(os.path.dirname(me)) == [os.path.basename(me)])
for path in ({b_folder + '/secret.txt'!r}, {str(sandboxed.db)!r}, '/proc/{server_pid}/environ'):
    try:
        open(path).read()
        print('READ', path)
    except (FileNotFoundError, PermissionError) as exc:
        print(type(exc).__name__)
try:
    os.kill({server_pid}, signal.SIGTERM)
    print('SIGNALLED')
except ProcessLookupError:
    print('no such process')
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())[-1] < 100)
""")
        assert out.split() == ["True", "FileNotFoundError", "FileNotFoundError", "FileNotFoundError",
                               "no", "such", "process", "True"], out
        with pytest.raises(RemoteTimeout, match="interrupted"):  # interrupts reach the sandbox
            a.execute("import time; time.sleep(30)", on_output=quiet, timeout=2)
        limited = a.execute("x = bytearray(3 << 30)", on_output=quiet)
        assert limited.error is not None and "out of host memory (limit 1 GiB)" in str(limited.error)
        assert run(b, "print(b_secret, open('secret.txt').read())") == "sealed sealed\n"
    assert sandboxed.proc is not None and sandboxed.proc.poll() is None


def test_the_store_and_its_wal_and_shm_are_the_servers_alone(sandboxed: ServerProcess) -> None:
    # Another account on the host must not read every user's code and output
    # (nor the token hashes) from the store, whatever the server's umask.
    with Client(sandboxed.url, sandboxed.tokens["alice"]).session() as a:  # type: ignore[attr-defined]
        assert run(a, "print('written')") == "written\n"
        store = Path(sandboxed.db)
        files = {suffix: os.stat(f"{store}{suffix}") for suffix in ("", "-wal", "-shm")}
    for suffix, info in files.items():
        assert (info.st_uid, oct(info.st_mode & 0o777)) == (SERVER_UID, "0o600"), suffix


def test_without_a_delegated_cgroup_the_server_says_what_memory_is_not_counted(sandboxed: ServerProcess) -> None:
    isolation = ApiClient(sandboxed.url, sandboxed.tokens["alice"]).status()["isolation"]  # type: ignore[attr-defined]
    memory = isolation["memory"]
    assert memory.startswith("1 GiB per slot (RLIMIT_DATA): memfd, SysV shared memory and tmpfs pages are "
                             "not counted, since no memory cgroup could be had (cgroup v2: ")
    assert "Delegate=yes" in memory
    assert any("worker memory: " + memory in line for line in sandboxed.log)  # at start, as a warning
    assert isolation["processes"].startswith(f"{PIDS} processes and threads per slot (RLIMIT_NPROC, per "
                                             "worker: each sandbox is a user namespace of its own; no pids "
                                             "cgroup: ")


def test_a_sandboxed_fork_bomb_stops_at_its_own_limit(sandboxed: ServerProcess) -> None:
    if "RLIMIT_NPROC, per worker" not in str(sandboxed.log):
        pytest.skip("RLIMIT_NPROC is not counted per sandbox on this kernel")
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    with Client(sandboxed.url, tokens["bob"]).session() as b, \
            Client(sandboxed.url, tokens["alice"]).session() as a:
        run(b, "b_kept = 'kept'")
        bomb = a.execute(FORK_BOMB + "\nprint(len(children))", on_output=quiet)
        assert bomb.error is not None
        assert (f"Resource temporarily unavailable: this worker reached its process limit ({PIDS} processes "
                "and threads, rgpu serve --worker-pids)") in str(bomb.error)
        # A's children hold every pid of A's sandbox; B's sandbox and the server's uid are counted apart.
        assert run(b, """
import subprocess, threading
done = threading.Event()
threads = [threading.Thread(target=done.wait) for _ in range(PIDS)]
for thread in threads:
    thread.start()
print(subprocess.run(['echo', 'forked'], capture_output=True, text=True).stdout.strip(), len(threads), b_kept)
done.set()
""".replace("PIDS", str(PIDS // 2))) == f"forked {PIDS // 2} kept\n"
        assert run(a, "print('next cell')") == "next cell\n"
        a.restart()
        assert run(a, "import subprocess; print(subprocess.run(['true']).returncode)") == "0\n"
    assert sandboxed.proc is not None and sandboxed.proc.poll() is None


def test_a_parked_sandboxed_session_comes_back_in_its_own_folder(sandboxed: ServerProcess) -> None:
    with Client(sandboxed.url, sandboxed.tokens["alice"]).session() as a:  # type: ignore[attr-defined]
        folder = run(a, "import os\nopen('notes.txt', 'w').write('kept')\nkept = [1, 2]\nprint(os.getcwd())")
        assert "gave cpu" in a.park().text
        # A sandbox binds its folder when it starts: the restore starts one for this folder.
        assert run(a, "print(os.getcwd(), open('notes.txt').read(), kept)") == f"{folder.strip()} kept [1, 2]\n"


def test_a_sandboxed_users_packages_last_and_stay_theirs(sandboxed: ServerProcess, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    wheel = tiny_wheel(tmp_path, "rgpu_sandbox_probe", "1.0", "alice's")
    monkeypatch.chdir(tmp_path)
    with Client(sandboxed.url, tokens["alice"]).session() as a:
        a.upload(wheel.name)
        assert "Successfully installed" in run(a, f"%pip install --no-index {wheel.name}")
        assert run(a, "import rgpu_sandbox_probe; print(rgpu_sandbox_probe.VALUE)") == "alice's\n"
    # A warm sandbox got her site bound in at lease time: it lasts, and nothing else of the session root.
    with Client(sandboxed.url, tokens["bob"]).session() as b, \
            Client(sandboxed.url, tokens["alice"]).session() as a:
        assert run(a, "import rgpu_sandbox_probe; print(rgpu_sandbox_probe.VALUE)") == "alice's\n"
        missing = b.execute("import rgpu_sandbox_probe", on_output=quiet).error
        assert missing is not None and missing.ename == "ModuleNotFoundError"
        assert run(b, "import os; print(os.listdir('/run/rgpu/sites'), sorted(os.listdir('/run/rgpu/site')))") == \
            "[] ['bin', 'lib', 'pyvenv.cfg']\n"
        refused = b.execute("import ctypes\nassert ctypes.CDLL(None, use_errno=True).umount2(b'/run/rgpu/site', 2) "
                            "== 0, 'refused'", on_output=quiet).error
        assert refused is not None and "refused" in refused.evalue
        assert "removed 1 package(s)" in run(a, "%rgpu_env reset")


def test_past_the_disk_limit_a_sandboxed_users_cells_fail_until_they_free_space(
        sandboxed: ServerProcess) -> None:
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    with Client(sandboxed.url, tokens["bob"]).session() as b, \
            Client(sandboxed.url, tokens["alice"]).session() as a:
        # No one file outgrows the limit: the kernel refuses it at once (RLIMIT_FSIZE).
        assert run(a, "import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE)[0] >> 20)") == "16\n"
        big = a.execute("open('big.bin', 'wb').write(b'x' * (17 << 20))", on_output=quiet).error
        assert big is not None
        if big.ename == "OSError":
            assert "File too large" in big.evalue
            assert "share 16 MiB of disk (rgpu serve --session-disk)" in big.traceback[-1]
        else:  # the server looked while the file stood at the limit, beside the user's packages: past it
            assert big.ename == "SessionDiskFull" and "past your limit of 16 MiB" in big.evalue
        # Many files: the server's next look stops the cell, with why and what to do.
        filled = a.execute("import os, time\nos.remove('big.bin')\nos.mkdir('fill')\nfor i in range(24):\n"
                           "    open(f'fill/{i}', 'wb').write(b'x' * (1 << 20))\nwhile True:\n"
                           "    time.sleep(0.1)", on_output=quiet).error
        assert filled is not None and filled.ename == "SessionDiskFull"
        assert "past your limit of 16 MiB (rgpu serve --session-disk)" in filled.evalue
        assert "delete files you no longer need" in filled.evalue
        disk = ApiClient(sandboxed.url, tokens["alice"]).status()["disk"]
        assert disk["enforced_by"] == "server" and disk["you"]["used"] >= 24 << 20
        # B is not A: all of B's disk is there, and B's cells run.
        assert run(b, "open('mine.bin', 'wb').write(b'y' * (12 << 20))\nimport os\nos.remove('mine.bin')\n"
                      "print('written')") == "written\n"
        # Past the limit, a cell that writes more is stopped; one that frees space is not.
        more = a.execute("import time\nopen('more.bin', 'wb').write(b'z' * (1 << 20))\ntime.sleep(60)",
                         on_output=quiet).error
        assert more is not None and more.ename == "SessionDiskFull"
        assert run(a, "import os, shutil\nshutil.rmtree('fill')\nos.remove('more.bin')\nprint('freed')") == \
            "freed\n"
        # Under the limit again, a cell that runs across the server's looks goes on.
        assert run(a, "import time\ntime.sleep(2.5)\nprint('fine')") == "fine\n"


def test_without_isolation_the_server_serves_its_first_user_only(tmp_path: Path) -> None:
    # No bubblewrap on PATH, and not root: nothing can isolate workers.
    bare = os.path.dirname(sys.executable)
    if shutil.which("bwrap", path=bare):
        pytest.skip(f"bwrap is in {bare}, next to this Python")
    server = ServerProcess(tmp_path, "cpu:1", launcher=launcher(str(tmp_path)), env={"PATH": bare})
    alice, bob = server.token("alice"), server.token("bob")
    server.start()
    try:
        assert any("workers are NOT isolated" in line and "one user only" in line for line in server.log)
        with Client(server.url, alice).session() as a:
            assert run(a, "print('first come')") == "first come\n"
            with pytest.raises(AuthenticationError, match="serves one user only \\(alice\\).*--no-isolation"):
                Client(server.url, bob).session()
            isolation = ApiClient(server.url, alice).status()["isolation"]
            assert isolation["isolated"] is False and "serves one user only" in isolation["detail"]
    finally:
        server.stop()


def test_no_isolation_serves_everyone_and_says_so(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "cpu:2", "--no-isolation")
    alice, bob = server.token("alice"), server.token("bob")
    server.start()
    try:
        assert any("workers are NOT isolated (--no-isolation)" in line for line in server.log)
        with Client(server.url, alice).session() as a, Client(server.url, bob).session() as b:
            assert run(a, "import os; print(os.getuid())") == run(b, "import os; print(os.getuid())")
        isolation = ApiClient(server.url, bob).status()["isolation"]
        assert isolation == {**isolation, "isolated": False, "mode": "none"}
        assert "--no-isolation" in isolation["detail"]
    finally:
        server.stop()


def sandboxed_worker(folder: str) -> int:
    """The host pid of the sandboxed worker whose working folder is ``folder``
    (its session folder: the sandbox binds it at the same path)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and proc.stat().st_uid == SERVER_UID and os.readlink(proc / "cwd") == folder:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if not argv[0].endswith(b"bwrap") and b"remote_gpu_server.worker_process.kernel" in argv:
                    found.append(int(proc.name))
        except OSError:  # a process that ended meanwhile
            pass
    assert len(found) == 1, found
    return found[0]


SYSV = r"""
import ctypes, errno, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
print(subprocess.run(['unshare', '--user', 'true'], capture_output=True, text=True).returncode)
"""


def test_sandboxes_listen_on_no_port_share_no_sysv_ipc_and_make_no_user_namespace(
        sandboxed: ServerProcess) -> None:
    tokens = sandboxed.tokens  # type: ignore[attr-defined]
    key = 0x52480000 + os.getpid() % 0xFFFF
    with Client(sandboxed.url, tokens["bob"]).session() as b, \
            Client(sandboxed.url, tokens["alice"]).session() as a:
        made = run(a, SYSV + f"print(libc.shmget({key}, 1 << 20, 0o1666) >= 0)")
        seen = run(b, SYSV + f"print(errno.errorcode.get(ctypes.get_errno()) if libc.shmget({key}, 0, 0) < 0 "
                             "else 'SEEN')")
        assert made.split() == ["1", "True"] and seen.split() == ["1", "ENOENT"]  # unshare failed: 1
        for session in (a, b):
            assert inet_listeners(sandboxed_worker(run(session, "import os; print(os.getcwd())").strip())) == []


@pytest.fixture
def system_folders() -> Iterator[tuple[Path, Path]]:
    """A folder under /opt and one under /etc, as an admin would make for the
    server's store and its key; removed after."""
    name = f"rgpu-test-{os.getpid()}-{secrets.token_hex(4)}"
    folders = (Path("/opt") / name, Path("/etc") / name)
    try:
        for folder in folders:
            folder.mkdir(mode=0o700)
        yield folders
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_cell_reaches_no_server_file_under_opt_or_etc(tmp_path: Path, system_folders: tuple[Path, Path]) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    opt, etc = system_folders
    issued = issue(etc, "localhost", "127.0.0.1")  # the README's --certfile / --keyfile in /etc/rgpu
    (opt / "tls").mkdir()
    (opt / "tls" / "key.pem").write_bytes(issued.key.read_bytes())  # as --tls self-signed makes it
    server = ServerProcess(tmp_path, "cpu:1", "--worker-memory", "1G", "--certfile", str(issued.cert),
                           "--keyfile", str(issued.key), db=opt / "rgpu.sqlite3", launcher=launcher(str(tmp_path)))
    alice = server.token("alice")
    for folder in system_folders:
        for path in (folder, *folder.rglob("*")):
            os.chown(path, SERVER_UID, SERVER_UID)
    issued.key.chmod(0o600)
    server.start()
    try:
        with Client(server.url, alice, cafile=str(issued.ca)).session() as a:
            out = run(a, f"""
import os
for path in {[str(p) for p in (issued.key, issued.cert, opt / "tls" / "key.pem", opt / "rgpu.sqlite3")]!r}:
    try:
        print(len(open(path, 'rb').read()))
    except (FileNotFoundError, PermissionError) as exc:
        print(type(exc).__name__)
print(os.listdir({str(opt)!r}), os.listdir({str(opt / "sessions")!r}) == [os.path.basename(os.getcwd())])
print(sorted(os.listdir({str(etc)!r})))
""")
    finally:
        server.stop()
    # The key and certificate that the configuration names are /dev/null on a
    # nodev mount; the store's folder holds only the way to the cell's own.
    assert out.splitlines() == ["PermissionError", "PermissionError", "FileNotFoundError", "FileNotFoundError",
                                "['sessions'] True", "['ca.pem', 'server.key', 'server.pem']"], out
