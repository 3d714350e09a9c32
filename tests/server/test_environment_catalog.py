"""The environments package without a server: parsing ``--env``, the checks'
refusals, and the folder of the worker's own code."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from remote_gpu_server.environments import Environments, WorkerCode, check_interpreter, parse_environment
from remote_gpu_server.workers.local_launcher import LocalLauncher


def test_env_flags_parse_and_say_what_is_wrong() -> None:
    assert parse_environment("np1=/opt/envs/np1/bin/python") == ("np1", "/opt/envs/np1/bin/python")
    for bad, said in (("np1", "expected NAME=PYTHON"), ("=/x/python", "expected NAME=PYTHON"),
                      ("bad name=/x/python", "not an environment name"),
                      ("default=/x/python", "the server's own Python")):
        with pytest.raises(ValueError, match=said):
            parse_environment(bad)


def test_the_check_refuses_what_is_not_an_interpreter(tmp_path: Path) -> None:
    assert "absolute path" in check_interpreter("python3").problems[0]
    assert "not an interpreter that can be run" in check_interpreter(tmp_path / "missing").problems[0]
    script = tmp_path / "fake"
    script.write_text("#!/bin/sh\necho not python >&2\nexit 3\n")
    script.chmod(0o755)
    check = check_interpreter(script)
    assert not check.ok and check.problems == (f"{script} did not run as Python: not python",)


def test_a_server_does_not_start_with_an_environment_that_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"environment np9 \(/nowhere/python\): .* \(rgpu env check PYTHON explains\)"):
        Environments.load([("np9", "/nowhere/python")])
    with pytest.raises(ValueError, match="named twice"):
        Environments.load([("np1", sys.executable), ("np1", sys.executable)])


def test_the_worker_code_folder_holds_only_the_workers_packages_read_only() -> None:
    code = WorkerCode()
    try:
        top = sorted(p.name for p in code.folder.iterdir())
        assert top == ["remote_gpu_core", "remote_gpu_server"]
        assert sorted(p.name for p in (code.folder / "remote_gpu_server").iterdir()) == ["__init__.py",
                                                                                          "worker_process"]
        for root, dirs, files in os.walk(code.folder):
            for name in files:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o444
            for name in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o555
        # The worker imports from it alone, with none of the server's other packages.
        probe = ("import remote_gpu_server.worker_process.kernel, remote_gpu_core, sys; "
                 "print(remote_gpu_core.__file__); import remote_gpu_server.cli")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/",
                              env={**os.environ, "PYTHONPATH": str(code.folder)}, check=False)
        assert done.stdout.startswith(str(code.folder)), done.stderr
        assert "No module named 'remote_gpu_server.cli'" in done.stderr
    finally:
        code.close()
    assert not code.folder.exists()


def test_a_launcher_refuses_an_environment_it_does_not_have() -> None:
    launcher = LocalLauncher()
    try:
        with pytest.raises(ValueError, match=r"environment 'np9' is not configured on this server; it has: default"):
            launcher._interpreter("np9")
    finally:
        asyncio.run(launcher.close())
