"""A push interrupted in the middle says where it stopped, sets nothing, and the next push of it sets it whole.

An interrupt (the magic's stop button, a cancelled task of the async API)
can stop a push after some of its bytes went. The rest never comes, and the
server would read the next message's bytes as that rest: a value made of two
pushes, then a protocol error (on the websocket) or a hang (on the bulk
stream). So the client drops what it cannot finish: the websocket (the
session is resumed on a new one, as after a cut) or the bulk stream (the
server fails that push; the session goes on). Against the shared server
across an emulated 160 Mbit/s link (``bench/link.py``), so that 32 MiB take
about 1.7 s and the push is still going at its first progress report, where
it is cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kernels import LocalKernel, kernel_with_magic
from remote_kernels import KernelDriver, kernel_env
from remote_kernels import remote_kernel as remote_kernel_of
from servers import ServerProcess, slow_link_url

from remote_gpu_kernel import AsyncClient
from remote_gpu_kernel.progress import TransferProgress
from remote_gpu_kernel.session import AsyncSession


@pytest.fixture(scope="module")
def link_url(server: ServerProcess) -> Iterator[str]:
    with slow_link_url(server.url) as url:
        yield url


@pytest.fixture(scope="module")
def magic(link_url: str, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKernel]:
    """A kernel with the magic whose pushes all go on the websocket (no bulk stream)."""
    env = kernel_env(tmp_path_factory.mktemp("magic"), link_url, server.token("interrupted"))
    with kernel_with_magic({**env, "RGPU_BULK_STREAM": "0"}) as kernel:
        assert kernel.run("%%gpu\nimport hashlib").reply["status"] == "ok"  # the lease, out of the way
        assert kernel.run("import hashlib\nimport numpy as np").reply["status"] == "ok"
        yield kernel


def test_a_push_interrupted_on_the_websocket_is_pushed_whole_when_run_again(magic: LocalKernel) -> None:
    magic.run("big = np.random.default_rng(41).random(4 << 20)")  # 32 MiB of random floats
    interrupted: list[str] = []

    def stop_when_shown(msg: dict[str, Any]) -> None:  # the stop button, pressed once its line shows
        if msg["msg_type"] == "display_data" and not interrupted:
            interrupted.append(msg["content"]["data"]["text/plain"])
            magic.km.interrupt_kernel()

    run = magic.run("%gpu push big", on_message=stop_when_shown)
    assert run.reply["status"] == "error" and run.reply["ename"] == "KeyboardInterrupt", run.reply
    assert interrupted and interrupted[0].startswith("Remote GPU: pushing"), interrupted
    # Its line says where it stopped: none is left saying that it still runs.
    (shown,), updates = run.of_type("display_data"), run.of_type("update_display_data")
    assert {u["transient"]["display_id"] for u in updates} == {shown["transient"]["display_id"]}, updates
    last = updates[-1]["data"]["text/plain"]
    assert re.match(r"^Remote GPU: push stopped at [\d.]+ (bytes|KiB|MiB) of 32 MiB \(\d+ %\)$", last), last
    run = magic.run("%gpu push big")  # reconnects (the cut push dropped the websocket) and pushes it whole
    assert run.reply["status"] == "ok", run.reply
    digest = "print(hashlib.sha256(big.tobytes()).hexdigest())"
    assert magic.run(f"%%gpu\n{digest}").stdout == magic.run(digest).stdout


def test_a_push_cancelled_on_the_bulk_stream_sets_nothing_and_the_next_sets_it_whole(
        server: ServerProcess, link_url: str) -> None:
    value = np.random.default_rng(37).random(4 << 20)  # 32 MiB of random floats
    client = AsyncClient(link_url, server.token("interrupted"))
    seen: list[TransferProgress] = []

    async def stdout(session: AsyncSession, code: str) -> str:
        result = await session.execute(code, on_output=lambda _: None)
        assert result.ok, result.error
        return result.stdout

    async def run() -> None:
        async with client.session() as session:
            assert await session._link.open_bulk()  # noqa: SLF001
            push = asyncio.ensure_future(session.push(value=value))

            def cancel_at_first_report(event: TransferProgress) -> None:
                seen.append(event)
                push.cancel()

            session.on_progress = cancel_at_first_report
            with pytest.raises(asyncio.CancelledError):
                await push
            session.on_progress = None
            assert 0 < seen[0].done < seen[0].total, seen  # it was cut short
            assert session.connected, "the websocket carried all it began: it stays"
            assert await stdout(session, "print('value' in dir())") == "False\n", "nothing was set"
            await session.push(value=value)
            assert await stdout(session, "import hashlib\nprint(hashlib.sha256(value.tobytes()).hexdigest())"
                                ) == hashlib.sha256(value.tobytes()).hexdigest() + "\n"

    asyncio.run(asyncio.wait_for(run(), 100))


@pytest.fixture(scope="module")
def remote_kernel(link_url: str, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[KernelDriver]:
    with remote_kernel_of(tmp_path_factory, link_url, server.token("interrupted-kernel"),
                          "import hashlib\nimport numpy as np",  # the lease, out of the way
                          "%%local\nimport hashlib\nimport numpy as np") as driver:
        yield driver


@pytest.mark.parametrize("verb", ["push", "pull"])
def test_the_stop_button_stops_a_transfer_of_the_remote_gpu_kernel_and_it_goes_whole_when_run_again(
        remote_kernel: KernelDriver, verb: str) -> None:
    # 32 MiB of random floats, other bytes for each (what the client holds already is not pulled)
    make = f"big = np.random.default_rng({43 if verb == 'push' else 44}).random(4 << 20)"
    assert remote_kernel.run(("%%local\n" if verb == "push" else "") + make).status == "ok"
    interrupted: list[str] = []

    def stop_when_shown(msg: dict[str, Any]) -> None:  # JupyterLab's stop button, once the line shows
        if msg["msg_type"] == "display_data" and not interrupted:
            interrupted.append(msg["content"]["data"]["text/plain"])
            remote_kernel.km.interrupt_kernel()

    run = remote_kernel.run(f"%gpu {verb} big", on_message=stop_when_shown)
    assert run.status == "error" and run.reply["ename"] == "KeyboardInterrupt", (run.reply, interrupted, [
        (m["msg_type"], m["content"]) for m in run.messages])
    assert f"the {verb} stopped" in run.reply["evalue"]
    assert interrupted and interrupted[0].startswith(f"Remote GPU: {verb}ing"), interrupted
    last = run.of("update_display_data")[-1]["data"]["text/plain"]
    assert re.match(rf"^Remote GPU: {verb} stopped at [\d.]+ (bytes|KiB|MiB) of 32 MiB \(\d+ %\)$", last), last
    assert remote_kernel.run(f"%gpu {verb} big").status == "ok"  # again, whole
    digest = "print(hashlib.sha256(big.tobytes()).hexdigest())"
    assert remote_kernel.run(digest).stdout == remote_kernel.run(f"%%local\n{digest}").stdout
