"""A real GPU server in this process, on an event loop of its own thread.

For tests that share one server across a module and need to reach inside it
(``GpuServer(nvml=...)`` takes the NVML test double; its readings can be
taken on demand), while clients run in the test's own thread:

    server = ThreadedServer(GpuServer(config, nvml=FakeNvml([...]))).start()
    server.call(server.server.readings.refresh())
    server.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from remote_gpu_server.app import GpuServer

__all__ = ["ThreadedServer"]

T = TypeVar("T")


class ThreadedServer:
    def __init__(self, server: GpuServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpu-server", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ThreadedServer:
        self._thread.start()
        try:
            self.call(self.server.start())
            self.call(self.server.wait_ready())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
