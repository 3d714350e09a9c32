"""A large transfer's progress line as a JupyterLab user sees it, in real headless Chromium.

One JupyterLab, its kernels reaching the shared server across an emulated
160 Mbit/s link (``bench/link.py``, so that 32 MiB take about 1.7 s), opens
two notebooks: on the Remote GPU kernel, ``%gpu push`` of 32 MiB made by a
``%%local`` cell, then ``%gpu pull`` of 32 MiB; on a Python 3 kernel with
the magic, a ``%%gpu -i big -o twice`` cell. A script in the page records
every state of each cell's outputs (after each DOM mutation, as the user
would see it); the test waits until a transfer's cell has shown exactly one
running line (bytes of total, %, rate, time left), and checks that no state
ever showed two running lines, or the same line twice, and that the done
cell shows one final line per transfer ("pushed 32 MiB in 1.7 s, 19 MiB/s")
and nothing else. An ``update_display_data`` rendered as an output of its
own, instead of replacing its ``display_id``'s, would show as a second line.
The values arrive whole: the digests printed at both ends are equal.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab_process import LabProcess
from remote_gpu_kernel.api import http_url
from remote_kernels import install_kernelspec
from servers import ServerProcess, slow_link_url
from test_lab_browser import ARTIFACTS, lab_page, notebook, require_browser


#: The user whose token the lab holds: its own, so that the clean-up releases only its leases.
USER = "progress"
#: A transfer's running line (JavaScript's regex syntax and Python's agree here).
RUNNING = (r"^Remote GPU: (push|pull)ing [\d.]+ (bytes|KiB|MiB) of 32 MiB \(\d+ %\), [\d.]+ "
           r"(bytes|KiB|MiB|GiB)/s, [\d.]+ (s|min \d+ s) left$")
DIGEST = "import hashlib\nimport numpy as np\ndef digest(a):\n    return hashlib.sha256(a.tobytes()).hexdigest()[:16]"
#: 32 MiB of random float64: nothing to compress.
BIG = "np.random.default_rng({seed}).random(4 << 20)"

#: The cells of a notebook on the Remote GPU kernel; MAGIC: of one on a Python 3 kernel with the magic.
REMOTE = [
    DIGEST,  # the lease, out of the way
    f"%%local\n{DIGEST}\nbig = {BIG.format(seed=1)}\nprint('local', digest(big))",
    "%gpu push big",
    "again = big + 1\nprint('remote', digest(big))\nprint('again', digest(again))",
    "%gpu pull again",
    "%%local\nprint('again', digest(again))",
    "%gpu release",
]
MAGIC = [
    "%load_ext remote_gpu_kernel",
    f"%%gpu\n{DIGEST}",  # the lease, out of the way
    f"{DIGEST}\nbig = {BIG.format(seed=2)}\nprint('twice', digest(big * 2))",
    "%%gpu -i big -o twice\ntwice = big * 2",
    "print('twice', digest(twice))",
    "%gpu release",
]

#: Installed in the page once per notebook: ``window.rgpuSeen[name][i]`` lists every
#: distinct state of cell ``i``'s outputs (their texts), one after each DOM mutation.
RECORDER = """([name, notebook]) => {
    window.rgpuSeen = window.rgpuSeen || {};
    const seen = window.rgpuSeen[name] = [];
    const record = () => notebook.querySelectorAll('.jp-Cell').forEach((cell, i) => {
        const texts = [...cell.querySelectorAll('.jp-OutputArea-output')].map(o => o.textContent.trim());
        const states = seen[i] = seen[i] || [];
        const last = states[states.length - 1];
        if (!last || JSON.stringify(last) !== JSON.stringify(texts)) states.push(texts);
    });
    new MutationObserver(record).observe(notebook, {subtree: true, childList: true, characterData: true});
    record();
}"""
#: True once cell ``i`` of notebook ``name`` has shown a running line of ``verb``, or
#: once its cell ``last`` has said that it released the GPU (it is done: too late for one).
SHOWN_RUNNING = """([name, i, last, verb, pattern]) => {
    const running = new RegExp(pattern), cells = window.rgpuSeen[name] || [];
    const shown = (cells[i] || []).some(texts => texts.some(
        text => running.test(text) && text.startsWith(`Remote GPU: ${verb}ing`)));
    return shown || (cells[last] || []).some(texts => texts.some(text => text.includes('released')));
}"""


def _release_leases(server: ServerProcess, token: str) -> None:
    """Release what this test's user still holds (after a failure: a lease whose
    kernel is gone is kept for the server's grace, and the server is shared)."""
    def call(path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(http_url(server.url) + path, method=method,
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    for lease in call("/api/status")["sessions"]:
        if lease["mine"]:
            call(f"/api/sessions/{lease['id']}/release", "POST")


@pytest.fixture
def lab(server: ServerProcess, tmp_path: Path) -> Iterator[LabProcess]:
    """A JupyterLab whose kernels reach the shared server across a 160 Mbit/s link."""
    require_browser()
    token = server.token(USER)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(slow_link_url(server.url))
        stack.callback(_release_leases, server, token)
        lab = LabProcess(tmp_path / "lab", {
            "RGPU_URL": url, "RGPU_TOKEN": token,
            "RGPU_CONFIG": str(tmp_path / "no-client.json"),
            "JUPYTER_PATH": str(install_kernelspec(tmp_path / "prefix"))})
        lab.root.mkdir(parents=True)
        (lab.root / "remote.ipynb").write_text(json.dumps(notebook("remote-gpu", REMOTE)))
        (lab.root / "magic.ipynb").write_text(json.dumps(notebook("python3", MAGIC)))
        stack.callback(lab.stop)
        yield lab.start()


class OpenNotebook:
    """A notebook open in the page, its cells' output states recorded (:data:`RECORDER`)."""

    def __init__(self, page: Any, name: str, count: int) -> None:
        from playwright.sync_api import expect

        self.page, self.name, self.count = page, name, count
        # Its panel, by the id its tab names: it stays this notebook's when another is shown.
        tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=name)
        expect(tab).to_have_attribute("data-id", re.compile(r"."), timeout=60_000)
        panel = page.locator(f"#{tab.get_attribute('data-id')}")
        self.cells = panel.locator(".jp-Notebook .jp-Cell")
        expect(self.cells).to_have_count(count, timeout=60_000)
        expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=90_000)
        page.evaluate(RECORDER, [name, panel.locator(".jp-Notebook").element_handle()])

    def run_all(self) -> None:
        """Run every cell from the keyboard, one after another as the kernel takes them."""
        self.cells.first.locator(".cm-content").click()
        for _ in range(self.count):
            self.page.keyboard.press("Shift+Enter")

    def outputs(self, i: int) -> Any:
        return self.cells.nth(i).locator(".jp-OutputArea-output")

    def texts(self, i: int) -> list[str]:
        return [text.strip() for text in self.outputs(i).all_text_contents()]

    def wait_running(self, i: int, verb: str) -> None:
        """Wait until cell ``i`` has shown a running line of ``verb`` (at whatever
        moment it did: the recorder kept it); fail if the notebook ends without one."""
        self.page.wait_for_function(SHOWN_RUNNING, arg=[self.name, i, self.count - 1, verb, RUNNING],
                                    polling=100, timeout=90_000)
        states = self.states(i)
        assert any(re.match(RUNNING, text) and text.startswith(f"Remote GPU: {verb}ing")
                   for texts in states for text in texts), f"no running line of the {verb} was shown: {states}"

    def states(self, i: int) -> list[list[str]]:
        return list(self.page.evaluate("([name, i]) => window.rgpuSeen[name][i] || []", [self.name, i]))


def _one_line_at_a_time(states: list[list[str]], verbs: list[str]) -> None:
    """Every state of a transfer cell's outputs: the final lines of the transfers
    done so far, in order, then at most one running line of the next; never a
    line twice."""
    for texts in states:
        assert len(texts) == len(set(texts)), f"a line shown twice: {texts}"
        running = [t for t in texts if re.match(RUNNING, t)]
        assert len(running) <= 1, f"more than one running line at once: {texts}"
        finals = texts[:-1] if running else texts
        assert running == texts[len(finals):], f"the running line is not the last: {texts}"
        assert len(finals) <= len(verbs), texts
        for text, verb in zip(finals, verbs):
            assert re.match(rf"^Remote GPU: {verb}ed 32 MiB in [\d.]+ s, [\d.]+ MiB/s$", text), texts
        if running:
            assert running[0].startswith(f"Remote GPU: {verbs[len(finals)]}ing"), texts


def _finished(notebook: OpenNotebook, i: int, verbs: list[str]) -> None:
    """Cell ``i`` is done: one final line per transfer and nothing else, at every moment one line at a time."""
    texts = notebook.texts(i)
    assert len(texts) == len(verbs), f"one line per transfer, nothing else: {texts}"
    _one_line_at_a_time([texts], verbs)
    _one_line_at_a_time(notebook.states(i), verbs)


def _printed(notebook: OpenNotebook, i: int) -> dict[str, list[str]]:
    """What cell ``i`` printed: ``{label: [digests]}`` of its ``label digest`` lines."""
    found: dict[str, list[str]] = {}
    for line in "\n".join(notebook.texts(i)).splitlines():
        label, _, value = line.partition(" ")
        found.setdefault(label, []).append(value)
    return found


@pytest.mark.timeout(300)
def test_a_transfer_shows_one_line_updated_in_place_then_what_it_did(lab: LabProcess) -> None:
    from playwright.sync_api import expect

    started = time.monotonic()
    with lab_page("progress", height=1400) as (page, errors):
        page.goto(lab.url("lab/tree/remote.ipynb"))
        remote = OpenNotebook(page, "remote.ipynb", len(REMOTE))
        remote.run_all()
        # The other notebook runs meanwhile (both kernels' transfers share the link).
        page.locator(".jp-DirListing-item", has_text="magic.ipynb").dblclick()
        magic = OpenNotebook(page, "magic.ipynb", len(MAGIC))
        magic.run_all()

        remote.wait_running(2, "push")
        remote.wait_running(4, "pull")
        magic.wait_running(3, "push")
        magic.wait_running(3, "pull")
        for notebook in (remote, magic):
            released = notebook.outputs(notebook.count - 1).filter(has_text="released")
            expect(released).to_have_count(1, timeout=90_000)
        _finished(remote, 2, ["push"])
        _finished(remote, 4, ["pull"])
        local, there, back = _printed(remote, 1), _printed(remote, 3), _printed(remote, 5)
        assert local["local"] == there["remote"] and len(local["local"][0]) == 16, (local, there)
        assert back["again"] == there["again"], (back, there)
        _finished(magic, 3, ["push", "pull"])
        assert _printed(magic, 2)["twice"] == _printed(magic, 4)["twice"]
        page.screenshot(path=str(ARTIFACTS / "progress-magic.png"))
        assert not errors, errors
    print(f"progress browser test: {time.monotonic() - started:.1f} s in the browser")
