"""Binding a user's site into a started bubblewrap sandbox (see site_binder.py).

The real server's path is tried from cells in test_isolation_unprivileged.py;
here the binder alone, against real sandboxes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_server.isolation.sandbox import SandboxLayout, bubblewrap_argv, check_bubblewrap, check_site_binding
from remote_gpu_server.isolation.site_binder import SITE, STASH, SiteBinder, sandbox_pid

@pytest.fixture
def binder() -> Iterator[SiteBinder]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is not installed: apt-get install bubblewrap (scripts/setup.sh does)")
    problem = check_bubblewrap(bwrap)
    if problem is not None:
        pytest.skip(f"bubblewrap cannot make a sandbox here: {problem}")
    binder = SiteBinder()
    yield binder
    binder.close()


def test_the_host_allows_it(binder: SiteBinder) -> None:
    bwrap = shutil.which("bwrap")
    assert bwrap is not None and check_site_binding(bwrap, binder) is None


def test_one_users_site_is_bound_and_the_others_are_gone(binder: SiteBinder, tmp_path: Path) -> None:
    for user in ("alice", "bob"):
        (tmp_path / user).mkdir()
        (tmp_path / user / "mine.txt").write_text(user)
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    layout = SandboxLayout(writable=(), binds=((tmp_path, STASH),), dirs=(SITE,))
    look = (f"import os, sys; print('ready', flush=True); sys.stdin.readline(); "
            f"print(open({str(SITE / 'mine.txt')!r}).read(), os.listdir({str(STASH)!r}), sep='|'); "
            f"open({str(SITE / 'new.txt')!r}, 'w').write('kept')")
    argv = bubblewrap_argv(bwrap, layout) + [sys.executable, "-I", "-S", "-c", look]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as sandbox:
        assert sandbox.stdout is not None and sandbox.stdout.readline() == "ready\n"
        pid = sandbox_pid(sandbox.pid)
        assert pid is not None
        binder.bind(pid, STASH / "alice")
        out, _ = sandbox.communicate("\n", timeout=30)
    assert out == "alice|[]\n"
    assert (tmp_path / "alice" / "new.txt").read_text() == "kept"  # written where it lasts


def test_a_failed_bind_says_why_and_the_next_one_works(binder: SiteBinder) -> None:
    with pytest.raises(OSError, match="could not be bound into the sandbox: .*No such file"):
        binder.bind(2**22 + 1, STASH / "alice")  # no such process
    bwrap = shutil.which("bwrap")
    assert bwrap is not None and check_site_binding(bwrap, binder) is None
