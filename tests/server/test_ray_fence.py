"""What keeps a Ray cluster's users apart, without a cluster: where Ray's token
is, who else could read it, which nodes a head leaves out, and what a
server that cannot keep users apart admits (see ``test_ray.py`` and
``test_ray_unauthenticated.py`` for the same on real clusters)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_server.isolation.modes import IsolationMode
from remote_gpu_server.isolation.policy import Isolation, IsolationConfig
from remote_gpu_server.cluster.fence import NodeReport, refusal, token_exposure, token_files
from remote_gpu_server.isolation import sandbox
from remote_gpu_server.isolation.sandbox import find_bubblewrap

UNFENCED = "the Ray cluster at 10.0.0.1:6379 does not require Ray's token authentication"


def test_ray_reads_its_token_from_the_variable_then_the_named_file_then_the_default(tmp_path: Path) -> None:
    named, default = tmp_path / "named", tmp_path / ".ray" / "auth_token"
    default.parent.mkdir()
    named.write_text("t1")
    default.write_text("t2")
    assert token_files({"RAY_AUTH_TOKEN": "t0", "RAY_AUTH_TOKEN_PATH": str(named)}, tmp_path) == ()
    assert token_files({"RAY_AUTH_TOKEN_PATH": str(named)}, tmp_path) == (named,)
    assert token_files({}, tmp_path) == (default,)
    assert token_files({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path) == ()


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter, all the way down (pytest's own folder is closed),
    outside /tmp (a sandbox has a /tmp of its own)."""
    if not os.access("/run", os.W_OK):
        pytest.skip("makes a folder in /run: run as root")
    folder = Path(tempfile.mkdtemp(prefix="rgpu-test-token-", dir="/run"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_token_file_others_can_read_is_exposed_unless_a_folder_on_the_way_is_closed(open_folder: Path) -> None:
    assert all(os.stat(folder).st_mode & 0o001 for folder in open_folder.parents)
    token = open_folder / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)  # what `ray get-auth-token --generate` leaves under a usual umask
    exposed = token_exposure(token)
    assert exposed is not None and "mode 0644" in exposed and f"chmod 600 {token}" in exposed
    token.chmod(0o600)
    assert token_exposure(token) is None
    token.chmod(0o640)
    assert token_exposure(token) is not None  # a worker may share the file's group
    open_folder.chmod(0o700)
    assert token_exposure(token) is None  # nobody else enters the folder


def test_a_head_that_isolates_leaves_out_a_node_that_cannot_or_that_shows_its_token() -> None:
    uids = NodeReport("uids", "", 0, True)
    sandboxes = NodeReport("bubblewrap", "", 1000, True)
    bare = NodeReport("none", "not root, and bubblewrap (bwrap) is not installed", 1000, True)
    shown = NodeReport("uids", "", 0, True, exposed="its Ray token file /x can be read by other users")
    assert refusal(uids, isolate=True) is None and refusal(sandboxes, isolate=True) is None
    why = refusal(bare, isolate=True)
    assert why is not None and "every user's code would run there as uid 1000" in why
    assert "bubblewrap (bwrap) is not installed" in why
    assert refusal(shown, isolate=True) == shown.exposed
    # A head that does not isolate (--no-isolation, or it serves one user) takes every node.
    assert refusal(bare, isolate=False) is None and refusal(shown, isolate=False) is None


def test_an_isolated_server_that_cannot_keep_users_apart_serves_one_user_unless_told(tmp_path: Path) -> None:
    fenced = Isolation(IsolationConfig(mode=IsolationMode.UIDS, worker_memory="none"), tmp_path / "db")
    fenced.refuse_sharing(UNFENCED)
    assert fenced.admit("alice") is None and fenced.admit("alice") is None
    refusal_ = fenced.admit("bob")
    assert refusal_ is not None and f"cannot keep users apart ({UNFENCED})" in refusal_
    assert "serves one user only (alice)" in refusal_ and "--no-isolation" in refusal_
    status = fenced.status_json()
    assert status["isolated"] is False and status["mode"] == "uids"
    assert UNFENCED in status["detail"] and "serves one user only" in status["detail"]
    knowingly = Isolation(IsolationConfig(no_isolation=True, worker_memory="none"), tmp_path / "db")
    knowingly.refuse_sharing(UNFENCED)
    assert knowingly.admit("alice") is None and knowingly.admit("bob") is None


def test_no_worker_environment_carries_rays_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray/token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    for mode in IsolationMode:
        isolation = Isolation(IsolationConfig(mode=mode, worker_env=("RAY_",)), tmp_path / "db")
        env = isolation.environment({})
        assert env["RAY_DEDUP_LOGS"] == "0"  # --worker-env RAY_ passes the rest
        assert not [name for name in env if name.startswith("RAY_AUTH")]


def test_a_sandboxed_worker_cannot_read_a_token_file_inside_what_it_may_read(tmp_path: Path,
                                                                           open_folder: Path) -> None:
    bwrap = find_bubblewrap()
    if bwrap is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    readable = open_folder  # like /opt/ray: a folder the sandbox binds
    token = readable / "auth_token"
    token.write_text("ray-secret")
    code_paths = (*sandbox.python_paths(), readable)  # as a named environment's folders are

    def read_in_a_sandbox(hidden: tuple[Path, ...]) -> str:
        isolation = Isolation(IsolationConfig(mode=IsolationMode.BUBBLEWRAP, worker_memory="none",
                                              session_root=tmp_path / "sessions"), tmp_path / "db",
                              server_files=hidden)
        isolation.bwrap = bwrap
        isolation.start(1)
        runtime = tmp_path / "runtime" / f"w{len(hidden)}"
        runtime.mkdir(parents=True)
        worker = isolation.prepare(runtime.name, 1, runtime, code_paths=code_paths)
        try:
            done = subprocess.run(worker.command(["cat", str(token)]), capture_output=True, text=True,
                                  timeout=60, check=False)
            return done.stdout + done.stderr
        finally:
            worker.close()
            isolation.close()

    assert read_in_a_sandbox(()) == "ray-secret"  # bound like the rest of the folder
    assert "ray-secret" not in read_in_a_sandbox((token,))  # /dev/null in its place, as a node's sandbox has
    assert token.read_text() == "ray-secret"  # the file itself stays, for Ray
