"""Widgets in a real JupyterLab in headless Chromium, on the GPU server.

Two notebooks run the same cells: one on the Remote GPU kernel, one on a
local Python 3 kernel with ``%%gpu`` cells. In each, an ``IntSlider``
renders and moving it changes the remote value; a ``tqdm.auto`` bar renders
and reaches 100 %; an ``Output`` widget shows what was printed inside it;
``interact`` updates when its slider moves; the lease line is information,
not stderr. Any browser console error fails the test ("Wrong widget
protocol version" was the symptom of dropped comm metadata). Screenshots go
to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab_process import LabProcess
from remote_kernels import install_kernelspec
from servers import ServerProcess
from test_lab_browser import ARTIFACTS, lab_page, notebook, require_browser


CELLS = [
    "import ipywidgets as w\ns = w.IntSlider(value=3, description='speed')\ns",
    "from tqdm.auto import tqdm\nimport time\nfor i in tqdm(range(30)):\n    time.sleep(0.02)",
    "out = w.Output()\ndisplay(out)\nwith out:\n    print('printed inside the widget')",
    "from ipywidgets import interact\n@interact(x=5)\ndef f(x):\n    print('x is', x)",
    "print('value is', s.value)",
    "import os\nos._exit(1)",  # the worker dies: its widgets must say so when touched
]


@pytest.fixture
def lab(fresh_server: ServerProcess, tmp_path: Path) -> Iterator[LabProcess]:
    require_browser()
    fresh_server.slots = "cpu:2"
    fresh_server.start()
    jupyter_path = install_kernelspec(tmp_path / "prefix")
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": fresh_server.url, "RGPU_TOKEN": fresh_server.token("alice"),
                                        "RGPU_CONFIG": str(tmp_path / "no-client.json"),
                                        "JUPYTER_PATH": str(jupyter_path)})
    lab.root.mkdir(parents=True)
    (lab.root / "remote.ipynb").write_text(json.dumps(notebook("remote-gpu", CELLS)))
    magic = ["%load_ext remote_gpu_kernel"] + [f"%%gpu\n{src}" for src in CELLS]
    (lab.root / "magic.ipynb").write_text(json.dumps(notebook("python3", magic)))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
        fresh_server.stop()


def _run_widgetsnotebook(page: Any, lab: LabProcess, name: str, first: int) -> None:
    """Open ``name`` and check the widgets of CELLS, which start at cell ``first``."""
    from playwright.sync_api import expect

    page.goto(lab.url(f"lab/tree/{name}"))
    notebook = page.locator(f'.jp-NotebookPanel:not(.lm-mod-hidden)[data-path="{name}"], '
                            ".jp-NotebookPanel:not(.lm-mod-hidden)").first
    cells = notebook.locator(".jp-Notebook .jp-Cell")
    expect(cells.nth(first + len(CELLS) - 1)).to_be_visible(timeout=60_000)
    expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
    cells.first.locator(".cm-content").click()
    for _ in range(first + len(CELLS) - 2):  # all but the last two: reading the slider, the death
        page.keyboard.press("Shift+Enter")

    def output(index: int) -> Any:
        return cells.nth(first + index).locator(".jp-OutputArea-output")

    # The lease line is information (text/plain), never stderr.
    lease = notebook.locator(".jp-OutputArea-output", has_text="Remote GPU: leased").first
    expect(lease).to_be_visible(timeout=90_000)
    expect(lease).not_to_have_attribute("data-mime-type", "application/vnd.jupyter.stderr")

    slider = output(0).locator(".widget-slider")
    expect(slider).to_be_visible(timeout=60_000)
    expect(output(0).locator(".widget-readout")).to_have_text("3", timeout=30_000)

    bar = output(1).locator(".widget-hprogress")
    expect(bar).to_be_visible(timeout=60_000)
    expect(output(1).locator(".widget-html-content", has_text="100%")).to_be_visible(timeout=60_000)

    inside = output(2).locator(".widget-output", has_text="printed inside the widget")
    expect(inside).to_be_visible(timeout=60_000)

    expect(output(3).locator(".widget-output", has_text="x is 5")).to_be_visible(timeout=60_000)
    output(3).locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    expect(output(3).locator(".widget-output", has_text="x is 6")).to_be_visible(timeout=60_000)

    output(0).locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(output(0).locator(".widget-readout")).to_have_text("5", timeout=30_000)
    cells.nth(first + len(CELLS) - 2).locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    expect(output(len(CELLS) - 2).filter(has_text="value is 5")).to_be_visible(timeout=60_000)

    page.keyboard.press("Shift+Enter")  # the worker dies
    expect(output(len(CELLS) - 1).filter(has_text="WorkerDied")).to_be_visible(timeout=60_000)
    output(0).locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    dead = output(0).locator(".jupyter-widgets-disconnected")
    expect(dead).to_be_visible(timeout=60_000)
    expect(dead.locator("[title]").first).to_have_attribute("title", re.compile("no longer works: .*died"))


@pytest.mark.timeout(420)
def test_widgets_render_and_answer_on_the_kernel_and_through_the_magic(lab: LabProcess) -> None:
    started = time.monotonic()
    with lab_page("widgets", height=1400, full_page=True) as (page, errors):
        for name, first in (("remote.ipynb", 0), ("magic.ipynb", 1)):
            _run_widgetsnotebook(page, lab, name, first)
            page.screenshot(path=str(ARTIFACTS / f"widgets-{name.split('.')[0]}.png"), full_page=True)
            assert not errors, errors
    print(f"widgets browser test: {time.monotonic() - started:.1f} s in the browser")
