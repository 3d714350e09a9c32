"""The stop ladder and draining as a JupyterLab user sees them, in real headless Chromium.

A ``%%gpu`` cell ignores SIGINT. The notebook's stop button interrupts it;
a few seconds later the cell says, in one line, that it ignores interrupts
and that stopping again restarts the worker, and the sidebar offers the same
as a **Restart worker** button on the lease. The button stops the cell (it
fails with WorkerDied saying why) and the job shows as cancelled with the
cause. Then a process of the worker that SIGKILL cannot end (frozen by the
cgroup freezer, as a process stuck in a driver would be) keeps its slot
**draining** after Release (its pid shown to admins only), until it is thawed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab_process import LabProcess
from servers import ServerProcess
from test_lab_browser import ARTIFACTS, confirm, lab_page, require_browser

FREEZER = Path("/sys/fs/cgroup/freezer")
STUCK = ("%%gpu\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "print('ignoring interrupts', flush=True)\ntime.sleep(600)")
CHILD = "%%gpu\nimport subprocess\nchild = subprocess.Popen(['sleep', '600'])\nprint('child', child.pid)"


def _cell(source: str, cell_id: str) -> dict[str, object]:
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [],
            "source": source}


NOTEBOOK = {
    "cells": [_cell("%load_ext remote_gpu_kernel", "load"), _cell(STUCK, "stuck"), _cell(CHILD, "child")],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture
def lab(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[LabProcess]:
    require_browser()
    fresh_server.args = ["--term-grace", "1", "--drain-deadline", "0.5"]
    fresh_server.start()
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": fresh_server.url, "RGPU_TOKEN": fresh_server.token("alice"),
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json")})
    lab.root.mkdir(parents=True)
    (lab.root / "ladder.ipynb").write_text(json.dumps(NOTEBOOK))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
        fresh_server.stop()


@pytest.mark.timeout(300)
def test_a_stuck_cell_is_restarted_from_the_sidebar_and_a_stuck_process_drains_its_slot(
        lab: LabProcess) -> None:
    from playwright.sync_api import expect

    freeze = os.geteuid() == 0 and os.access(FREEZER, os.W_OK)
    group = FREEZER / f"rgpu-browser-{os.getpid()}"
    try:
        with lab_page("sidebar-ladder", console=False) as (page, errors):
            page.goto(lab.url("lab/tree/ladder.ipynb"))
            page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
            panel = page.locator("#remote-gpu-sidebar")
            expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
            cells.first.locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")
            page.keyboard.press("Shift+Enter")  # the stuck cell runs
            stuck = cells.nth(1).locator(".jp-OutputArea")
            expect(stuck).to_contain_text("ignoring interrupts", timeout=90_000)

            # The notebook's stop button: the cell ignores it, and says so in one line.
            page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"] jp-button,'
                         '.jp-NotebookPanel-toolbar [data-jp-item-name="interrupt"] button').first.click()
            expect(stuck).to_contain_text("ignores interrupts", timeout=30_000)
            expect(stuck).to_contain_text("Interrupt again to restart its worker")

            # The sidebar offers the restart; it stops the cell.
            lease = panel.locator(".jp-RemoteGpu-lease")
            expect(lease.locator(".jp-RemoteGpu-stuck")).to_contain_text("This cell ignores interrupts.",
                                                                         timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "sidebar-stuck-cell.png"))
            lease.locator(".jp-RemoteGpu-restart").click()
            confirm(page)
            expect(stuck).to_contain_text("WorkerDied", timeout=30_000)
            expect(stuck).to_contain_text("variables are gone")
            job = panel.locator('.jp-RemoteGpu-job[data-state="cancelled"]').first
            expect(job.locator(".jp-RemoteGpu-jobError")).to_contain_text("restarted", timeout=30_000)
            expect(lease.locator(".jp-RemoteGpu-stuck")).to_have_count(0)

            if not freeze:
                pytest.skip("draining needs root and cgroup v1's freezer (a process SIGKILL cannot end)")
            cells.nth(2).locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")  # the third cell: a child process
            child_out = cells.nth(2).locator(".jp-OutputArea")
            expect(child_out).to_contain_text("child ", timeout=60_000)
            pid = int(child_out.inner_text().split("child ")[1].split()[0])
            group.mkdir()
            (group / "cgroup.procs").write_text(str(pid))
            (group / "freezer.state").write_text("FROZEN")
            lease.locator(".jp-RemoteGpu-release").click()
            confirm(page)
            badge = panel.locator(".jp-RemoteGpu-slot .jp-RemoteGpu-badge.jp-mod-draining")
            expect(badge).to_have_text("draining", timeout=30_000)
            # Pids are an admin's to see: alice's sidebar says how many processes hold it.
            expect(badge).to_have_attribute("data-pids", "")
            title = badge.get_attribute("title") or ""
            assert "still hold this slot: a process (" in title and str(pid) not in title
            problem = panel.locator(".jp-RemoteGpu-slot", has=page.locator(".jp-mod-draining"))
            expect(problem.locator(".jp-RemoteGpu-jobError")).to_contain_text(
                "1 process(es) of a stopped worker still hold it")
            expect(problem.locator(".jp-RemoteGpu-holder")).to_have_text("not leased until it is drained")
            page.screenshot(path=str(ARTIFACTS / "sidebar-draining.png"))
            (group / "freezer.state").write_text("THAWED")
            expect(badge).to_have_count(0, timeout=30_000)
            expect(panel.locator(".jp-RemoteGpu-slot .jp-RemoteGpu-badge.jp-mod-ok")).to_have_count(1)
            expect(panel.locator(".jp-RemoteGpu-holder")).to_have_text("free")
            expect(panel.locator(".jp-RemoteGpu-notice.jp-mod-error")).to_have_count(0)  # every press answered
            assert not errors, errors
    finally:
        if group.exists():
            (group / "freezer.state").write_text("THAWED")
            for _ in range(100):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
