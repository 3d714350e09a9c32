"""What one client's messages make the server hold, and the rules that bound it.

A connection takes a :class:`Hold` for each message it has in flight: the
message's header and buffers, counted until its request is answered. A
push's buffers are :class:`~remote_gpu_core.protocol.framing.Chunks` that
fill as frames arrive and empty as the worker takes them, so its hold
shrinks and grows with them.

Two rules keep the total near ``limit`` (``rgpu serve --connection-memory``):

- :meth:`ConnectionMemory.fits`: a message is taken only if it fits beside
  what is held (or nothing is held: one message of up to ``--max-message``
  always gets through); a connection refuses the others with an error.
- :meth:`ConnectionMemory.wait_for_room`: while a push arrives, the
  connection reads the client's next frame only once that push is less
  than its window ahead of the worker. Only the push's own consumer has to
  make progress for the window to open, so this cannot wait on a request
  that itself waits for the client (an ``input()`` answer, an interrupt).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from remote_gpu_core.protocol import CHUNK_SIZE
from remote_gpu_core.protocol.framing import Chunks

__all__ = ["ConnectionMemory", "Hold", "MIN_WINDOW"]

#: A streaming push may always be this far ahead of its worker, however
#: much else is held: enough to keep the worker's ring full.
MIN_WINDOW = 8 * CHUNK_SIZE


class Hold:
    """Bytes one message makes the server hold: ``fixed`` plus its chunks' bytes not yet passed on."""

    def __init__(self, memory: ConnectionMemory, fixed: int, chunks: Sequence[Chunks]) -> None:
        self._memory = memory
        self.fixed = fixed
        self.chunks = tuple(chunks)
        for c in self.chunks:
            c.on_release = memory.changed

    @property
    def bytes(self) -> int:
        return self.fixed + sum(c.held for c in self.chunks)

    @property
    def arriving(self) -> bool:
        """Whether bytes of this message are still to come from the client."""
        return any(not c.complete and c.failed is None for c in self.chunks)

    def fail(self, reason: str) -> None:
        """Nothing more of this message will be used: drop what it holds and
        whatever of it still arrives."""
        for c in self.chunks:
            c.fail(reason)

    def release(self) -> None:
        """The message's request is answered: it holds nothing any more."""
        for c in self.chunks:
            c.on_release = None
        self._memory.drop(self)


class ConnectionMemory:
    """The holds of one connection; see the module docstring."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._holds: set[Hold] = set()
        self._room = asyncio.Event()

    @property
    def held(self) -> int:
        return sum(h.bytes for h in self._holds)

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may be held now."""
        held = self.held
        return held == 0 or held + size <= self.limit

    def hold(self, fixed: int, chunks: Sequence[Chunks] = ()) -> Hold:
        hold = Hold(self, fixed, chunks)
        self._holds.add(hold)
        return hold

    def drop(self, hold: Hold) -> None:
        self._holds.discard(hold)
        self.changed()

    def changed(self) -> None:
        """Something was passed on or let go: a waiting reader may go on."""
        self._room.set()

    def window(self, hold: Hold) -> int:
        """How far ``hold``'s push may be ahead of its worker now."""
        others = sum(h.bytes for h in self._holds if h is not hold)
        return max(self.limit - others, MIN_WINDOW)

    def room(self, hold: Hold | None) -> Awaitable[None] | None:
        """What a push arriving on a bulk stream waits for while it is too far ahead of its worker."""
        if hold is not None and hold.arriving and hold.bytes > self.window(hold):
            return self.wait_for_room(hold)
        return None

    async def wait_for_room(self, hold: Hold) -> None:
        """Return once ``hold`` is within its window (or no longer arriving)."""
        while hold.arriving and hold.bytes > self.window(hold):
            self._room.clear()
            await self._room.wait()

    def close(self, reason: str) -> None:
        """The connection is gone: every message still arriving is dropped."""
        for hold in list(self._holds):
            hold.fail(reason)
            hold.release()
