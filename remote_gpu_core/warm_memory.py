"""Memory for large received buffers, kept warm across transfers.

A received buffer is written once, from end to end, by a copy. Into fresh
memory that copy also faults every page in and the kernel zeroes each one
first: measured here for 100 MiB, 16–30 ms into memory already faulted,
27–55 ms into fresh memory and now and then 450 ms (a huge page the kernel
had to compact for). Profiled during pulls of 100 MiB, that copy was the
client's largest cost, three times each of the websocket library's own
copies of the same bytes.

So the memory of a large buffer that nothing uses any more is not given
back to the kernel but kept here, by size, and the next buffer of that size
is received into it. A buffer is handed out as a numpy ``uint8`` array over
a block; when that array is gone (no variable, view or tensor made from it
is left), its block comes back. Nothing of a buffer that is still in use is
ever handed out again.

Memory bounds: the blocks kept are marked ``MADV_FREE``, so the kernel may
take their pages whenever it is short of memory (a memory cgroup reclaims
them before it kills anything); until it does, writing to them faults
nothing. At most :data:`KEPT` bytes of blocks are kept per process, the
oldest given back first, and all of them before a new block is refused. A
worker held by RLIMIT_DATA rather than a memory cgroup keeps at most an
eighth of its limit (there, unused blocks count against it). Where numpy
or ``MADV_FREE`` is missing, buffers come from fresh memory as before.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Any

from .sizes import format_size

__all__ = ["KEPT", "WarmMemory", "warm_memory"]

#: Bytes of unused blocks one process keeps: enough for a buffer of 100 MiB
#: or two going round (each received while the previous value is still bound).
KEPT = 256 << 20
#: Blocks are whole multiples of this (the size of a transparent huge page),
#: so buffers of nearly the same size share them.
_GRAIN = 2 << 20

_FREE = getattr(mmap, "MADV_FREE", None)
_HUGE = getattr(mmap, "MADV_HUGEPAGE", None)


class WarmMemory:
    """Blocks of private anonymous memory, handed out as numpy arrays and
    taken back when those arrays are gone; at most ``kept`` bytes of unused
    blocks are held. Safe to use from several threads."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        # Reentrant: a block may come back (a garbage collection run inside
        # the lock ends an array) while this thread holds it.
        self._lock = threading.RLock()
        self._unused: list[mmap.mmap] = []  # oldest first
        self._unused_bytes = 0
        #: Buffers handed out of a block that was kept warm, and of a fresh one.
        self.reused = 0
        self.fresh = 0

    @property
    def unused_bytes(self) -> int:
        """Bytes of blocks kept for the next buffers."""
        return self._unused_bytes

    def take(self, nbytes: int) -> Any:
        """A writable numpy ``uint8`` array of ``nbytes``, in a warm block where
        one of its size is kept. Its contents are undefined: write all of it."""
        import numpy

        size = -(-nbytes // _GRAIN) * _GRAIN
        block = self._unused_block(size)
        if block is None:
            block = self._fresh_block(size)
            self.fresh += 1
        else:
            self.reused += 1
        array = numpy.frombuffer(block, dtype=numpy.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, block).atexit = False
        return array

    def _fresh_block(self, size: int) -> mmap.mmap:
        """A new block; where memory is short, the unused blocks are given
        back first, and MemoryError (as numpy raises) if that is not enough."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        try:
            block = mmap.mmap(-1, size, flags=flags)
        except OSError:
            self.clear()
            try:
                block = mmap.mmap(-1, size, flags=flags)
            except OSError as exc:
                raise MemoryError(f"cannot allocate {format_size(size)} for a received buffer: {exc.strerror}") from None
        if _HUGE is not None:
            block.madvise(_HUGE)
        return block

    def clear(self) -> None:
        """Give every unused block back to the kernel."""
        with self._lock:
            self._unused.clear()
            self._unused_bytes = 0

    def _unused_block(self, size: int) -> mmap.mmap | None:
        with self._lock:
            for i, block in enumerate(self._unused):
                if len(block) == size:
                    del self._unused[i]
                    self._unused_bytes -= size
                    return block
        return None

    def _give_back(self, block: mmap.mmap) -> None:
        """The array over ``block`` is gone: keep the block, within :attr:`kept`.

        A block not kept is only let go of, never closed here: the array may
        still be releasing its view of it, and the mapping goes with the last
        reference."""
        size = len(block)
        if size > self.kept or _FREE is None:
            return
        try:
            block.madvise(_FREE)
        except OSError:  # a kernel without MADV_FREE: the pages would stay held
            return
        with self._lock:
            self._unused.append(block)
            self._unused_bytes += size
            while self._unused_bytes > self.kept:
                self._unused_bytes -= len(self._unused.pop(0))


#: The one of this process, used by :func:`~.protocol.serialization.allocate_buffer`.
warm_memory = WarmMemory()
