"""A new lease's worker becomes its user's while the lease is answered: its requests wait.

Nothing of the user's may reach a worker before it has taken on their
identity (:meth:`Worker.enter` with ``later``): every request waits at
:meth:`Worker.request` until :attr:`Worker.entering` is done, and fails as a
death of the worker where it could not become theirs. A real worker process
(no isolation here: the entering is stood in for by a task this test ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.ids import SlotId
from remote_gpu_server.errors import IsolationError
from remote_gpu_server.gpus.slots import Slot
from remote_gpu_server.workers.local_launcher import LocalLauncher
from remote_gpu_server.workers.worker import Worker

SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")


@contextlib.asynccontextmanager
async def worker() -> AsyncIterator[Worker]:
    launcher = LocalLauncher()
    started = await Worker.start(launcher, [SLOT], 120)
    try:
        yield started
    finally:
        await started.kill()
        await launcher.close()


def entering(w: Worker) -> asyncio.Future[None]:
    """Stand in for ``w`` taking on its lease's identity: it is done when the future is."""
    became: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    w.entering = asyncio.ensure_future(became)
    return became


async def _turns(n: int = 20) -> None:
    """Let every other task run ``n`` times over (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def _quiet(_: Any) -> None:
    pass


def test_a_request_waits_until_the_worker_is_its_users_then_runs() -> None:
    async def scenario() -> None:
        async with worker() as w:
            became = entering(w)
            cell = asyncio.ensure_future(w.execute("x = 6 * 7", _quiet))
            await _turns()
            assert not cell.done()
            assert not w._pending, "nothing was sent to the worker before it became the user's"
            became.set_result(None)
            assert (await cell)["status"] == "ok"

    asyncio.run(scenario())


def test_an_interrupt_waits_until_the_worker_is_its_users() -> None:
    """No signal may land in the middle of the entering (the signals are
    recorded here instead of sent: an interrupt of an idle kernel is not
    what this test is about)."""
    async def scenario() -> None:
        async with worker() as w:
            sent: list[int] = []

            async def record(signum: int) -> None:
                sent.append(signum)

            send = w.process.signal
            w.process.signal = record  # type: ignore[method-assign]
            try:
                became = entering(w)
                interrupt = asyncio.ensure_future(w.interrupt())
                await _turns()
                assert not interrupt.done() and sent == []
                became.set_result(None)
                await interrupt
                assert sent == [signal.SIGINT]
            finally:
                w.process.signal = send  # type: ignore[method-assign]

    asyncio.run(scenario())


def test_a_worker_that_could_not_become_the_users_fails_their_requests_as_a_death() -> None:
    async def scenario() -> None:
        async with worker() as w:
            became = entering(w)
            cell = asyncio.ensure_future(w.execute("x = 1", _quiet))
            await _turns()
            became.set_exception(IsolationError("worker w1 could not become alice's: PermissionError: nope"))
            with pytest.raises(WorkerDied, match="could not become alice's: PermissionError: nope"):
                await cell
            with pytest.raises(WorkerDied, match="could not become alice's"):
                await w.request("kernel_info_request", {})
            await w.interrupt()  # says nothing: there is nothing to interrupt
            assert not w._pending

    asyncio.run(scenario())
