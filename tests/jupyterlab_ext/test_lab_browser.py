"""End to end in real headless Chromium: JupyterLab, the sidebar and a GPU server.

A ``%%gpu`` cell leases the server's one CPU slot; the sidebar shows the
slot held by the user and the lease; Release in the sidebar frees it. The
screenshot goes to test-artifacts/ and, with RGPU_UPDATE_SCREENSHOT=1, to the
README's docs/sidebar.png. A server started with ``--no-isolation`` is shown
with a warning that its workers are not isolated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labext import ROOT
from lab_process import LabProcess
from servers import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
README_SHOT = ROOT / "docs" / "sidebar.png"

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "id": "load", "metadata": {}, "outputs": [],
         "source": "%load_ext remote_gpu_kernel"},
        {"cell_type": "code", "execution_count": None, "id": "gpu", "metadata": {}, "outputs": [],
         "source": "%%gpu\nprint(1)"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def _labextension_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"],
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    if "remote-gpu-lab" in text:
        return
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("the sidebar was not built: node and npm are missing "
                    "(apt-get install -y nodejs npm, then pip install -e '.[dev]')")
    raise AssertionError("the sidebar is not installed although node and npm are here: "
                         "run pip install -e '.[dev]' again and read its output\n" + text)


def _open_lab(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[LabProcess, str]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install it with: apt-get install -y chromium")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
    _labextension_installed()
    fresh_server.start()
    token = fresh_server.token("alice")
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": fresh_server.url, "RGPU_TOKEN": token,
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json")})
    lab.root.mkdir(parents=True)
    (lab.root / "gpu.ipynb").write_text(json.dumps(NOTEBOOK))
    lab.start()
    try:
        yield lab, token
    finally:
        lab.stop()
        fresh_server.stop()


@pytest.fixture
def lab(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[LabProcess, str]]:
    yield from _open_lab(fresh_server, tmp_path)


@pytest.fixture
def lab_without_isolation(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[LabProcess, str]]:
    fresh_server.args = ["--no-isolation"]
    yield from _open_lab(fresh_server, tmp_path)


def _browse(proc: LabProcess) -> Iterator[tuple[Any, Any, list[str]]]:
    """``(page, sidebar panel, errors)`` in headless Chromium, the sidebar open."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}"))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(proc.url("lab/tree/gpu.ipynb"))
            page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
            panel = page.locator("#remote-gpu-sidebar")
            expect(panel).to_be_visible()
            yield page, panel, errors
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_sidebar_shows_the_lease_and_releases_it(lab: tuple[LabProcess, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    proc, token = lab
    started = time.monotonic()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}"))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(proc.url("lab/tree/gpu.ipynb"))

            tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]')
            tab.click()
            panel = page.locator("#remote-gpu-sidebar")
            expect(panel).to_be_visible()
            slot = panel.locator('.jp-RemoteGpu-slot[data-slot="cpu0"]')
            expect(slot).to_be_visible()
            expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
            expect(slot.locator(".jp-RemoteGpu-holder")).to_have_text("free")
            expect(panel.locator(".jp-RemoteGpu-url")).to_have_text(proc.env["RGPU_URL"])

            # Run both cells from the keyboard once the kernel is idle.
            expect(page.locator(".jp-Notebook .jp-Cell").nth(1)).to_be_visible()
            expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
            page.locator(".jp-Notebook .jp-Cell").first.locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")
            page.keyboard.press("Shift+Enter")
            output = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea-output")
            expect(output.filter(has_text="1").first).to_be_visible(timeout=90_000)

            lease = panel.locator(".jp-RemoteGpu-lease")
            expect(lease).to_have_count(1, timeout=30_000)
            expect(slot.locator(".jp-RemoteGpu-holder")).to_contain_text("held by you")
            expect(lease.locator(".jp-RemoteGpu-release")).to_be_enabled()
            jobs = panel.locator(".jp-RemoteGpu-job")
            expect(jobs.first).to_be_visible()
            assert token not in page.content(), "the token must never reach the browser"

            shot = ARTIFACTS / "sidebar-lease.png"
            page.screenshot(path=str(shot))
            if os.environ.get("RGPU_UPDATE_SCREENSHOT"):  # refresh the README's picture
                README_SHOT.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, README_SHOT)

            if os.geteuid() == 0:  # a root server isolates its workers: no warning
                expect(panel.locator(".jp-RemoteGpu-isolation")).to_have_count(0)
            lease.locator(".jp-RemoteGpu-release").click()
            expect(lease).to_have_count(0, timeout=30_000)
            expect(slot.locator(".jp-RemoteGpu-holder")).to_have_text("free")
            page.screenshot(path=str(ARTIFACTS / "sidebar-released.png"))
            assert not errors, errors
        except BaseException:
            (ARTIFACTS / "sidebar-failure.txt").write_text("\n".join(errors))
            for each in browser.contexts:
                for open_page in each.pages:
                    open_page.screenshot(path=str(ARTIFACTS / "sidebar-failure.png"))
            raise
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - started:.1f} s in the browser")


@pytest.mark.timeout(300)
def test_sidebar_says_when_workers_are_not_isolated(lab_without_isolation: tuple[LabProcess, str]) -> None:
    from playwright.sync_api import expect

    proc, _ = lab_without_isolation
    ARTIFACTS.mkdir(exist_ok=True)
    for page, panel, errors in _browse(proc):
        try:
            expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
            warning = panel.locator(".jp-RemoteGpu-isolation")
            expect(warning).to_contain_text("Workers are not isolated.")
            expect(warning).to_contain_text("--no-isolation")
            page.screenshot(path=str(ARTIFACTS / "sidebar-not-isolated.png"))
            assert not errors, errors
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "sidebar-not-isolated-failure.png"))
            raise
