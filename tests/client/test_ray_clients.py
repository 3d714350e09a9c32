"""%%gpu and the Remote GPU kernel against a server that is a Ray cluster's head, unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernels import LocalKernel
from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess

pytestmark = pytest.mark.timeout(300)


def test_the_magic_and_the_remote_gpu_kernel_work_against_the_head(
        ray_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = ray_server.token("frank")
    kernel = LocalKernel(dict(os.environ, RGPU_URL=ray_server.url, RGPU_TOKEN=token))
    try:
        assert kernel.run("%load_ext remote_gpu_kernel").reply["status"] == "ok"
        run = kernel.run("%%gpu\nimport os\nprint(os.environ['RGPU_SLOTS'])\n6 * 7")
        assert run.reply["status"] == "ok", run.reply
        assert "/gpu" in run.stdout
        kernel.run("%gpu release")
    finally:
        kernel.close()
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(tmp_path / "prefix")))
    driver = KernelDriver(kernel_env(tmp_path, ray_server.url, token)).start()
    try:
        run = driver.run("import os\nx = os.environ['RGPU_SLOTS']\nx")
        assert run.status == "ok" and "/gpu" in run.text()[0]
    finally:
        driver.shutdown()


