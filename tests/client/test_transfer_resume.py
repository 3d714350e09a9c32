"""A push cut in the middle by a dropped connection resumes from what arrived, not from zero.

A real server behind :class:`~tcp_proxy.TcpProxy`; the proxy cuts the link
(both sockets shut, as a network failure would) once half of a large
random array has crossed it. The client reconnects to its session
(``resume=``; the magic does at its next cell) and pushes the same value again: it asks the worker what it
holds (:class:`~m.Holding`) and sends only the rest, counted by the proxy;
the value that lands is the one pushed (a checksum computed in the worker).

``RGPU_TEST_RESUME_SIZE`` (a size, like ``1G``) sets the array's size;
256 MiB by default, which shows the same as 1 GiB in a quarter of the time
on a shared machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from remote_gpu_core.errors import ConnectionLost
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.sizes import parse_size
from remote_gpu_kernel import AsyncClient, Client
from remote_gpu_kernel.progress import TransferProgress, finished_text
from kernels import LocalKernel
from servers import ServerProcess
from tcp_proxy import TcpProxy
from waiting import wait_for

SIZE = parse_size(os.environ.get("RGPU_TEST_RESUME_SIZE") or "256M") or 256 << 20
#: Bytes that may cross twice: those in flight when the link was cut (socket
#: buffers, the server's window ahead of its worker), and the requests' own.
IN_FLIGHT = 64 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("resume"), "cpu:1", "--grace", "120").start()
    yield proc
    proc.stop()


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[TcpProxy]:
    link = TcpProxy.for_url(server.url)
    yield link
    link.close()


def stdout_of(session: Any, code: str) -> str:
    out: list[str] = []

    def keep(msg: m.Output) -> None:
        if msg.msg_type == "stream":
            out.append(msg.content["text"])

    result = session.execute(code, keep)
    assert result.ok, result.error
    return "".join(out)


def cut_when(proxy: TcpProxy, crossed: int, down: bool = False) -> threading.Thread:
    """Cut the link once ``crossed`` more bytes went up it (``down``: came down
    it), as they go, not after a time."""
    def count() -> int:
        return proxy.down if down else proxy.up

    start = count()

    def cut() -> None:
        wait_for(lambda: count() - start >= crossed, timeout=120, what="half of the transfer to cross")
        proxy.drop()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def test_a_push_cut_in_the_middle_resumes_from_what_arrived(server: ServerProcess, proxy: TcpProxy) -> None:
    token = server.token("resumer")
    client = Client(proxy.url, token)
    value = np.random.default_rng(19).integers(0, 256, SIZE, dtype=np.uint8)
    checksum = hashlib.sha256(value).hexdigest()
    first = client.session()
    cut: list[TransferProgress] = []
    first.on_progress = cut.append
    try:
        cutter = cut_when(proxy, SIZE // 2)
        with pytest.raises(ConnectionLost):
            first.push(value=value)
        cutter.join()
    finally:
        first.close()
    # Its last word is where it stopped, once (a line shown for it does not stay "running").
    assert [e.stopped for e in cut] == [False] * (len(cut) - 1) + [True], cut
    assert 0 < cut[-1].done <= cut[-1].total and not cut[-1].finished, cut[-1]
    again = client.session(resume=first.id)
    events: list[TransferProgress] = []
    again.on_progress = events.append
    try:
        assert again.resumed
        before = proxy.up
        again.push(value=value)
        resent = proxy.up - before
        assert resent <= SIZE - SIZE // 2 + IN_FLIGHT, f"{resent} bytes sent again of {SIZE}: not resumed"
        # Its progress counts the whole value, what had arrived before as done (not in its rate).
        last = events[-1]
        assert last.finished and last.total >= SIZE and last.total - last.had <= resent, last
        assert "of it had arrived before)" in finished_text(last)
        assert stdout_of(again, "import hashlib\nprint(hashlib.sha256(value).hexdigest())") == checksum + "\n"
        assert again.transfer_counts.wire_pushed <= SIZE - SIZE // 2 + IN_FLIGHT  # its own count agrees
    finally:
        again.release()


def test_a_push_cut_in_the_middle_says_where_it_stopped_on_the_async_session(server: ServerProcess,
                                                                            proxy: TcpProxy) -> None:
    # The Remote GPU kernel's way (no blocking client in between): the session itself says it.
    token = server.token("resumer")
    value = np.random.default_rng(29).integers(0, 256, 64 << 20, dtype=np.uint8)
    events: list[TransferProgress] = []

    async def run() -> None:
        session = await AsyncClient(proxy.url, token).session()
        session.on_progress = events.append
        try:
            cutter = cut_when(proxy, 32 << 20)
            with pytest.raises(ConnectionLost):
                await session.push(value=value)
            cutter.join()
        finally:
            await session.close()
        async with AsyncClient(proxy.url, token).session(resume=session.id):
            pass  # released: the module's server has one slot

    asyncio.run(run())
    assert events and [e.stopped for e in events] == [False] * (len(events) - 1) + [True], events
    # (all its bytes may have left: the answer that says they arrived did not come)
    assert 0 < events[-1].done <= events[-1].total and not events[-1].finished, events[-1]


def test_a_pull_cut_in_the_middle_resumes_from_what_arrived(server: ServerProcess, proxy: TcpProxy) -> None:
    client = Client(proxy.url, server.token("puller"))
    first = client.session()
    first.on_progress = None
    try:
        made = stdout_of(first, f"import hashlib, numpy as np\nmade = np.random.default_rng(23).integers("
                                f"0, 256, {SIZE}, dtype=np.uint8)\nprint(hashlib.sha256(made).hexdigest())")
        cutter = cut_when(proxy, SIZE // 2, down=True)
        with pytest.raises(ConnectionLost):
            first.pull("made")
        cutter.join()
    finally:
        first.close()
    again = client.session(resume=first.id)
    try:
        before = proxy.down
        value = again.pull("made")["made"]
        resent = proxy.down - before
        assert resent <= SIZE - SIZE // 2 + IN_FLIGHT, f"{resent} bytes sent again of {SIZE}: not resumed"
        assert hashlib.sha256(value).hexdigest() + "\n" == made
        value[:] = 0  # the value is the caller's own memory
        assert hashlib.sha256(again.pull("made")["made"]).hexdigest() + "\n" == made
    finally:
        again.release()


def test_a_buffer_the_worker_no_longer_has_is_sent_whole(server: ServerProcess, proxy: TcpProxy) -> None:
    """A reconnect with nothing kept (another value than the one cut) sends the
    value whole, once; and one pushed whole before the cut is not sent again."""
    token = server.token("resumer2")
    client = Client(proxy.url, token)
    kept = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8)
    other = np.random.default_rng(2).integers(0, 256, 16 << 20, dtype=np.uint8)
    first = client.session()
    first.on_progress = None
    try:
        first.push(kept=kept)
        proxy.drop()
        with pytest.raises(ConnectionLost):
            first.execute("1")
    finally:
        first.close()
    again = client.session(resume=first.id)
    try:
        before = proxy.up
        again.push(kept=kept)
        assert proxy.up - before < 1 << 20, "a buffer the worker holds whole is not sent again"
        before = proxy.up
        again.push(other=other)
        assert 16 << 20 <= proxy.up - before < (16 << 20) + (1 << 20)
        assert stdout_of(again, "print(int(kept.sum()) + int(other.sum()))") == f"{int(kept.sum()) + int(other.sum())}\n"
    finally:
        again.release()


def test_the_magic_resumes_a_cut_push_or_pull_when_the_cell_runs_again(server: ServerProcess, proxy: TcpProxy,
                                                                tmp_path: Path) -> None:
    env = dict(os.environ, RGPU_URL=proxy.url, RGPU_TOKEN=server.token("magician"), RGPU_PROGRESS="0",
               RGPU_CONFIG=str(tmp_path / "none.json"))
    kernel = LocalKernel(env)
    try:
        kernel.run("%load_ext remote_gpu_kernel")
        assert kernel.run("%%gpu\nimport hashlib").reply["status"] == "ok"
        made = kernel.run(f"import hashlib, numpy as np\nbig = np.random.default_rng(7).integers(0, 256, {SIZE}, "
                          "dtype=np.uint8)\nprint(hashlib.sha256(big).hexdigest())")
        cutter = cut_when(proxy, SIZE // 2)
        cut = kernel.run("%gpu push big", timeout=300)
        cutter.join()
        assert cut.reply["status"] == "error" and cut.reply["ename"] == "ConnectionLost", cut.reply
        before = proxy.up
        again = kernel.run("%gpu push big", timeout=300)
        assert again.reply["status"] == "ok", again.reply
        resent = proxy.up - before
        assert resent <= SIZE - SIZE // 2 + IN_FLIGHT, f"{resent} bytes sent again of {SIZE}: not resumed"
        assert kernel.run("%%gpu\nprint(hashlib.sha256(big).hexdigest())").stdout == made.stdout
        # A cell whose -o pull is cut: run again, it makes the same value, and only the rest comes.
        cell = "%%gpu -o back\nback = big[::-1].copy()"
        cutter = cut_when(proxy, SIZE // 2, down=True)
        cut = kernel.run(cell, timeout=300)
        cutter.join()
        assert cut.reply["status"] == "error" and cut.reply["ename"] == "ConnectionLost", cut.reply
        before = proxy.down
        assert kernel.run(cell, timeout=300).reply["status"] == "ok"
        resent = proxy.down - before
        assert resent <= SIZE - SIZE // 2 + IN_FLIGHT, f"{resent} bytes sent again of {SIZE}: not resumed"
        assert kernel.run("print(bool((back == big[::-1]).all()))").stdout == "True\n"
    finally:
        kernel.run("%gpu release")
        kernel.close()
