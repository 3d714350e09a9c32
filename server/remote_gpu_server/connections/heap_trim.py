"""Giving freed heap memory back to the system after connections close.

glibc's ``malloc`` keeps memory that was freed inside its heap for reuse
instead of returning it, and a heap that many connections grew piece by
piece is full of such holes: 1,000 websockets that each held half a 1 MiB
frame, sent in 4 KiB pieces, grew the server by 560 MiB, and 260 MiB of it
stayed after they had all closed. ``malloc_trim(0)`` hands the free pages
back; it brought that server back to within 15 MiB of its start.

:class:`HeapTrimmer` calls it once, :data:`DELAY` seconds after the last of
a burst of closes, on a thread of its own: trimming a heap of hundreds of
MiB takes tens of milliseconds, which the event loop must not wait for
(``ctypes`` lets the loop run meanwhile). Where the C library has no
``malloc_trim`` (not glibc), it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["DELAY", "HeapTrimmer", "malloc_trim"]

log = logging.getLogger("remote_gpu_server")

#: Seconds after the latest close before the heap is trimmed.
DELAY = 1.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


#: glibc's ``malloc_trim(pad)``; None where the C library has none.
malloc_trim = _find_malloc_trim()


class HeapTrimmer:
    """Call :meth:`soon` when something that held memory is let go; :meth:`close` at the end."""

    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        #: How many times the heap was trimmed (for tests and logs).
        self.trims = 0

    def soon(self) -> None:
        """Trim :attr:`delay` seconds from now, or later if more comes first."""
        if malloc_trim is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            self.soon()  # one trim at a time: try again after this one
            return
        self._task = asyncio.get_running_loop().create_task(self._trim())

    async def _trim(self) -> None:
        assert malloc_trim is not None
        try:
            await asyncio.to_thread(malloc_trim, 0)
        except Exception:  # never the server's problem
            log.debug("malloc_trim failed", exc_info=True)
        self.trims += 1

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
