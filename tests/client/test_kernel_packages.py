"""``%pip install`` through the Remote GPU kernel (jupyter_client), against the
shared real server: the package imports in the next cell, ``%gpu env`` shows
and removes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from servers import ServerProcess
from wheels import tiny_wheel


@pytest.fixture(scope="module")
def kernel(server: ServerProcess, alice: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelDriver]:
    path = install_kernelspec(tmp_path_factory.mktemp("prefix"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))
        driver = KernelDriver(kernel_env(tmp_path_factory.mktemp("kernel"), server.url, alice)).start()
        yield driver
        driver.shutdown()


def test_pip_install_in_the_kernel_imports_at_once_and_gpu_env_reset_removes_it(
        kernel: KernelDriver, tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path, "rgpu_kernel_probe", "2.0", "from the kernel")
    installed = kernel.run(f"%gpu upload {wheel}\n%pip install --no-index {wheel.name}")
    assert installed.status == "ok", installed.reply
    assert "Successfully installed rgpu-kernel-probe-2.0" in installed.stdout
    assert "restart" not in installed.stdout and "new release of pip" not in installed.stdout
    imported = kernel.run("import rgpu_kernel_probe\nrgpu_kernel_probe.VALUE")
    assert imported.status == "ok" and imported.text() == ["'from the kernel'"]
    assert "rgpu_kernel_probe 2.0" in kernel.run("%gpu env show").stdout
    reset = kernel.run("%gpu env reset")
    assert reset.status == "ok" and "removed" in reset.stdout and "rgpu_kernel_probe 2.0" in reset.stdout
    assert "no packages installed" in kernel.run("%gpu env show").stdout
    bad = kernel.run("%gpu env frobnicate")
    assert bad.status == "error" and "takes one of: show, reset" in bad.reply["evalue"]
