"""The %%gpu magic inside a real local kernel, against the real server."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from servers import ServerProcess
from waiting import wait_for

from kernels import CellRun, LocalKernel, kernel_with_magic
from wheels import tiny_wheel


def info_lines(run: CellRun) -> list[str]:
    """The information lines a cell showed in place (display_data, updated)."""
    return [c["data"].get("text/plain", "") for kind in ("display_data", "update_display_data")
            for c in run.of_type(kind)]


@pytest.fixture(scope="module")
def kernel(server: ServerProcess, alice: str) -> Iterator[LocalKernel]:
    with kernel_with_magic(dict(os.environ, RGPU_URL=server.url, RGPU_TOKEN=alice)) as k:
        yield k


def test_cell_runs_remotely_with_live_output(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu\nimport os, time\nprint('pid', os.getpid(), flush=True)\n"
                     "time.sleep(1)\nprint('done')\n21 * 2")
    assert run.reply["status"] == "ok"
    lines = [(t, msg["content"]["text"]) for t, msg in run.messages
             if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout"]
    first = next(t for t, text in lines if text.startswith("pid"))
    last = next(t for t, text in lines if text == "done\n")
    assert last - first > 0.7  # shown as printed, not at the end
    local_pid = kernel.run("import os; print(os.getpid())").stdout.strip()
    assert f"pid {local_pid}\n" not in run.stdout
    assert any(d["data"].get("text/plain") == "42" for d in run.of_type("display_data"))
    assert any("Remote GPU: leased cpu" in line for line in info_lines(run))
    assert "leased" not in run.stderr, "the lease is information, not an error"


def test_a_version_difference_is_one_line_under_the_lease_and_the_same_versions_none(
        kernel: LocalKernel) -> None:
    from remote_gpu_core.fingerprint import local_fingerprint
    from remote_gpu_kernel.versions import PRETEND_VAR

    theirs = local_fingerprint()["numpy"]  # the worker runs this Python
    kernel.run("%gpu release")
    kernel.run(f"import os\nos.environ[{PRETEND_VAR!r}] = 'numpy=1.26.4'")
    try:
        run = kernel.run("%%gpu\n1")
        assert run.reply["status"] == "ok", run.reply
        (lease,) = [line for line in info_lines(run) if "leased cpu" in line]
        assert lease.splitlines()[1:] == [f"Remote GPU: numpy 1.26.4 here, {theirs} on the GPU server"]
        assert "numpy" not in run.stderr, "information, not an error"
    finally:
        kernel.run(f"del os.environ[{PRETEND_VAR!r}]\n%gpu release")
    run = kernel.run("%%gpu\n1")
    (lease,) = [line for line in info_lines(run) if "leased cpu" in line]
    assert "\n" not in lease and " here, " not in lease


def test_variables_travel_with_i_and_o(kernel: LocalKernel) -> None:
    kernel.run("import numpy as np\nclass Box:\n    def __init__(self, v): self.v = v\n"
               "data = np.arange(10.0)\nbox = Box(3)\nscale = lambda x: x * box.v")
    run = kernel.run("%%gpu -i data,box -i scale -o result,kind\nresult = scale(data)\nkind = type(box).__name__")
    assert run.reply["status"] == "ok", run.reply
    check = kernel.run("print(result.tolist() == (np.arange(10.0) * 3).tolist(), kind)")
    assert check.stdout == "True Box\n"


def test_push_pull_line_magics_and_namespace_between_cells(kernel: LocalKernel) -> None:
    kernel.run("here = {'a': 1}")
    assert kernel.run("%gpu push here").reply["status"] == "ok"
    kernel.run("%%gpu\nthere = dict(here, b=2)")
    kernel.run("%gpu pull there")
    assert kernel.run("print(sorted(there.items()))").stdout == "[('a', 1), ('b', 2)]\n"
    status = kernel.run("%gpu status")
    assert "lease:  cpu" in status.stdout and "alice" in status.stdout


def test_matplotlib_figure_shows_as_an_image(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu\nimport matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.show()")
    assert run.reply["status"] == "ok"
    assert any("image/png" in d["data"] for d in run.of_type("display_data"))


def test_remote_error_shows_the_remote_traceback(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu\ndef remote_fn():\n    return 1 / 0\nremote_fn()")
    assert run.reply["status"] == "error"
    (error,) = run.of_type("error")
    assert error["ename"] == "ZeroDivisionError"
    text = "\n".join(error["traceback"])
    assert "remote_fn" in text and "division by zero" in text
    # Named as the notebook numbers this cell, not as the worker counted its own cells.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert re.findall(r"Cell In\[(\d+)\]", plain) == [str(run.reply["execution_count"])] * 2, plain


def test_missing_input_and_unpicklable_input_fail_clearly(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu -i nope\n1")
    assert run.reply["status"] == "error" and "nope" in run.reply["evalue"]
    kernel.run("gen = (i for i in range(3))")
    run = kernel.run("%%gpu -i gen\n1")
    assert run.reply["ename"] == "SerializationError" and "'gen'" in run.reply["evalue"]


def test_interrupting_the_local_cell_interrupts_the_remote_one(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu\nimport time\nfor i in range(600):\n    time.sleep(0.1)", timeout=30,
                     interrupt_after=1.5)
    assert run.reply["status"] == "error"
    assert run.reply["ename"] == "KeyboardInterrupt"
    after = kernel.run("%%gpu\nprint('alive', i < 599)")
    assert after.stdout == "alive True\n"


def test_a_cell_that_ignores_the_interrupt_says_so_and_the_next_interrupt_restarts_its_worker(
        kernel: LocalKernel) -> None:
    kernel.run("%%gpu\nkept = 1")
    presses: list[float] = []

    def press(msg: dict[str, object]) -> None:
        content = msg["content"]
        assert isinstance(content, dict)
        text = str(content.get("text", ""))
        if ("ignoring" in text and not presses) or ("ignores interrupts" in text and len(presses) == 1):
            presses.append(time.monotonic())
            kernel.km.interrupt_kernel()  # the stop button, twice

    run = kernel.run("%%gpu\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "print('ignoring', flush=True)\ntime.sleep(600)", timeout=60, on_message=press)
    assert len(presses) == 2 and presses[1] - presses[0] >= 2.5
    assert "Interrupt again to restart its worker" in run.stderr  # one line, in the cell
    assert run.reply["ename"] == "WorkerDied" and "interrupted twice" in run.reply["evalue"]
    assert kernel.run("%%gpu\nprint('kept' in globals())").stdout == "False\n"


def test_help_lists_the_options(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu?\n")
    # IPython sends help to the notebook's pager, as a payload of the reply
    text = "".join(p["data"].get("text/plain", "") for p in run.reply.get("payload", []))
    for word in ("--inputs", "--outputs", "--timeout", "%gpu connect", "%gpu pull"):
        assert word in text, text


def test_release_then_next_cell_leases_again(kernel: LocalKernel) -> None:
    kernel.run("%%gpu\nbefore = 1")
    assert "Remote GPU: released the GPU" in kernel.run("%gpu release").stdout
    run = kernel.run("%%gpu\nprint('before' in globals())")
    assert run.stdout == "False\n" and any("leased" in line for line in info_lines(run))


def test_park_gives_the_gpu_back_and_the_next_cell_restores_the_variables(kernel: LocalKernel) -> None:
    kernel.run("%%gpu\nimport numpy as np\nparked_data = np.arange(5.0)\ndef doubled():\n"
               "    return (parked_data * 2).tolist()\nopen_file = open('/dev/null')")
    run = kernel.run("%gpu park")
    assert run.reply["status"] == "ok", run.reply
    assert "Parked session" in run.stdout and "gave cpu" in run.stdout and "open_file" in run.stdout
    assert "lease:  parked" in kernel.run("%gpu status").stdout
    run = kernel.run("%%gpu\nprint(doubled(), 'open_file' in globals())")
    assert run.reply["status"] == "ok", run.reply
    assert run.stdout == "[0.0, 2.0, 4.0, 6.0, 8.0] False\n"
    assert "Restored the session parked" in run.stderr and "open_file" in run.stderr
    assert "not parked" in kernel.run("%gpu resume").stdout
    kernel.run("%gpu park")
    assert "Restored" in kernel.run("%gpu resume").stderr
    assert kernel.run("%%gpu\nprint(doubled()[1])").stdout == "2.0\n"


def test_the_cell_after_a_worker_death_says_so_even_when_it_pushes(kernel: LocalKernel) -> None:
    kernel.run("%%gpu\nkept = 1")
    died = kernel.run("%%gpu\nimport os\nos._exit(3)")
    assert died.reply["status"] == "error" and died.reply["ename"] == "WorkerDied"
    assert "worker process died: exit code 3" in died.reply["evalue"]
    assert died.of_type("error")[0]["traceback"] == [f"WorkerDied: {died.reply['evalue']}"]
    kernel.run("x = 5")
    run = kernel.run("%%gpu -i x\nprint('kept' in globals(), x)")
    assert run.reply["status"] == "ok", run.reply
    assert "restarted" in run.stderr and "exit code 3" in run.stderr
    assert run.stdout == "False 5\n"


def test_a_cell_past_its_timeout_fails(kernel: LocalKernel) -> None:
    run = kernel.run("%%gpu --timeout 1\nimport time\ntime.sleep(30)", timeout=30)
    assert run.reply["status"] == "error" and run.reply["ename"] == "RemoteTimeout", run.reply
    assert kernel.run("%%gpu\nprint('still here')").stdout == "still here\n"


def test_unreachable_server_and_missing_token_are_one_line_errors(server: ServerProcess) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RGPU_URL", "RGPU_TOKEN")}
    env["RGPU_CONFIG"] = "/nonexistent/client.json"
    k = LocalKernel(env)
    try:
        k.run("%load_ext remote_gpu_kernel")
        run = k.run("%%gpu\n1")
        assert run.reply["ename"] == "AuthenticationError"
        (error,) = run.of_type("error")
        assert len(error["traceback"]) == 1 and "RGPU_TOKEN" in error["traceback"][0]
        k.run(f"%gpu connect ws://127.0.0.1:{port} --token rgpu_whatever")
        run = k.run("%%gpu\n1")
        assert run.reply["ename"] == "ConnectionLost"
        (error,) = run.of_type("error")
        assert error["traceback"] == [f"ConnectionLost: {run.reply['evalue']}"]
        assert f"cannot reach the GPU server at ws://127.0.0.1:{port}" in run.reply["evalue"]
        k.run(f"%gpu connect {server.url} --token rgpu_wrong")
        run = k.run("%%gpu\n1")
        assert run.reply["ename"] == "AuthenticationError" and "invalid token" in run.reply["evalue"]
    finally:
        k.close()


def test_a_dropped_connection_reconnects_and_shows_what_was_missed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tcp_proxy import TcpProxy

    server = ServerProcess(tmp_path, "cpu:1", "--grace", "30").start()
    proxy = TcpProxy.for_url(server.url)
    k = LocalKernel(dict(os.environ, RGPU_URL=proxy.url, RGPU_TOKEN=server.token()))
    try:
        k.run("%load_ext remote_gpu_kernel")
        k.run("%%gpu\nkept = 'yes'")
        import threading

        threading.Timer(1.0, proxy.drop).start()
        run = k.run("%%gpu\nimport time\nfor i in range(4):\n    print('line', i, flush=True)\n"
                    "    time.sleep(0.6)")
        assert run.reply["status"] == "error" and run.reply["ename"] == "ConnectionLost"
        assert "reconnects" in run.reply["evalue"]
        after = k.run("%%gpu\nprint(kept)")
        assert any("reconnected to session" in line for line in info_lines(after))
        assert "disconnected" in after.stderr
        assert after.stdout.endswith("yes\n")
        assert "line 3\n" in after.stdout  # printed while the notebook was away
    finally:
        k.close()
        proxy.close()
        server.stop()


def test_upload_and_download_through_the_magic(server: ServerProcess, alice: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "data.txt").write_text("local data")
    k = LocalKernel(dict(os.environ, RGPU_URL=server.url, RGPU_TOKEN=alice), cwd=str(tmp_path))
    try:
        k.run("%load_ext remote_gpu_kernel")
        run = k.run("%gpu upload data.txt")
        assert run.reply["status"] == "ok", run.reply
        assert any("Remote GPU: uploaded data.txt (10 bytes)" in line for line in info_lines(run))
        run = k.run("%%gpu\nopen('made.txt', 'w').write(open('data.txt').read().upper())")
        assert run.reply["status"] == "ok", run.reply
        assert k.run("%gpu download made.txt").reply["status"] == "ok"
        assert (tmp_path / "made.txt").read_text() == "LOCAL DATA"
        missing = k.run("%%gpu\nopen('other.txt')")
        assert "%gpu upload" in missing.of_type("error")[0]["traceback"][-1]
        (tmp_path / "beside.txt").write_text("fetched, not uploaded")
        fetched = k.run("%%gpu\nprint(open('beside.txt').read())")
        assert fetched.stdout == "fetched, not uploaded\n"
        assert "Remote GPU: fetched beside.txt, 21 bytes, from your notebook's folder" in info_lines(fetched)
        (tmp_path / "later.txt").write_text("later")
        assert k.run("%gpu fetch off").stdout == "Remote GPU: remote cells fetch the files they open from nowhere\n"
        off = k.run("%%gpu\nopen('later.txt')")
        assert off.of_type("error")[0]["ename"] == "FileNotFoundError"
        k.run("%gpu fetch on")
        assert k.run("%%gpu\nprint(open('later.txt').read())").stdout == "later\n"
        bad = k.run("%gpu upload nope.txt")
        assert bad.reply["ename"] == "FileTransferError" and "no such file here" in bad.reply["evalue"]
    finally:
        k.close()


def test_pip_install_in_a_gpu_cell_imports_at_once_and_gpu_env_reset_removes_it(
        kernel: LocalKernel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wheel = tiny_wheel(tmp_path, "rgpu_magic_probe", "3.0", "from the magic")
    assert kernel.run(f"%gpu upload {wheel}").reply["status"] == "ok"  # by its name, into the session's folder
    installed = kernel.run(f"%%gpu\n%pip install --no-index {wheel.name}")
    assert "Successfully installed rgpu-magic-probe-3.0" in installed.stdout
    assert "restart" not in installed.stdout and "new release of pip" not in installed.stdout
    assert kernel.run("%%gpu\nimport rgpu_magic_probe\nprint(rgpu_magic_probe.VALUE)").stdout == "from the magic\n"
    assert "rgpu_magic_probe 3.0" in kernel.run("%gpu env show").stdout
    reset = kernel.run("%gpu env reset")
    assert "removed" in reset.stdout and "rgpu_magic_probe 3.0" in reset.stdout
    bad = kernel.run("%gpu env frobnicate")
    assert bad.reply["ename"] == "ValueError" and "%gpu env show|reset" in bad.reply["evalue"]


def test_shutting_down_or_restarting_the_kernel_gives_the_gpu_back_at_once(fresh_server: ServerProcess) -> None:
    """Not after the server's grace period (600 s here): the kernel's exit releases it."""
    fresh_server.args = ["--grace", "600"]
    fresh_server.start()
    released = r"released session \w+ of alice: released by the client"
    k = LocalKernel(dict(os.environ, RGPU_URL=fresh_server.url, RGPU_TOKEN=fresh_server.token("alice")))
    try:
        for _ in ("restart", "shutdown"):
            k.run("%load_ext remote_gpu_kernel")
            assert k.run("%%gpu\nprint('leased')").stdout == "leased\n"
            if _ == "restart":
                k.km.restart_kernel(now=False)
                k.kc.wait_for_ready(timeout=60)
                fresh_server.wait_for_log(released, timeout=15)
        k.close(now=False)
        wait_for(lambda: sum(bool(re.search(released, line)) for line in fresh_server.log) >= 2, 15,
                 "the shut-down kernel to give its GPU back")
    finally:
        if k.km.has_kernel:
            k.close()
