"""End to end in real headless Chromium: JupyterLab, the sidebar and a GPU server.

A ``%%gpu`` cell leases one of the server's two CPU slots and keeps it busy
for six seconds; the sidebar shows the server's URL whole or cut in the
middle, the slot held by the user from this notebook, its memory against the
worker's share, a plot of its recent utilization, and the lease and the job
named by the notebook and the cell's first line; Release in the sidebar
frees the slot. The screenshot goes to test-artifacts/ and, with
RGPU_UPDATE_SCREENSHOT=1, to the README's docs/sidebar.png. A server started
with ``--no-isolation`` is shown with a warning that its workers are not isolated.
A session parked with ``%gpu park`` shows in the sidebar's Parked section,
holding no slot, until the next cell restores it; Release there deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

FIRST_LINE = "# fit the model: six seconds of CPU work"
FIT = f"%%gpu\n{FIRST_LINE}\nimport time\nstart = time.time()\nwhile time.time() - start < 6:\n    pass\nprint('fitted')"

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "id": "load", "metadata": {}, "outputs": [],
         "source": "%load_ext remote_gpu_kernel"},
        {"cell_type": "code", "execution_count": None, "id": "gpu", "metadata": {}, "outputs": [],
         "source": FIT},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def require_browser() -> None:
    """Skip where Chromium or Playwright is missing; fail where the sidebar should be built but is not."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install it with: apt-get install -y chromium")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
    _labextension_installed()


def save_failure(browser: Any, errors: list[str], name: str, full_page: bool = False) -> None:
    """Keep what a failed browser test saw under ARTIFACTS: its errors and its pages."""
    (ARTIFACTS / f"{name}-failure.txt").write_text("\n".join(errors))
    for each in browser.contexts:
        for open_page in each.pages:
            open_page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=full_page)


@contextlib.contextmanager
def lab_page(failure: str | None = None, height: int = 860, console: bool = True,
             full_page: bool = False) -> Iterator[tuple[Any, list[str]]]:
    """``(page, errors)``: a page of headless Chromium (60 s per action) whose uncaught
    errors, and with ``console`` its console's errors, collect in ``errors``. A failure
    inside keeps what the browser saw as ``failure`` (:func:`save_failure`); the browser
    closes after."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        errors: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.set_default_timeout(60_000)
            page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}"))
            if console:
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page, errors
        except BaseException:
            if failure is not None:
                save_failure(browser, errors, failure, full_page)
            raise
        finally:
            browser.close()


def run_first_cells(page: Any) -> Any:
    """Run the notebook's first two cells from the keyboard once its kernel is idle;
    the second cell's outputs (a locator)."""
    from playwright.sync_api import expect

    cells = page.locator(".jp-Notebook .jp-Cell")
    expect(cells.nth(1)).to_be_visible()
    expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
    cells.first.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    return cells.nth(1).locator(".jp-OutputArea-output")


def notebook(kernel: str, cells: list[str]) -> dict[str, Any]:
    """A notebook of code ``cells`` whose kernel is ``kernel`` (``remote-gpu`` or ``python3``)."""
    names = {"remote-gpu": "Remote GPU", "python3": "Python 3 (ipykernel)"}
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
                   "outputs": [], "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"name": kernel, "display_name": names[kernel], "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def confirm(page: Any) -> None:
    """Press the warning button of the dialog a sidebar press opened (Release, Restart worker)."""
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()


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


#: Park a session, then restore it with the next cell.
PARK_NOTEBOOK = dict(NOTEBOOK, cells=[
    NOTEBOOK["cells"][0],  # type: ignore[index]
    *({"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
       "source": source}
      for i, source in enumerate(["%%gpu\n# keep this for later\nkept = 41\nparked_file = open('/dev/null')",
                                  "%gpu park", "%%gpu\nprint('restored', kept + 1)", "%gpu park"])),
])


def _open_lab(fresh_server: ServerProcess, tmp_path: Path,
              notebook: dict[str, Any] = NOTEBOOK) -> Iterator[tuple[LabProcess, str]]:
    require_browser()
    fresh_server.slots = "cpu:2"  # one to lease, one to stay free
    fresh_server.start()
    token = fresh_server.token("alice")
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": fresh_server.url, "RGPU_TOKEN": token,
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json")})
    lab.root.mkdir(parents=True)
    (lab.root / "gpu.ipynb").write_text(json.dumps(notebook))
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
def lab_to_park(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[LabProcess, str]]:
    yield from _open_lab(fresh_server, tmp_path, PARK_NOTEBOOK)


@pytest.fixture
def lab_without_isolation(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[LabProcess, str]]:
    fresh_server.args = ["--no-isolation"]
    yield from _open_lab(fresh_server, tmp_path)


def _browse(proc: LabProcess) -> Iterator[tuple[Any, Any, list[str]]]:
    """``(page, sidebar panel, errors)`` in headless Chromium, the sidebar open."""
    from playwright.sync_api import expect

    with lab_page(height=760) as (page, errors):
        page.goto(proc.url("lab/tree/gpu.ipynb"))
        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
        panel = page.locator("#remote-gpu-sidebar")
        expect(panel).to_be_visible()
        yield page, panel, errors


@pytest.mark.timeout(300)
def test_sidebar_shows_the_lease_and_releases_it(lab: tuple[LabProcess, str]) -> None:
    from playwright.sync_api import expect

    proc, token = lab
    started = time.monotonic()
    with lab_page("sidebar") as (page, errors):
        page.goto(proc.url("lab/tree/gpu.ipynb"))

        tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]')
        tab.click()
        panel = page.locator("#remote-gpu-sidebar")
        expect(panel).to_be_visible()
        slots = panel.locator(".jp-RemoteGpu-slot")
        expect(slots).to_have_count(2)
        expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
        expect(slots.locator(".jp-RemoteGpu-holder")).to_have_text(["free", "free"])

        # The URL: whole on hover; its end (the port) always in view.
        server_url = proc.env["RGPU_URL"]
        url = panel.locator(".jp-RemoteGpu-url")
        expect(url).to_have_text(server_url)
        expect(url).to_have_attribute("title", server_url)
        tail = url.locator(".jp-RemoteGpu-middleTail")
        assert server_url.endswith(tail.inner_text())
        assert tail.inner_text().endswith(server_url.rsplit(":", 1)[1])
        panel_box, tail_box = panel.bounding_box(), tail.bounding_box()
        assert panel_box and tail_box
        assert tail_box["x"] + tail_box["width"] <= panel_box["x"] + panel_box["width"]
        # Where the row is too narrow, the head is cut (with an ellipsis) and the tail stays.
        cut = page.locator(".jp-RemoteGpu-urlRow").evaluate(
            """row => {
                row.style.width = '120px';
                const head = row.querySelector('.jp-RemoteGpu-middleHead');
                const tail = row.querySelector('.jp-RemoteGpu-middleTail').getBoundingClientRect();
                const box = row.getBoundingClientRect();
                const result = {cut: head.scrollWidth > head.clientWidth,
                                ellipsis: getComputedStyle(head).textOverflow,
                                tailInside: tail.right <= box.right + 0.5 && tail.width > 0};
                row.style.width = '';
                return result;
            }""")
        assert cut == {"cut": True, "ellipsis": "ellipsis", "tailInside": True}, cut

        # A CPU slot's memory is its worker's, against its share of the host.
        memory = slots.first.locator('.jp-RemoteGpu-meter[data-label="Mem"]')
        expect(memory).to_have_attribute("title", re.compile(r"the worker uses .* of its share, "
                                                             r".* shared by 2 CPU slots"))

        output = run_first_cells(page)
        expect(output.filter(has_text="fitted").first).to_be_visible(timeout=90_000)

        # The lease and the job say which notebook and which cell.
        notebook_path = str(proc.root / "gpu.ipynb")
        lease = panel.locator(".jp-RemoteGpu-lease")
        expect(lease).to_have_count(1, timeout=30_000)
        expect(lease.locator(".jp-RemoteGpu-notebook")).to_have_text("gpu.ipynb")
        expect(lease.locator(".jp-RemoteGpu-notebook")).to_have_attribute("title", notebook_path)
        expect(lease.locator(".jp-RemoteGpu-firstLine")).to_have_text(FIRST_LINE)
        expect(lease.locator(".jp-RemoteGpu-release")).to_be_enabled()
        job = panel.locator(".jp-RemoteGpu-job").first
        expect(job.locator(".jp-RemoteGpu-notebook")).to_have_text("gpu.ipynb")
        expect(job.locator(".jp-RemoteGpu-firstLine")).to_have_text(FIRST_LINE)
        expect(job).to_have_attribute("data-state", "completed")
        slot = panel.locator(".jp-RemoteGpu-slot.jp-mod-mine")
        expect(slot.locator(".jp-RemoteGpu-holder")).to_contain_text("held by you (gpu.ipynb)")

        # The slot's plot shows the busy seconds once a reading has seen them.
        plot = slot.locator(".jp-RemoteGpu-sparkBox")
        expect(plot).to_have_attribute("title", re.compile(r"utilization peaked at ([2-9]\d|\d{3,})%"),
                                       timeout=30_000)
        points = int(slot.locator(".jp-RemoteGpu-spark").get_attribute("data-points") or 0)
        assert points >= 2
        assert "L" in (slot.locator(".jp-RemoteGpu-sparkUtil").get_attribute("d") or "")
        assert token not in page.content(), "the token must never reach the browser"

        shot = ARTIFACTS / "sidebar-lease.png"
        page.screenshot(path=str(shot))
        if os.environ.get("RGPU_UPDATE_SCREENSHOT"):  # refresh the README's picture
            README_SHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, README_SHOT)

        if os.geteuid() == 0:  # a root server isolates its workers: no warning
            expect(panel.locator(".jp-RemoteGpu-isolation")).to_have_count(0)
        lease.locator(".jp-RemoteGpu-release").click()
        confirm(page)
        expect(lease).to_have_count(0, timeout=30_000)
        expect(slots.locator(".jp-RemoteGpu-holder")).to_have_text(["free", "free"])
        page.screenshot(path=str(ARTIFACTS / "sidebar-released.png"))
        assert not errors, errors
    print(f"browser test: {time.monotonic() - started:.1f} s in the browser")


@pytest.mark.timeout(300)
def test_sidebar_says_when_workers_are_not_isolated(lab_without_isolation: tuple[LabProcess, str]) -> None:
    from playwright.sync_api import expect

    proc, _ = lab_without_isolation
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


@pytest.mark.timeout(300)
def test_sidebar_shows_a_parked_session_until_the_next_cell_restores_it(
        lab_to_park: tuple[LabProcess, str]) -> None:
    from playwright.sync_api import expect

    proc, _ = lab_to_park
    for page, panel, errors in _browse(proc):
        try:
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells.nth(4)).to_be_visible()
            expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
            cells.first.locator(".cm-content").click()
            for _ in range(3):  # load, keep, park
                page.keyboard.press("Shift+Enter")
            expect(cells.nth(2).locator(".jp-OutputArea-output")).to_contain_text("Parked session",
                                                                                 timeout=90_000)
            expect(cells.nth(2).locator(".jp-OutputArea-output")).to_contain_text("parked_file")

            parked = panel.locator(".jp-RemoteGpu-parked")
            expect(parked).to_have_count(1, timeout=30_000)
            expect(parked.locator(".jp-RemoteGpu-badge")).to_have_text("parked")
            expect(parked.locator(".jp-RemoteGpu-notebook")).to_have_text("gpu.ipynb")
            expect(parked.locator(".jp-RemoteGpu-firstLine")).to_have_text("# keep this for later")
            expect(parked.locator(".jp-RemoteGpu-sub").first).to_contain_text("1 slot of default")
            expect(parked.locator(".jp-RemoteGpu-unsaved")).to_have_text("Not saved: parked_file")
            expect(panel.locator(".jp-RemoteGpu-slot .jp-RemoteGpu-holder")).to_have_text(["free", "free"])
            expect(panel.locator(".jp-RemoteGpu-lease")).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "sidebar-parked.png"))

            page.keyboard.press("Shift+Enter")  # the next cell restores it
            output = cells.nth(3).locator(".jp-OutputArea-output")
            expect(output.filter(has_text="restored 42").first).to_be_visible(timeout=90_000)
            expect(output.filter(has_text="Restored the session parked").first).to_be_visible()
            expect(parked).to_have_count(0, timeout=30_000)
            expect(panel.locator(".jp-RemoteGpu-lease")).to_have_count(1)

            page.keyboard.press("Shift+Enter")  # park it again, and release it from the sidebar
            expect(parked).to_have_count(1, timeout=60_000)
            parked.locator(".jp-RemoteGpu-release").click()
            expect(page.locator(".jp-Dialog")).to_contain_text("Delete the parked session of gpu.ipynb?")
            confirm(page)
            expect(parked).to_have_count(0, timeout=30_000)
            assert not errors, errors
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "sidebar-parked-failure.png"))
            raise
