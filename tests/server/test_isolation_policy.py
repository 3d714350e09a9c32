"""The server's isolation policy without workers: environments, the one-user
rule, the session root, and what a worker falls back to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_gpu_server.errors import IsolationError
from remote_gpu_server.isolation.modes import IsolationMode
from remote_gpu_server.isolation.policy import Isolation, IsolationConfig
from remote_gpu_server.isolation.cgroups import Cgroups, _Hierarchy
from remote_gpu_server.isolation.memory_limits import MemoryControl, MemoryLimits
from remote_gpu_server.isolation.process_limits import NprocCounting, ProcessControl, ProcessLimits


def test_a_worker_environment_keeps_only_the_allow_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"RGPU_TOKEN": "rgpu_secret", "AWS_SECRET_ACCESS_KEY": "x", "LC_ALL": "C.UTF-8",
                        "NCCL_DEBUG": "INFO", "SITE_PROXY": "http://proxy", "HOME": "/root"}.items():
        monkeypatch.setenv(name, value)
    isolated = Isolation(IsolationConfig(mode=IsolationMode.UIDS, worker_env=("SITE_PROXY",)), tmp_path / "db")
    env = isolated.environment({"RGPU_SLOTS": "cpu0"})
    assert {"LC_ALL", "NCCL_DEBUG", "SITE_PROXY", "PATH", "RGPU_SLOTS"} <= set(env)
    assert not {"RGPU_TOKEN", "AWS_SECRET_ACCESS_KEY", "HOME"} & set(env)  # HOME is set at lease time
    same_user = Isolation(IsolationConfig(mode=IsolationMode.NONE), tmp_path / "db").environment({})
    assert same_user["HOME"] == "/root" and "RGPU_TOKEN" not in same_user


def test_without_isolation_the_first_user_is_the_only_one(tmp_path: Path) -> None:
    alone = Isolation(IsolationConfig(mode=IsolationMode.NONE, worker_memory="none"), tmp_path / "db")
    alone.reason = "not root, and bubblewrap (bwrap) is not installed"
    alone.start(1)
    assert alone.admit("alice") is None and alone.admit("alice") is None
    refusal = alone.admit("bob")
    assert refusal is not None and "serves one user only (alice)" in refusal and "--no-isolation" in refusal
    status = alone.status_json()
    assert status["isolated"] is False and "serves one user only" in status["detail"]
    shared = Isolation(IsolationConfig(no_isolation=True, worker_memory="none"), tmp_path / "db")
    shared.start(1)
    assert shared.mode is IsolationMode.NONE and shared.admit("alice") is shared.admit("bob") is None
    assert "--no-isolation" in shared.status_json()["detail"]


def test_a_session_root_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sessions").symlink_to(tmp_path / "elsewhere")
    isolation = Isolation(IsolationConfig(mode=IsolationMode.BUBBLEWRAP, worker_memory="none"),
                          tmp_path / "db")
    with pytest.raises(IsolationError, match="must be a folder of the server's own"):
        isolation.start(1)


def test_a_worker_whose_cgroup_cannot_be_made_limits_itself(tmp_path: Path) -> None:
    isolation = Isolation(IsolationConfig(mode=IsolationMode.UIDS), tmp_path / "db")
    missing = _Hierarchy(1, tmp_path / "no-such-cgroup")
    isolation.cgroups = Cgroups({"memory": missing, "pids": missing})
    isolation.memory = MemoryLimits(MemoryControl.CGROUP_V1, 256 << 20)
    isolation.processes = ProcessLimits(ProcessControl.CGROUP_V1, 100, counting=NprocCounting("per user"))
    worker = isolation.prepare("w1", 2, tmp_path / "w1")
    assert worker.memory.data_limit == 512 << 20 and worker.cgroup.join is None
    assert worker.processes.nproc == 200 and worker.processes.events is None
    assert os.environ.get("RGPU_CONFINE") is None
    confine = worker.environment({})["RGPU_CONFINE"]
    assert '"data_limit": 536870912' in confine and '"nproc_limit": 200' in confine
