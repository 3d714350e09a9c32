"""A whole notebook on the Remote GPU kernel, executed by nbclient.

nbclient drives the kernel the way a notebook front end does and writes the
outputs into the notebook, applying ``update_display_data`` in place and
recording widget state from the comm traffic, so the assertions read the
notebook as a user would see it. The server is real (CPU slots); the
connection goes through a TCP proxy that one cell's run cuts.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

from remote_kernels import install_kernelspec
from servers import ServerProcess
from tcp_proxy import TcpProxy

#: (source, tags); tags: raises-exception (nbclient's own), interrupt, drop, restart-before.
CELLS: list[tuple[str, list[str]]] = [
    ("import os\nx = 21\nprint('on', os.environ['RGPU_SLOTS'])", []),
    ("x * 2", []),
    ("from IPython.display import display\nh = display('first', display_id=True)\nh.update('second')", []),
    ("def f():\n    return 1 / 0\nf()", ["raises-exception"]),
    ("input('name? ')", ["raises-exception"]),
    ("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()", []),
    ("from tqdm.auto import tqdm\nfor i in tqdm(range(5)):\n    pass", []),
    ("import ipywidgets as w\nw.IntSlider(value=4)", []),
    ("%%local\nlocal_list = [1, 2]", []),
    ("%gpu push local_list\ntotal = sum(local_list)\n%gpu pull total", []),
    ("%%local\ntotal", []),
    ("import time\ntime.sleep(60)", ["raises-exception", "interrupt"]),
    ("print('after the interrupt')", []),
    ("import time\nprint('working', flush=True)\ntime.sleep(3)\nx = 99", ["raises-exception", "drop"]),
    ("x", []),
    ("x", ["raises-exception", "restart-before"]),
    ("print('fresh worker')", []),
]

INTERRUPT_AFTER = 1  # seconds: nbclient's timeout for the interrupt cell, then it interrupts


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[TcpProxy]:
    proxy = TcpProxy.for_url(server.url)
    yield proxy
    proxy.close()


def _text(output: dict[str, Any]) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    return str(output.get("data", {}).get("text/plain", ""))


def _plain(lines: list[str]) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(lines))


def test_a_notebook_runs_on_the_remote_gpu_kernel(
        tmp_path: Path, server: ServerProcess, alice: str, proxy: TcpProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(tmp_path / "prefix")))
    monkeypatch.setenv("RGPU_URL", proxy.url)
    monkeypatch.setenv("RGPU_TOKEN", alice)
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "no-client-config.json"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": tags}) for src, tags in CELLS]

    def timeout_for(cell: Any) -> int:
        return INTERRUPT_AFTER if "interrupt" in cell.metadata.tags else 60

    client = NotebookClient(nb, kernel_name="remote-gpu", timeout_func=timeout_for,
                            interrupt_on_timeout=True, record_timing=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        assert client.kc is not None
        for index, cell in enumerate(nb.cells):
            if "restart-before" in cell.metadata.tags:
                run_sync(client.km.restart_kernel)()
                run_sync(client.kc.wait_for_ready)(timeout=60)
            timer = threading.Timer(1.0, proxy.drop) if "drop" in cell.metadata.tags else None
            if timer is not None:
                timer.start()
            client.execute_cell(cell, index)
            if timer is not None:
                timer.join()
        client.set_widgets_metadata()
    out = [cell.outputs for cell in nb.cells]

    lease = [o for o in out[0] if o["output_type"] == "display_data"]
    assert "Remote GPU: leased cpu" in _text(lease[0])
    assert any(_text(o).startswith("on cpu") for o in out[0])
    assert [_text(o) for o in out[1]] == ["42"] and out[1][0]["execution_count"] == nb.cells[1].execution_count
    assert [_text(o) for o in out[2]] == ["'second'"], "update_display_data did not replace in place"
    (error,) = out[3]
    assert error["output_type"] == "error" and error["ename"] == "ZeroDivisionError"
    assert "return 1 / 0" in _plain(error["traceback"])
    assert out[4][0]["ename"] == "StdinNotImplementedError"  # nbclient answers no input, like with ipykernel
    assert any("image/png" in o.get("data", {}) for o in out[5])

    widget_state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    progress = [s["state"] for s in widget_state.values() if s["model_name"] == "FloatProgressModel"]
    assert progress and progress[0]["value"] == 5 and progress[0]["max"] == 5
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in out[6])
    view = out[7][0]["data"]["application/vnd.jupyter.widget-view+json"]
    assert widget_state[view["model_id"]]["state"]["value"] == 4

    assert [_text(o) for o in out[10]] == ["3"]

    interrupt = nb.cells[11]
    assert interrupt.outputs[-1]["ename"] == "KeyboardInterrupt"
    timing = interrupt.metadata.execution
    from dateutil.parser import isoparse

    took = (isoparse(timing["shell.execute_reply"]) - isoparse(timing["iopub.execute_input"])).total_seconds()
    assert took < INTERRUPT_AFTER + 3, f"the interrupted cell took {took:.1f} s"
    assert _text(out[12][0]) == "after the interrupt\n"

    dropped = [o for o in out[13] if o["output_type"] == "error"][0]
    assert dropped["ename"] == "ConnectionLost"
    assert "next cell reconnects" in dropped["evalue"]
    assert any("reconnected to session" in _text(o) for o in out[14])
    assert [_text(o) for o in out[14] if o["output_type"] == "execute_result"] == ["99"]

    assert out[15][-1]["ename"] == "NameError", "a restarted kernel kept the old namespace"
    assert _text(out[16][-1]) == "fresh worker\n"
    nbformat.validate(nb)
