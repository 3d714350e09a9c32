"""Host memory limits: sizes, fair shares, and real cgroup v1 groups where root has them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from remote_gpu_server.isolation.cgroups import Cgroups, WorkerCgroup, own_group
from remote_gpu_server.isolation.memory_limits import MemoryControl, MemoryLimits, fair_share
from waiting import wait_for


def test_each_slot_gets_a_fair_share_of_the_host() -> None:
    assert fair_share(4, total=40 << 30) == int((40 << 30) * 0.9 / 4)
    assert fair_share(0, total=10 << 30) == int((10 << 30) * 0.9)


def test_without_cgroups_workers_limit_themselves_with_rlimit_data() -> None:
    limits = MemoryLimits.choose(256 << 20, Cgroups.probe(["memory"], allow=False))
    worker = limits.for_worker(WorkerCgroup(), slots=2)
    assert limits.control is MemoryControl.RLIMIT and worker.group is None
    assert worker.limit == worker.data_limit == 512 << 20 and worker.limit_text == "512 MiB"
    assert worker.explain(-signal.SIGKILL) is None  # no cgroup: a MemoryError says it in the cell
    assert MemoryLimits.choose(None, Cgroups()).describe() == "no memory limit"


def test_without_a_memory_cgroup_the_server_says_what_is_not_counted_and_why() -> None:
    reasons = Cgroups(reasons={"memory": "cgroup v2: the memory controller is not available in /x; "
                                         "cgroup v1: Permission denied"})
    limits = MemoryLimits.choose(1 << 30, reasons)
    assert not limits.counts_shared_pages
    line = limits.describe()
    assert line.startswith("1 GiB per slot (RLIMIT_DATA): memfd, SysV shared memory and tmpfs pages are "
                           "not counted")
    assert "cgroup v1: Permission denied" in line and "Delegate=yes" in line


def _fake_proc(tmp: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return proc


def test_the_own_cgroup_is_found_in_either_hierarchy_and_inside_containers(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "4:memory:/svc/rgpu\n0::/system.slice/rgpu.service\n",
                      "30 25 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                      "31 25 0:38 /system.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert own_group(1, proc) == Path("/sys/fs/cgroup/memory/svc/rgpu")
    assert own_group(2, proc) == Path("/sys/fs/cgroup/rgpu.service")  # the mount's root is not /


def _dead(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` is gone or a zombie waiting for init, within ``timeout``."""
    try:
        wait_for(lambda: _gone(pid), timeout, f"the end of pid {pid}", every=0.05)
    except AssertionError:
        return False
    return True


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


needs_v1 = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists(),
    reason="needs root and a cgroup v1 memory hierarchy")


@needs_v1
def test_a_cgroup_says_out_of_host_memory_and_takes_stragglers_along() -> None:
    cgroups = Cgroups.probe(["memory"])
    if cgroups.version("memory") != 1:
        pytest.skip(f"this machine has no cgroup v1 memory hierarchy to use: {cgroups.reasons}")
    limits = MemoryLimits.choose(128 << 20, cgroups)
    assert limits.control is MemoryControl.CGROUP_V1 and limits.counts_shared_pages
    cgroup = cgroups.make("w-test")
    group = cgroup.path("memory")
    try:
        worker = limits.for_worker(cgroup, slots=1)
        assert group is not None and cgroup.join is not None and group.parent.name == f"rgpu-{os.getpid()}"
        assert int((group / "memory.limit_in_bytes").read_text()) == 128 << 20
        hog = subprocess.run([sys.executable, "-c", "x = bytearray(512 << 20)"], preexec_fn=cgroup.join,
                             check=False)
        assert hog.returncode == -signal.SIGKILL
        assert worker.explain(hog.returncode) == "out of host memory (limit 128 MiB)"
        # A process that left its parent's session still belongs to the worker.
        parent = subprocess.Popen([sys.executable, "-c", (
            "import os, subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
            "print('started', flush=True)")], stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.join)
        assert parent.stdout is not None and parent.stdout.readline() == "started\n"
        parent.wait()
        parent.stdout.close()
        stragglers = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        assert len(stragglers) == 1
        cgroup.close()
        assert not group.exists()
        assert _dead(stragglers[0])
    finally:
        cgroup.close()
        assert group is not None
        base = group.parent
        cgroups.close()
        assert not base.exists()
