"""A kernelspec per Python environment, in a real JupyterLab in headless Chromium.

``rgpu kernel install --env np1`` puts a "Remote GPU (np1)" card in
JupyterLab's launcher beside the plain one; a notebook on that kernel runs
its cells in the server's np1 environment (numpy 1.26.4, where the server's
own Python has numpy 2), and the sidebar names the session's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab_process import LabProcess
from servers import ServerProcess
from test_lab_browser import ARTIFACTS, lab_page, require_browser

NAME = "np1.ipynb"
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "version", "metadata": {}, "outputs": [],
               "source": "import numpy\nprint('numpy', numpy.__version__)"}],
    "metadata": {"kernelspec": {"name": "remote-gpu-np1", "display_name": "Remote GPU (np1)", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def lab(tmp_path: Path, test_environments: dict[str, Path]) -> Iterator[LabProcess]:
    require_browser()
    server = ServerProcess(tmp_path / "server", "cpu:2", "--no-isolation", f"--env=np1={test_environments['np1']}")
    token = server.token("alice")
    server.start()
    prefix = tmp_path / "prefix"
    for extra in ([], ["--env", "np1"]):
        subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "kernel", "install", "--prefix", str(prefix),
                        *extra], check=True, capture_output=True, timeout=60)
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": server.url, "RGPU_TOKEN": token,
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json"),
                                        "JUPYTER_PATH": str(prefix / "share" / "jupyter")})
    lab.root.mkdir(parents=True)
    (lab.root / NAME).write_text(json.dumps(NOTEBOOK))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
        server.stop()


@pytest.mark.timeout(300)
def test_the_np1_kernel_is_in_the_launcher_runs_in_np1_and_the_sidebar_says_so(lab: LabProcess) -> None:
    from playwright.sync_api import expect

    with lab_page("lab-envs", console=False) as (page, errors):
        page.goto(lab.url("lab/tree"))
        launcher = page.locator(".jp-Launcher")
        expect(launcher.locator(".jp-LauncherCard", has_text="Remote GPU (np1)").first).to_be_visible()
        expect(launcher.locator(".jp-LauncherCard-label", has_text="Remote GPU").first).to_be_visible()

        page.goto(lab.url(f"lab/tree/{NAME}"))
        expect(page.locator(".jp-StatusBar-Widget", has_text="Remote GPU (np1) | Idle")).to_be_visible(
            timeout=90_000)
        cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
        cells.first.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        expect(cells.first.locator(".jp-OutputArea-output", has_text="numpy 1.26.4")).to_be_visible(
            timeout=90_000)

        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
        lease = page.locator("#remote-gpu-sidebar .jp-RemoteGpu-lease")
        expect(lease).to_have_count(1, timeout=60_000)
        expect(lease.locator(".jp-RemoteGpu-fact", has_text="env np1")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "lab-envs.png"))
