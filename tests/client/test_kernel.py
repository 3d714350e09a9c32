"""The Remote GPU kernel, driven through jupyter_client against a real server.

Each kernel is started by kernel name from a kernelspec installed into a
temporary prefix (``JUPYTER_PATH``), with ``RGPU_URL``/``RGPU_TOKEN`` in its
environment, as JupyterLab would start it. Dropped connections are made by
a TCP proxy that the test cuts (see ``tests/tcp_proxy.py``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_kernels import KernelDriver, install_kernelspec, kernel_env
from remote_gpu_kernel.kernel.cells import CellKind, CellSyntaxError, GpuCommand, parse_cell
from remote_gpu_kernel.kernel.history import History
from servers import ServerProcess
from tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = install_kernelspec(tmp_path_factory.mktemp("prefix"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))
        yield path


@pytest.fixture(scope="module")
def kernel(jupyter_path: Path, server: ServerProcess, alice: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelDriver]:
    """One Remote GPU kernel on the shared server, for tests that only run cells."""
    driver = KernelDriver(kernel_env(tmp_path_factory.mktemp("kernel"), server.url, alice)).start()
    yield driver
    driver.shutdown()


# -- cells and history, without a kernel --------------------------------------


def test_parse_cell_kinds_and_commands() -> None:
    assert parse_cell("x = 1\n") == parse_cell("x = 1\n")
    assert parse_cell("x = 1").kind is CellKind.REMOTE and parse_cell("x = 1").body == "x = 1"
    local = parse_cell("# note\n%%local\ny = 2\n")
    assert local.kind is CellKind.LOCAL and local.body == "y = 2\n"
    cell = parse_cell("%gpu push a b\n\nz = a + b\n%gpu pull z\n")
    assert cell.commands == (GpuCommand("push", ("a", "b")),)
    assert cell.body.strip() == "z = a + b"
    assert cell.after == (GpuCommand("pull", ("z",)),)
    only = parse_cell("%gpu status\n")
    assert not only.has_body and only.commands == (GpuCommand("status"),)
    assert parse_cell("%%localx\n").kind is CellKind.REMOTE


@pytest.mark.parametrize("code, message", [
    ("%gpu\n", "usage"),
    ("%gpu frobnicate\n", "unknown command"),
    ("%gpu push\n", "at least one variable name"),
    ("%gpu status now\n", "takes no arguments"),
    ("%gpu pull 1x\n", "not a variable name"),
    ("%%local extra\n", "takes no arguments"),
    ("%gpu env\n", "takes one of: show, reset"),
    ("%gpu env reset now\n", "takes one of: show, reset"),
])
def test_parse_cell_errors_say_how_to_fix(code: str, message: str) -> None:
    with pytest.raises(CellSyntaxError, match=message):
        parse_cell(code)


def test_history_queries() -> None:
    history = History()
    for line, code in enumerate(["a = 1", "b = 2", "a + b", "a = 1"], start=1):
        history.append(line, code)
    assert history.query("tail", n=2) == [(1, 3, "a + b"), (1, 4, "a = 1")]
    assert history.query("range", start=2, stop=4) == [(1, 2, "b = 2"), (1, 3, "a + b")]
    assert history.query("search", pattern="a*", unique=True) == [(1, 3, "a + b"), (1, 4, "a = 1")]
    assert history.query("tail", output=True, n=1) == [(1, 4, ("a = 1", None))]


# -- the kernelspec -----------------------------------------------------------


def test_rgpu_kernel_install_writes_a_kernelspec_jupyter_lists(tmp_path: Path) -> None:
    prefix = tmp_path / "env"
    out = subprocess.run(
        [sys.executable, "-m", "remote_gpu_kernel.cli", "kernel", "install", "--prefix", str(prefix),
         "--url", "ws://gpu.example:8765"],
        check=True, capture_output=True, text=True,
    )
    assert "remote-gpu" in out.stdout
    subprocess.run(
        [sys.executable, "-m", "remote_gpu_kernel.cli", "kernel", "install", "--prefix", str(prefix),
         "--name", "rgpu-big"],
        check=True, capture_output=True, text=True,
    )
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        check=True, capture_output=True, text=True,
        env=kernel_env(tmp_path, None, None) | {"JUPYTER_PATH": str(prefix / "share" / "jupyter")},
    )
    specs = json.loads(listed.stdout)["kernelspecs"]
    spec = specs["remote-gpu"]["spec"]
    assert spec["display_name"] == "Remote GPU"
    assert spec["argv"][1:] == ["-m", "remote_gpu_kernel.kernel", "-f", "{connection_file}"]
    assert spec["env"] == {"RGPU_URL": "ws://gpu.example:8765"}
    assert spec["language"] == "python"
    assert specs["rgpu-big"]["spec"]["display_name"] == "rgpu-big"
    assert not specs["rgpu-big"]["spec"].get("env")


# -- one kernel, many cells ---------------------------------------------------


def test_cells_run_remotely_with_every_output_type(kernel: KernelDriver) -> None:
    first = kernel.run("import os\nx = 41\nprint('hello from', os.environ['RGPU_SLOTS'])")
    assert first.status == "ok"
    assert first.stdout.startswith("hello from cpu")
    (lease,) = [t for t in first.text("display_data") if "Remote GPU: leased cpu" in t]
    assert "\n" not in lease, "the same versions on both ends: nothing more to say"
    count = first.reply["execution_count"]

    result = kernel.run("x + 1")
    assert result.reply["execution_count"] == count + 1
    assert result.of("execute_result")[0]["execution_count"] == count + 1
    assert result.text() == ["42"]

    shown = kernel.run("from IPython.display import display, HTML\n"
                       "h = display(HTML('<b>a</b>'), display_id=True)\nh.update(HTML('<b>b</b>'))\n"
                       "import sys; print('oops', file=sys.stderr)")
    (display,) = shown.of("display_data")
    (update,) = shown.of("update_display_data")
    assert display["data"]["text/html"] == "<b>a</b>" and update["data"]["text/html"] == "<b>b</b>"
    assert display["transient"]["display_id"] == update["transient"]["display_id"]
    assert shown.stderr == "oops\n"
    assert "execute_input" in shown.types and shown.types.count("execute_input") == 1


def test_an_error_cell_shows_the_remote_traceback(kernel: KernelDriver) -> None:
    run = kernel.run("def f():\n    return 1 / 0\nf()")
    assert run.status == "error"
    assert run.reply["ename"] == "ZeroDivisionError"
    (error,) = run.of("error")
    assert error["ename"] == "ZeroDivisionError"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error["traceback"]))
    assert "return 1 / 0" in plain and "ZeroDivisionError" in plain
    assert kernel.run("print('still fine')").stdout == "still fine\n"


def test_matplotlib_figure_comes_back_as_png(kernel: KernelDriver) -> None:
    run = kernel.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert run.status == "ok"
    assert any("image/png" in c["data"] for c in run.of("display_data"))


def test_complete_inspect_is_complete_history_kernel_info(kernel: KernelDriver) -> None:
    kernel.run("remote_only_name = 1")
    complete = kernel.request("complete_request", {"code": "remote_only_n", "cursor_pos": 13}).reply
    assert complete["status"] == "ok" and "remote_only_name" in complete["matches"]
    inspect = kernel.request("inspect_request", {"code": "remote_only_name", "cursor_pos": 5,
                                                 "detail_level": 0}).reply
    assert inspect["found"] and "int" in inspect["data"]["text/plain"]
    incomplete = kernel.request("is_complete_request", {"code": "for i in range(3):"}).reply
    assert incomplete == {"status": "incomplete", "indent": "    "}
    assert kernel.request("is_complete_request", {"code": "x = 1"}).reply["status"] == "complete"
    history = kernel.request("history_request", {"hist_access_type": "tail", "n": 1, "output": False,
                                                 "raw": True}).reply
    assert history["history"][-1][2] == "remote_only_name = 1"
    info = kernel.request("kernel_info_request", {}).reply
    assert info["implementation"] == "remote_gpu_kernel"
    assert info["language_info"]["name"] == "python"
    assert info["language_info"]["version"].count(".") == 2


def test_help_request_shows_the_remote_objects_page(kernel: KernelDriver) -> None:
    kernel.run("def remote_helper(a, b=2):\n    'Adds things remotely.'\n    return a + b")
    (page,) = kernel.run("remote_helper?").reply["payload"]
    assert page["source"] == "page" and "Adds things remotely." in page["data"]["text/plain"]
    (source,) = kernel.run("remote_helper??").reply["payload"]
    assert "Source:" in source["data"]["text/plain"] and "a + b" in source["data"]["text/plain"]
    missing = kernel.run("no_such_thing?")
    assert missing.status == "ok" and missing.stdout == "Object `no_such_thing` not found.\n"


def test_input_and_getpass_prompt_in_the_notebook(kernel: KernelDriver) -> None:
    run = kernel.run("name = input('name? ')\nimport getpass\nsecret = getpass.getpass('pw? ')\n"
                     "print(name.upper(), len(secret))", inputs=["bob", "hunter2"])
    assert run.status == "ok"
    assert run.stdout.endswith("BOB 7\n")
    refused = kernel.run("input('no stdin here: ')")
    assert refused.status == "error" and refused.reply["ename"] == "StdinNotImplementedError"


def test_interrupt_stops_a_remote_sleep_quickly(kernel: KernelDriver) -> None:
    interrupted_at: list[float] = []

    def on_message(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and not interrupted_at:
            interrupted_at.append(time.monotonic())
            kernel.km.interrupt_kernel()  # what JupyterLab's stop button does

    run = kernel.run("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", on_message=on_message)
    elapsed = time.monotonic() - interrupted_at[0]
    assert run.status == "error" and run.reply["ename"] == "KeyboardInterrupt"
    assert elapsed < 3.0, f"the interrupt took {elapsed:.2f} s"
    assert kernel.run("print('alive')").stdout == "alive\n"


def test_a_cell_that_ignores_the_stop_button_says_so_and_a_second_press_restarts_its_worker(
        kernel: KernelDriver) -> None:
    kernel.run("kept = 1")
    presses: list[float] = []

    def on_message(msg: dict[str, Any]) -> None:
        text = str(msg["content"].get("text", ""))
        if ("ignoring" in text and not presses) or ("ignores interrupts" in text and len(presses) == 1):
            presses.append(time.monotonic())
            kernel.km.interrupt_kernel()

    run = kernel.run("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "print('ignoring', flush=True)\ntime.sleep(600)", on_message=on_message)
    assert len(presses) == 2 and presses[1] - presses[0] >= 2.5
    notices = [m["content"]["text"] for m in run.messages if m["msg_type"] == "stream"
               and "ignores interrupts" in m["content"]["text"]]
    assert len(notices) == 1 and notices[0].count("\n") == 1  # one line in the cell
    assert run.status == "error" and run.reply["ename"] == "WorkerDied"
    assert "interrupted twice" in run.reply["evalue"]
    assert kernel.run("print('kept' in globals())").stdout == "False\n"


def test_a_traceback_names_the_cell_as_its_prompt_does_in_a_replaced_worker_too(
        jupyter_path: Path, server: ServerProcess, alice: str, tmp_path: Path) -> None:
    def cells(run: Any) -> list[str]:
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(run.reply["traceback"]))
        return re.findall(r"Cell In\[(\d+)\], line (\d+)", text)

    driver = KernelDriver(kernel_env(tmp_path, server.url, alice)).start()
    try:
        assert driver.run("x = 1").reply["execution_count"] == 1
        assert driver.run("%gpu status").reply["execution_count"] == 2  # no cell of the worker's
        failed = driver.run("1 / 0")
        assert failed.reply["execution_count"] == 3 and cells(failed) == [("3", "1")]
        died = driver.run("import os\nos._exit(1)")
        assert died.reply["ename"] == "WorkerDied"
        again = driver.run("def f():\n    return 1 / 0\nf()")  # in the fresh worker
        assert again.reply["execution_count"] == 5
        assert cells(again) == [("5", "3"), ("5", "2")], again.reply["traceback"]
    finally:
        driver.shutdown()


def test_a_cell_with_a_top_level_await_runs_remotely(kernel: KernelDriver) -> None:
    run = kernel.run("import asyncio\nawait asyncio.sleep(0.01)\nprint('awaited')")
    assert run.status == "ok" and run.stdout == "awaited\n"


def test_what_a_task_prints_after_its_cell_comes_after_the_cells_idle(kernel: KernelDriver) -> None:
    """As with ipykernel, which runs the task once the cell's idle is out; a
    notebook runner has moved on by then (see test_public_notebooks.py)."""
    kc = kernel.client
    for n in range(10):  # the worker's print and the cell's end race to the kernel: ten tries
        msg_id = kc.execute(f"import asyncio\nasync def later():\n    print('after {n}', flush=True)\n"
                            "asyncio.ensure_future(later())")
        seen: list[tuple[str, str]] = []  # what came under this cell, in order
        while ("stream", f"after {n}\n") not in seen:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id:
                content = msg["content"]
                seen.append((msg["msg_type"], content.get("execution_state") or content.get("text") or ""))
        assert seen.index(("status", "idle")) < seen.index(("stream", f"after {n}\n")), (n, seen)
        while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
            pass


def test_interrupt_request_message_also_stops_the_remote_cell(kernel: KernelDriver) -> None:
    """JupyterLab sends interrupt_request on the control channel for interrupt_mode "message"."""
    def on_message(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            kernel.client.control_channel.send(kernel.client.session.msg("interrupt_request", {}))

    run = kernel.run("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", on_message=on_message)
    assert run.reply["ename"] == "KeyboardInterrupt" and run.seconds < 30


def test_local_cells_and_push_pull(kernel: KernelDriver) -> None:
    local = kernel.run("%%local\nimport os\nlocal_value = [1, 2, 3]\nprint(os.getpid() > 0)\nlen(local_value)")
    assert local.status == "ok" and local.stdout == "True\n" and local.text() == ["3"]
    assert kernel.run("local_value").reply["ename"] == "NameError"
    pushed = kernel.run("%gpu push local_value\ndoubled = [v * 2 for v in local_value]\n%gpu pull doubled")
    assert pushed.status == "ok", pushed.messages
    assert kernel.run("%%local\ndoubled").text() == ["[2, 4, 6]"]
    missing = kernel.run("%gpu push not_defined_here")
    assert missing.reply["ename"] == "NameError" and "local namespace" in missing.reply["evalue"]
    failed = kernel.run("%%local\nraise ValueError('local boom')")
    assert failed.reply["ename"] == "ValueError" and failed.of("error")[0]["evalue"] == "local boom"
    usage = kernel.run("%gpu frobnicate")
    assert usage.reply["ename"] == "UsageError"
    status = kernel.run("%gpu status")
    assert "connected" in status.stdout and "cpu" in status.stdout


def test_park_answers_completion_locally_and_the_next_cell_restores(kernel: KernelDriver) -> None:
    kernel.run("import numpy as np\nparked_values = np.arange(4.0)\ndef parked_sum():\n"
               "    return parked_values.sum()")
    run = kernel.run("%gpu park")
    assert run.status == "ok" and "Remote GPU: Parked session" in run.stdout and "gave cpu" in run.stdout
    assert "is parked" in kernel.run("%gpu status").stdout
    complete = kernel.request("complete_request", {"code": "parked_v", "cursor_pos": 8}).reply
    assert complete["status"] == "ok" and "parked_values" not in complete["matches"]  # no GPU taken for a Tab
    run = kernel.run("print(parked_sum())")
    assert run.status == "ok" and run.stdout == "6.0\n"
    assert "Remote GPU: Restored the session parked" in run.stderr
    assert "not parked" in kernel.run("%gpu resume").stdout
    assert "connected" in kernel.run("%gpu status").stdout


def test_widgets_render_and_take_updates_from_the_notebook(kernel: KernelDriver) -> None:
    run = kernel.run("import ipywidgets as w\nseen = []\ns = w.IntSlider(value=3)\n"
                     "s.observe(lambda ch: print('changed to', ch['new']), 'value')\ns")
    assert run.status == "ok"
    opens = [c for c in run.of("comm_open") if c["data"]["state"].get("_model_name") == "IntSliderModel"]
    assert opens and opens[0]["target_name"] == "jupyter.widget"
    model_id = opens[0]["comm_id"]
    view = run.of("execute_result")[0]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == model_id

    msg_id = kernel.send_comm("comm_msg", {"comm_id": model_id, "data": {
        "method": "update", "state": {"value": 7}, "buffer_paths": []}})
    replies = kernel.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "stream" for m in ms))
    assert any(m["content"].get("text") == "changed to 7\n" for m in replies)
    assert kernel.run("s.value").text() == ["7"]

    info = kernel.request("comm_info_request", {"target_name": "jupyter.widget"}).reply
    assert model_id in info["comms"]


def test_tqdm_progress_bar_updates_live(kernel: KernelDriver) -> None:
    run = kernel.run("from tqdm.auto import tqdm\nfor i in tqdm(range(5)):\n    pass")
    assert run.status == "ok"
    models = {c["data"]["state"].get("_model_name") for c in run.of("comm_open")}
    assert "FloatProgressModel" in models
    values = [c["data"]["state"].get("value") for c in run.of("comm_msg")
              if c["data"].get("method") == "update"]
    assert 5 in values
    assert any("application/vnd.jupyter.widget-view+json" in c["data"] for c in run.of("display_data"))


# -- leases, restarts, failures -----------------------------------------------


def test_gpu_is_leased_lazily_and_the_queue_is_shown_in_place(
        jupyter_path: Path, fresh_server: ServerProcess, tmp_path: Path) -> None:
    from remote_gpu_kernel import Client

    fresh_server.start()
    token = fresh_server.token("carol")
    driver = KernelDriver(kernel_env(tmp_path, fresh_server.url, token)).start()
    try:
        driver.run("%%local\n1 + 1")
        assert not any(" leased " in line for line in fresh_server.log), "leased before it was needed"
        holder = Client(fresh_server.url, fresh_server.token("dave")).session()
        msg_id = driver.client.execute("print('ran')")
        queued = driver.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "display_data" for m in ms))
        shown = [m for m in queued if m["msg_type"] == "display_data"][0]["content"]
        assert "number 1 in the queue" in shown["data"]["text/plain"]
        holder.release()
        run = driver.collect(msg_id, 60)
        (update,) = run.of("update_display_data")
        assert update["transient"]["display_id"] == shown["transient"]["display_id"]
        assert "leased cpu0" in update["data"]["text/plain"]
        assert run.stdout == "ran\n"
    finally:
        driver.shutdown()
    fresh_server.wait_for_log("released session .* of carol: released by the client")


def test_restoring_a_parked_session_shows_the_queue_then_what_came_back_in_place(
        jupyter_path: Path, fresh_server: ServerProcess, tmp_path: Path) -> None:
    from remote_gpu_kernel import Client

    fresh_server.start()
    driver = KernelDriver(kernel_env(tmp_path, fresh_server.url, fresh_server.token("carol"))).start()
    try:
        driver.run("kept = 'for later'")
        assert driver.run("%gpu park").status == "ok"
        holder = Client(fresh_server.url, fresh_server.token("dave")).session()
        msg_id = driver.client.execute("print(kept)")
        queued = driver.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "display_data" for m in ms))
        shown = [m for m in queued if m["msg_type"] == "display_data"][0]["content"]
        assert "waiting for a GPU to restore the parked session, number 1" in shown["data"]["text/plain"]
        holder.release()
        run = driver.collect(msg_id, 60)
        (update,) = run.of("update_display_data")
        assert update["transient"]["display_id"] == shown["transient"]["display_id"]
        assert "Restored the session parked" in update["data"]["text/plain"]
        assert run.stdout == "for later\n"
    finally:
        driver.shutdown()


def test_interrupt_while_queued_withdraws_the_request(
        jupyter_path: Path, fresh_server: ServerProcess, tmp_path: Path) -> None:
    from remote_gpu_kernel import Client

    fresh_server.start()
    driver = KernelDriver(kernel_env(tmp_path, fresh_server.url, fresh_server.token("carol"))).start()
    holder = Client(fresh_server.url, fresh_server.token("dave")).session()
    try:
        msg_id = driver.client.execute("print('never')")
        driver.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "display_data" for m in ms))
        driver.km.interrupt_kernel()
        run = driver.collect(msg_id, 10)
        assert run.reply["ename"] == "KeyboardInterrupt" and "waiting for a GPU" in run.reply["evalue"]
        assert "never" not in run.stdout
    finally:
        holder.release()
        driver.shutdown()


def test_restart_gives_a_fresh_worker_and_a_comm_open_without_lease_is_closed(
        jupyter_path: Path, server: ServerProcess, alice: str, tmp_path: Path) -> None:
    driver = KernelDriver(kernel_env(tmp_path, server.url, alice)).start()
    try:
        assert driver.run("kept = 'before'\nimport os\nos.getpid()").status == "ok"
        leases = sum(" leased " in line for line in server.log)
        driver.km.restart_kernel()
        driver.client.wait_for_ready(timeout=60)
        msg_id = driver.send_comm("comm_open", {"comm_id": "c1", "target_name": "jupyter.widget.control",
                                                "data": {}})
        closed = driver.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "comm_close" for m in ms))
        assert closed[-1]["content"]["comm_id"] == "c1"
        assert sum(" leased " in line for line in server.log) == leases, "a comm_open leased a GPU"
        after = driver.run("kept")
        assert after.reply["ename"] == "NameError"
    finally:
        driver.shutdown()


def test_dropped_connection_is_reported_and_the_session_resumes(
        jupyter_path: Path, fresh_server: ServerProcess, tmp_path: Path) -> None:
    fresh_server.args = ["--grace", "4"]
    fresh_server.start()
    proxy = TcpProxy.for_url(fresh_server.url)
    driver = KernelDriver(kernel_env(tmp_path, proxy.url, fresh_server.token("erin"))).start()
    try:
        assert driver.run("x = 41").status == "ok"
        msg_id = driver.client.execute("import time\nprint('working', flush=True)\ntime.sleep(1.5)\n"
                                       "print('finished while away')\nx = 42")
        driver.iopub_for(msg_id, lambda ms: any(m["msg_type"] == "stream" for m in ms))
        assert proxy.drop() == 1
        cut = driver.collect(msg_id, 30)
        assert cut.reply["ename"] == "ConnectionLost"
        assert "next cell reconnects" in cut.reply["evalue"]

        resumed = driver.run("x")
        assert resumed.text() == ["42"], resumed.messages
        assert any("reconnected to session" in t for t in resumed.text("display_data"))
        assert "finished while away" in resumed.stdout  # replayed from the server's journal
        assert "working" not in resumed.stdout  # seen before the drop: not shown twice

        proxy.drop()
        fresh_server.wait_for_log("did not come back within 4 s", timeout=30)
        gone = driver.run("x")
        assert "variables are gone" in gone.stderr
        assert gone.reply["ename"] == "NameError"
    finally:
        driver.shutdown()
        proxy.close()


def test_unreachable_server_and_missing_token_fail_in_the_cell(
        jupyter_path: Path, tmp_path: Path, server: ServerProcess) -> None:
    unreachable = KernelDriver(kernel_env(tmp_path, "ws://127.0.0.1:9", "rgpu_whatever")).start()
    try:
        run = unreachable.run("print(1)")
        assert run.reply["ename"] == "ConnectionLost"
        assert "cannot reach the GPU server at ws://127.0.0.1:9" in run.of("error")[0]["evalue"]
        assert unreachable.run("%%local\n2 * 3").text() == ["6"]
    finally:
        unreachable.shutdown()
    no_token = KernelDriver(kernel_env(tmp_path, server.url, None)).start()
    try:
        run = no_token.run("print(1)")
        assert run.reply["ename"] == "AuthenticationError"
        assert "RGPU_TOKEN" in run.reply["evalue"]
    finally:
        no_token.shutdown()
    bad_token = KernelDriver(kernel_env(tmp_path, server.url, "rgpu_not_a_real_token")).start()
    try:
        run = bad_token.run("print(1)")
        assert run.reply["ename"] == "AuthenticationError"
        assert "refused the token" in run.reply["evalue"]
    finally:
        bad_token.shutdown()


# -- files --------------------------------------------------------------------


def test_gpu_upload_and_download_in_the_kernel(jupyter_path: Path, server: ServerProcess, alice: str,
                                               tmp_path: Path) -> None:
    here = tmp_path / "notebook"
    (here / "images").mkdir(parents=True)
    (here / "images" / "x.png").write_bytes(b"\x89PNG....")
    (here / "images" / ".ipynb_checkpoints").mkdir()  # JupyterLab's copies: never uploaded with a folder
    (here / "images" / ".ipynb_checkpoints" / "notes-checkpoint.ipynb").write_text("{}")
    driver = KernelDriver(kernel_env(tmp_path, server.url, alice)).start(cwd=here)
    try:
        off = driver.run("%gpu fetch off\nopen('images/x.png', 'rb').read()[:4]")
        assert off.stdout == "Remote GPU: remote cells fetch the files they open from nowhere\n"
        assert off.status == "error" and "%gpu upload" in off.reply["traceback"][-1]
        assert driver.run("%gpu fetch maybe").reply["evalue"].startswith("%gpu fetch takes on or off")
        run = driver.run("%gpu upload images\nopen('images/x.png', 'rb').read()[:4]")
        assert run.status == "ok" and run.text() == ["b'\\x89PNG'"]
        assert any("Remote GPU: uploaded images/x.png (8 bytes)" in t
                   for t in run.text("display_data") + run.text("update_display_data"))
        assert driver.run("import os; os.listdir('images')").text() == ["['x.png']"]
        down = driver.run("open('result.txt', 'w').write('done')\n%gpu download result.txt")
        assert down.status == "ok" and (here / "result.txt").read_text() == "done"
        refused = driver.run("%gpu download ../../etc/passwd")
        assert refused.status == "error" and refused.reply["ename"] == "FileTransferError"
        assert "goes up" in refused.reply["evalue"]
        gone = driver.run("%gpu download missing.txt")
        assert gone.reply["ename"] == "FileTransferError"
        assert gone.reply["evalue"] == "no file 'missing.txt' in the session's folder on the GPU server"
        assert gone.reply["traceback"][-1].endswith("FileTransferError\x1b[0m: no file 'missing.txt' in the "
                                                   "session's folder on the GPU server")
        nothing = driver.run("%gpu upload no-such-file.txt")
        assert nothing.reply["ename"] == "FileTransferError" and "no such file here" in nothing.reply["evalue"]
        assert driver.run("print('still usable')").stdout == "still usable\n"
    finally:
        driver.shutdown()

