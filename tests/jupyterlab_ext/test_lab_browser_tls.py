"""In real headless Chromium: JupyterLab with a GPU server that serves wss://.

The server runs with ``--tls self-signed``. JupyterLab starts without the
server's certificate: the sidebar says the server is not trusted and how to
fix it. After ``rgpu login URL TOKEN --cafile CERT`` (read on the next call,
no restart), Try again shows the server connected, and a ``%%gpu`` cell in
the notebook runs over wss://.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab_process import LabProcess
from remote_gpu_kernel.cli import main
from servers import ServerProcess
from test_lab_browser import ARTIFACTS, NOTEBOOK, lab_page, require_browser, run_first_cells
from tls_certs import self_signed_cert, self_signed_server


@pytest.fixture
def tls_lab(tmp_path: Path) -> Iterator[tuple[LabProcess, ServerProcess, str]]:
    require_browser()
    server = self_signed_server(tmp_path / "server")
    token = server.token("alice")
    config = tmp_path / "client.json"
    config.write_text(json.dumps({"url": server.url, "token": token}))  # no CA file yet
    lab = LabProcess(tmp_path / "lab", {"RGPU_URL": server.url, "RGPU_TOKEN": token,
                                        "RGPU_CA": "", "RGPU_INSECURE": "",
                                        "RGPU_CONFIG": str(config)})
    lab.root.mkdir(parents=True)
    (lab.root / "gpu.ipynb").write_text(json.dumps(NOTEBOOK))
    lab.start()
    try:
        yield lab, server, token
    finally:
        lab.stop()
        server.stop()


@pytest.mark.timeout(300)
def test_sidebar_and_gpu_cell_over_wss(tls_lab: tuple[LabProcess, ServerProcess, str],
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    lab, server, token = tls_lab
    started = time.monotonic()
    with lab_page("sidebar-tls", height=760, console=False) as (page, errors):
        page.goto(lab.url("lab/tree/gpu.ipynb"))
        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="remote-gpu-sidebar"]').click()
        panel = page.locator("#remote-gpu-sidebar")
        expect(panel).to_be_visible()

        # Not trusted yet: the problem and what to do.
        problem = panel.locator(".jp-RemoteGpu-problem")
        expect(problem.locator(".jp-RemoteGpu-problemMessage")).to_contain_text("is not trusted")
        expect(problem.locator(".jp-RemoteGpu-problemMessage")).to_contain_text("self-signed certificate")
        expect(problem.locator(".jp-RemoteGpu-hint")).to_contain_text("RGPU_CA")
        page.screenshot(path=str(ARTIFACTS / "sidebar-tls-untrusted.png"))

        # The user trusts the server's certificate, as the README says.
        monkeypatch.setenv("RGPU_CONFIG", lab.env["RGPU_CONFIG"])
        assert main(["login", server.url, token, "--cafile", str(self_signed_cert(server))]) == 0
        capsys.readouterr()
        # "Try again" reads the new trust at once; the sidebar's own next
        # refresh reads it too, and may come first: then the button is gone.
        try:
            problem.get_by_role("button", name="Try again").click(timeout=15_000)
        except PlaywrightTimeoutError:
            assert not problem.get_by_role("button", name="Try again").is_visible()
        expect(panel.locator(".jp-RemoteGpu-state")).to_have_text("connected")
        slot = panel.locator('.jp-RemoteGpu-slot[data-slot="cpu0"]')
        expect(slot.locator(".jp-RemoteGpu-holder")).to_have_text("free")
        expect(panel.locator(".jp-RemoteGpu-url")).to_have_text(server.url)

        # A %%gpu cell runs over wss:// and the sidebar shows the lease.
        output = run_first_cells(page)
        expect(output.filter(has_text="fitted").first).to_be_visible(timeout=90_000)
        expect(slot.locator(".jp-RemoteGpu-holder")).to_contain_text("held by you", timeout=30_000)
        assert token not in page.content(), "the token must never reach the browser"
        page.screenshot(path=str(ARTIFACTS / "sidebar-tls-connected.png"))
        assert not errors, errors
    print(f"browser test over TLS: {time.monotonic() - started:.1f} s in the browser")
