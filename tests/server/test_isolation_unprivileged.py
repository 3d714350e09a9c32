"""A server that is not root: bubblewrap sandboxes, or one user only.

From a root test the real server runs as a bare unprivileged uid (see
``unprivileged.py``). With bubblewrap it sandboxes each worker: user A
cannot see B's folder, the store or any process outside its sandbox, and B
carries on; A's fork bomb stops at A's own process limit (RLIMIT_NPROC,
which Linux counts per sandbox). No cgroup is delegated to the server here,
so it says that memfd and shared memory are not counted. Without bubblewrap
nothing can isolate: the server serves the first user only and says so;
``--no-isolation`` serves everyone and says that workers are not isolated.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel import AuthenticationError, Client, RemoteTimeout
from remote_gpu_kernel.api import ApiClient
from servers import ServerProcess
from test_isolation import FORK_BOMB, quiet, run
from unprivileged import SERVER_UID, launcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the server as another uid: run as root")
#: --worker-pids of the sandboxed server: small, so that a fork bomb stops soon.
PIDS = 64




@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    tmp = tmp_path_factory.mktemp("sandboxed")
    server = ServerProcess(tmp, "cpu:2", "--worker-memory", "1G", launcher=launcher(str(tmp)),
                           env={"RGPU_WORKER_PIDS": str(PIDS)})  # the flag's variable
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
