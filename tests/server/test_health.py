"""Health gating in a whole server, in this process: GPU slots read through ``FakeNvml``.

There is no GPU here: ``--slots 0,1`` gives two GPU slots whose workers are
plain ipykernels, and the NVML double says which GPU is faulty. Readings are
taken with :meth:`Readings.refresh` so no test waits on the reading period.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nvml_double import FakeGpu, FakeNvml
from remote_gpu_kernel import Client
from remote_gpu_server.app import GpuServer
from remote_gpu_server.config import ServerConfig
from stores import BlockingStore
from waiting import async_wait_for


@asynccontextmanager
async def gpu_server(location: str, nvml: FakeNvml) -> AsyncIterator[GpuServer]:
    server = GpuServer(ServerConfig(port=0, db=location, slots="0,1"), nvml=nvml)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def tokens(location: str, *users: str) -> list[str]:
    store = BlockingStore(location)
    try:
        return [store.create_token(user)[1] for user in users]
    finally:
        store.close()


def test_a_gpu_faulty_at_start_is_never_leased_until_it_recovers(store_location: str) -> None:
    gpu0, gpu1 = FakeGpu("GPU-0"), FakeGpu("GPU-1", ecc_uncorrected=3)
    alice, bob = tokens(store_location, "alice", "bob")

    async def scenario() -> None:
        async with gpu_server(store_location, FakeNvml([gpu0, gpu1])) as server:
            assert server.scheduler.unhealthy == ["gpu1"] and server.scheduler.free == ["gpu0"]
            url = f"ws://127.0.0.1:{server.port}"
            first = await asyncio.to_thread(lambda: Client(url, alice).session())
            assert first.slots == ["gpu0"]
            positions: list[int] = []
            granted = threading.Event()
            second: list[object] = []

            def wait() -> None:
                second.append(Client(url, bob).session(on_queue=positions.append))
                granted.set()

            waiter = threading.Thread(target=wait)
            waiter.start()
            await async_wait_for(lambda: positions or granted.is_set(), 30, "bob's place in the queue")
            assert positions == [1] and not granted.is_set()  # gpu1 is free but faulty
            gpu1.ecc_uncorrected = 0
            await server.readings.refresh()
            assert await asyncio.to_thread(granted.wait, 10)
            await asyncio.to_thread(waiter.join, 10)
            assert second[0].slots == ["gpu1"]  # type: ignore[attr-defined]
            await asyncio.to_thread(second[0].release)  # type: ignore[attr-defined]
            await asyncio.to_thread(first.release)

    asyncio.run(scenario())


def test_a_gpu_that_fails_under_a_lease_stays_with_it_then_stays_out(tmp_path: Path) -> None:
    gpu0, gpu1 = FakeGpu("GPU-0"), FakeGpu("GPU-1")
    (alice,) = tokens(str(tmp_path / "rgpu.sqlite3"), "alice")

    async def scenario() -> None:
        async with gpu_server(str(tmp_path / "rgpu.sqlite3"), FakeNvml([gpu0, gpu1])) as server:
            url = f"ws://127.0.0.1:{server.port}"
            session = await asyncio.to_thread(lambda: Client(url, alice).session())
            assert session.slots == ["gpu0"]
            gpu0.retired_pending = True
            await server.readings.refresh()
            assert server.scheduler.unhealthy == ["gpu0"]
            result = await asyncio.to_thread(lambda: session.execute("1 + 1", on_output=lambda _: None))
            assert result.ok  # the lease keeps its slot
            await asyncio.to_thread(session.release)
            assert server.scheduler.free == ["gpu1"]
            again = await asyncio.to_thread(lambda: Client(url, alice).session())
            assert again.slots == ["gpu1"]
            await asyncio.to_thread(again.release)
            gpu0.retired_pending = False
            await server.readings.refresh()
            assert server.scheduler.free == ["gpu0", "gpu1"]

    asyncio.run(scenario())
