"""The sidebar as a new user meets it, in real headless Chromium.

A server of CPU slots is titled "CPU slots", not "GPUs"; "Your jobs" counts
all 25 of the user's jobs though it lists the latest eight. The sidebar polls
only every ten minutes here (``remoteGpuRefreshInterval`` in the page config),
so the lease that a ``%%gpu`` cell takes can show only because the sidebar
refreshes as a kernel starts and stops running. A notebook named
``Untitled12.ipynb`` keeps ``12.ipynb`` in view in a narrow sidebar. Release
asks first (Cancel keeps the lease), and the notebook's next cell says the
session was released from the sidebar, not "by root through the HTTP API".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab_process import LabProcess
from remote_gpu_kernel import Client
from servers import ServerProcess
from test_lab_browser import ARTIFACTS, lab_page, require_browser, run_first_cells

NAME = "Untitled12.ipynb"
#: Jobs the user has before JupyterLab opens: more than the sidebar lists.
EARLIER_JOBS = 25


def _cell(source: str, cell_id: str) -> dict[str, object]:
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [],
            "source": source}


NOTEBOOK = {
    "cells": [_cell("%load_ext remote_gpu_kernel", "load"), _cell("%%gpu\n# keep this\nkept = 41", "keep"),
              _cell("%%gpu\nprint(kept + 1)", "after")],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def lab(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[LabProcess]:
    require_browser()
    fresh_server.slots = "cpu:2"
    fresh_server.start()
    token = fresh_server.token("alice")
    with Client(fresh_server.url, token).session() as session:
        for n in range(EARLIER_JOBS):
            assert session.execute(f"n = {n}", on_output=lambda _: None).ok
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": fresh_server.url, "RGPU_TOKEN": token,
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json")})
    page_config = lab.tmp / "config" / "labconfig" / "page_config.json"  # JUPYTER_CONFIG_DIR's
    page_config.parent.mkdir(parents=True)
    page_config.write_text(json.dumps({"remoteGpuRefreshInterval": 600_000}))
    lab.root.mkdir(parents=True)
    (lab.root / NAME).write_text(json.dumps(NOTEBOOK))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
        fresh_server.stop()


@pytest.mark.timeout(300)
def test_the_sidebar_counts_names_follows_and_asks_before_it_releases(lab: LabProcess) -> None:
    from playwright.sync_api import expect

    with lab_page("sidebar-first-hour") as (page, errors):
        page.goto(lab.url(f"lab/tree/{NAME}"))
        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
        panel = page.locator("#remote-gpu-sidebar")
        expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
        expect(panel.locator(".jp-RemoteGpu-sectionTitle").first).to_have_text("CPU slots 2")
        jobs = panel.locator('section[aria-label="Your jobs"]')
        expect(jobs.locator(".jp-RemoteGpu-count")).to_have_text(str(EARLIER_JOBS))
        expect(jobs.locator(".jp-RemoteGpu-job")).to_have_count(8)
        expect(jobs.locator(".jp-RemoteGpu-more")).to_have_text(
            f"The latest 8 of {EARLIER_JOBS}; rgpu jobs lists more.")

        # A cell leases a GPU: the sidebar shows it without waiting for its ten-minute poll.
        cells = page.locator(".jp-Notebook .jp-Cell")
        run_first_cells(page)
        lease = panel.locator(".jp-RemoteGpu-lease")
        expect(lease).to_have_count(1, timeout=60_000)
        expect(jobs.locator(".jp-RemoteGpu-count")).to_have_text(str(EARLIER_JOBS + 1), timeout=60_000)

        # The notebook's name keeps its end in view where the row is narrow.
        name = lease.locator(".jp-RemoteGpu-notebook")
        expect(name).to_have_text(NAME)
        expect(name).to_have_attribute("title", str(lab.root / NAME))
        cut = lease.locator(".jp-RemoteGpu-row").first.evaluate(
            """row => {
                row.style.width = '150px';
                const head = row.querySelector('.jp-RemoteGpu-notebook .jp-RemoteGpu-middleHead');
                const tail = row.querySelector('.jp-RemoteGpu-notebook .jp-RemoteGpu-middleTail');
                const box = row.getBoundingClientRect(), end = tail.getBoundingClientRect();
                const result = {cut: head.scrollWidth > head.clientWidth, tail: tail.textContent,
                                tailInside: end.right <= box.right + 0.5 && end.width > 0};
                row.style.width = '';
                return result;
            }""")
        assert cut == {"cut": True, "tail": "12.ipynb", "tailInside": True}, cut

        # Release asks first; Cancel keeps the lease and its variables.
        dialog = page.locator(".jp-Dialog")
        lease.locator(".jp-RemoteGpu-release").click()
        expect(dialog).to_contain_text(f"Release the GPU of {NAME}?")
        expect(dialog).to_contain_text("the variables on the GPU are lost")
        page.screenshot(path=str(ARTIFACTS / "sidebar-release-asks.png"))
        dialog.locator(".jp-Dialog-button.jp-mod-reject").click()
        expect(dialog).to_have_count(0)
        expect(lease).to_have_count(1)
        expect(panel.locator(".jp-RemoteGpu-slot.jp-mod-mine")).to_have_count(1)
        lease.locator(".jp-RemoteGpu-release").click()
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        expect(lease).to_have_count(0, timeout=30_000)

        # The notebook's next cell says where the release came from.
        cells.nth(2).locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        output = cells.nth(2).locator(".jp-OutputArea")
        expect(output).to_contain_text("NameError", timeout=90_000)
        expect(output).to_contain_text(
            "The GPU session was released (released from the Remote GPU sidebar)")
        assert "HTTP API" not in output.inner_text()
        assert not errors, errors
