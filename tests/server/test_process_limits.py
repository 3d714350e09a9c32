"""Process limits: the flag, the host's share, how RLIMIT_NPROC counts, and a
real cgroup v1 pids group that stops a fork bomb where root has one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from remote_gpu_server.isolation.cgroups import Cgroups, WorkerCgroup
from remote_gpu_server.isolation.process_limits import (
    MIN_PIDS, ProcessControl, ProcessLimits, fair_pids, host_capacity, nproc_counting, parse_pids
)
from remote_gpu_server.worker_process.errors import ProcessLimit

#: Forks children that wait on a pipe until a fork fails, prints how many it
#: started and the error, then lets them go: bounded by the limit, and by 500.
BOUNDED_BOMB = """\
import os
read, write = os.pipe()
children = []
try:
    while len(children) < 500:
        pid = os.fork()
        if pid == 0:
            os.close(write)
            os.read(read, 1)
            os._exit(0)
        children.append(pid)
    print(len(children), "no error")
except OSError as exc:
    print(len(children), exc)
finally:
    os.close(write)
    for pid in children:
        os.waitpid(pid, 0)
"""


def test_the_flag_takes_auto_a_number_or_none() -> None:
    assert parse_pids("auto", 1) == fair_pids(1) and parse_pids(" 512 ", 4) == 512
    assert parse_pids("none", 1) is None
    for bad in ("lots", "-5", "1.5"):
        with pytest.raises(ValueError, match="is not a number of processes"):
            parse_pids(bad, 1)
    with pytest.raises(ValueError, match=f"at least {MIN_PIDS}"):
        parse_pids("8", 1)


def test_auto_is_4096_per_slot_or_each_slots_share_of_a_small_host() -> None:
    assert fair_pids(3, capacity=32768) == 4096
    assert fair_pids(8, capacity=1442) == int(1442 * 0.9 / 8)  # a container with pids.max 1442
    assert fair_pids(100, capacity=100) == MIN_PIDS


def test_the_hosts_capacity_is_the_least_of_its_limits_and_the_servers_cgroup(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "sys" / "kernel" / "pid_max").write_text("32768\n")
    (proc / "sys" / "kernel" / "threads-max").write_text("192735\n")
    mount = tmp_path / "cgroup"
    (mount / "svc" / "rgpu").mkdir(parents=True)
    (mount / "svc" / "pids.max").write_text("1442\n")  # an ancestor's limit binds the server too
    (mount / "svc" / "rgpu" / "pids.max").write_text("max\n")
    (proc / "self" / "cgroup").write_text("0::/svc/rgpu\n")
    (proc / "self" / "mountinfo").write_text(f"31 25 0:38 / {mount} rw - cgroup2 cgroup2 rw\n")
    assert host_capacity(proc) == 1442
    (mount / "svc" / "pids.max").write_text("max\n")
    assert host_capacity(proc) == 32768


def test_rlimit_nproc_counts_per_user_per_sandbox_or_not_at_all() -> None:
    user = nproc_counting("uids", euid=0)
    assert user.how is not None and "per user" in user.how and not user.shared
    sandbox = nproc_counting("bubblewrap", euid=1000, release="6.18.44-fc")
    assert sandbox.how is not None and "per worker" in sandbox.how and not sandbox.shared
    old = nproc_counting("bubblewrap", euid=1000, release="5.10.0-28-amd64")
    assert old.how is None and "5.14" in old.why_not
    root = nproc_counting("none", euid=0)
    assert root.how is None and "root" in root.why_not
    shared = nproc_counting("none", euid=1000)
    assert shared.how is not None and "the server's own included" in shared.how and shared.shared
    # One count for every worker and the server: each worker's rlimit is what all may run together.
    together = ProcessLimits.choose(100, Cgroups(), shared, slots=4).for_worker(WorkerCgroup(), slots=1)
    assert (together.limit, together.nproc) == (100, 400)


def test_an_explicit_limit_that_lets_workers_take_the_host_is_warned_of() -> None:
    limits = ProcessLimits.choose(4096, Cgroups(), nproc_counting("uids", euid=0), slots=8)
    warning = limits.crowding(capacity=32768)
    assert warning is not None and "may run 32768 processes and threads together" in warning
    assert ProcessLimits.choose(fair_pids(8, 32768), Cgroups(), nproc_counting("uids", euid=0),
                                slots=8).crowding(capacity=32768) is None


def test_each_control_says_what_it_is_and_why_not_a_cgroup() -> None:
    counting = nproc_counting("uids", euid=0)
    no_cgroup = Cgroups(reasons={"pids": "cgroup v1: Permission denied"})
    assert ProcessLimits.choose(None, no_cgroup, counting).describe() == "no process limit"
    rlimit = ProcessLimits.choose(4096, no_cgroup, counting)
    assert rlimit.control is ProcessControl.RLIMIT
    assert rlimit.describe() == ("4096 processes and threads per slot (RLIMIT_NPROC, per user, over all of "
                                 "their workers; no pids cgroup: cgroup v1: Permission denied)")
    worker = rlimit.for_worker(WorkerCgroup(), slots=2)
    assert (worker.limit, worker.nproc, worker.events) == (8192, 8192, None)
    assert worker.explain(1) is None  # no cgroup counts refusals: the cell's error says it
    nothing = ProcessLimits.choose(4096, no_cgroup, nproc_counting("none", euid=0))
    assert nothing.control is ProcessControl.NONE
    assert nothing.describe() == ("no process limit: no pids cgroup (cgroup v1: Permission denied), and "
                                  "workers run as root, which RLIMIT_NPROC does not limit")
    assert nothing.for_worker(WorkerCgroup(), 1).limit is None


def _raised(function: Callable[[], object]) -> tuple[BaseException, TracebackType | None]:
    try:
        function()
    except Exception as exc:
        return exc, exc.__traceback__
    raise AssertionError("it did not raise")


def _execute_child() -> None:  # where subprocess.Popen fails to fork
    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


def _read_a_socket() -> None:
    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


def _start_a_thread() -> None:
    raise RuntimeError("can't start new thread")


def test_the_worker_blames_its_limit_only_where_a_start_failed_for_it(tmp_path: Path) -> None:
    events = tmp_path / "pids.events"
    events.write_text("max 0\n")
    counted = ProcessLimit(96, str(events))
    guessed = ProcessLimit(96)  # RLIMIT_NPROC: no cgroup counts the refusals
    try:
        assert "reached its process limit (96 processes and threads" in counted.text
        started, elsewhere = _raised(_execute_child), _raised(_read_a_socket)
        thread = _raised(_start_a_thread)
        assert not counted.explains(*started)  # the cgroup refused nothing
        events.write_text("max 3\n")
        assert counted.explains(*started) and not counted.refused_since()  # told once
        assert guessed.explains(*started) and guessed.explains(*thread)
        assert not guessed.explains(*elsewhere) and not guessed.explains(*_raised(lambda: int("x")))
    finally:
        assert counted.events is not None
        os.close(counted.events)


needs_v1_pids = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup/pids/cgroup.procs").exists(),
    reason="needs root and a cgroup v1 pids hierarchy")


@needs_v1_pids
def test_a_pids_cgroup_stops_a_fork_bomb_at_its_limit_and_counts_the_refusals() -> None:
    cgroups = Cgroups.probe(["memory", "pids"])
    if cgroups.version("pids") != 1:
        pytest.skip(f"this machine has no cgroup v1 pids hierarchy to use: {cgroups.reasons}")
    limits = ProcessLimits.choose(MIN_PIDS, cgroups, nproc_counting("uids"))
    assert limits.control is ProcessControl.CGROUP_V1
    cgroup = cgroups.make("w-bomb")
    try:
        worker = limits.for_worker(cgroup, slots=1)
        pids = cgroup.path("pids")
        assert pids is not None and int((pids / "pids.max").read_text()) == MIN_PIDS
        if cgroups.version("memory"):  # a group in each v1 hierarchy, joined together
            assert len(cgroup.folders) == 2
        assert worker.refusals() == 0
        bomb = subprocess.run([sys.executable, "-c", BOUNDED_BOMB], preexec_fn=cgroup.join,
                              capture_output=True, text=True, timeout=60, check=True)
        started, error = bomb.stdout.split(maxsplit=1)
        assert int(started) < MIN_PIDS and "Resource temporarily unavailable" in error
        assert worker.refusals() >= 1
        explained = worker.explain(1)
        assert explained is not None and explained.startswith("exit code 1, after it reached its process "
                                                              f"limit ({MIN_PIDS} processes and threads")
    finally:
        folders = cgroup.folders
        cgroup.close()
        cgroups.close()
    assert not any(folder.exists() or folder.parent.exists() for folder in folders)
