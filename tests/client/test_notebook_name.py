"""The Remote GPU kernel and the %%gpu magic tell the server which notebook
they serve (Jupyter's ``JPY_SESSION_NAME``), and the server shows it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kernels import LocalKernel
from remote_gpu_kernel.api import ApiClient
from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess
from waiting import wait_for


def lease_of(api: ApiClient, notebook: str, timeout: float = 30) -> dict[str, Any]:
    """The caller's lease for ``notebook``, once the server shows it."""
    found = wait_for(lambda: [s for s in api.status()["sessions"] if s["mine"] and s["notebook"] == notebook],
                     timeout, f"a lease for {notebook}", every=0.2)
    return found[0]


def test_the_remote_gpu_kernel_names_its_notebook(server: ServerProcess, alice: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(tmp_path / "prefix")))
    notebook = str(tmp_path / "work" / "kernel notebook.ipynb")
    env = dict(kernel_env(tmp_path, server.url, alice), JPY_SESSION_NAME=notebook)
    driver = KernelDriver(env).start()
    try:
        run = driver.run("# a first cell\nvalue = 6 * 7")
        assert run.status == "ok", run.reply
        api = ApiClient(server.url, alice)
        lease = lease_of(api, notebook)
        assert lease["first_line"] == "# a first cell"
        job = next(j for j in api.jobs() if j["session"] == lease["id"])
        assert job["notebook"] == notebook and job["first_line"] == "# a first cell"
    finally:
        driver.shutdown()


def test_the_gpu_magic_names_its_notebook(server: ServerProcess, alice: str, tmp_path: Path) -> None:
    notebook = str(tmp_path / "magic notebook.ipynb")
    env = dict(os.environ, RGPU_URL=server.url, RGPU_TOKEN=alice, JPY_SESSION_NAME=notebook,
               RGPU_CONFIG=str(tmp_path / "no-client.json"))
    kernel = LocalKernel(env)
    try:
        assert kernel.run("%load_ext remote_gpu_kernel").reply["status"] == "ok"
        run = kernel.run("%%gpu\nanswer = 42\nprint(answer)")
        assert run.reply["status"] == "ok" and run.stdout == "42\n"
        lease = lease_of(ApiClient(server.url, alice), notebook)
        assert lease["first_line"] == "answer = 42"
    finally:
        kernel.run("%gpu release")
        kernel.close()
