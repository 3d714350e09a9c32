"""The queue positions a connection owes its client while its lease requests wait.

The broker tells a connection each new position (``queue_position``) as
the queue moves; the client gets the latest one per request, sent by one
task of the connection's own, so that a busy queue neither blocks the
broker nor floods a slow client with positions that are already stale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from remote_gpu_core.protocol import messages as m

__all__ = ["Positions"]


class Positions:
    """Lease requests waiting (broker key → request id) and their positions not yet sent."""

    def __init__(self, send: Callable[[m.Message], Awaitable[None]]) -> None:
        self._send = send
        #: Lease key → the id of the request it answers, while it waits.
        self.waiting: dict[int, int] = {}
        self._latest: dict[int, int] = {}  # lease key -> position not yet sent
        self._task: asyncio.Task[None] | None = None

    def tell(self, key: int, position: int) -> None:
        """The broker's news about ``key``; dropped once its request no longer waits."""
        if key not in self.waiting:
            return
        self._latest[key] = position
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._latest:
            key, position = self._latest.popitem()
            req = self.waiting.get(key)
            if req is not None:
                await self._send(m.QueuePosition(req, position))

    def clear(self) -> list[int]:
        """Forget every request (the client left); the keys that were waiting."""
        keys = list(self.waiting)
        self.waiting.clear()
        self._latest.clear()
        return keys
