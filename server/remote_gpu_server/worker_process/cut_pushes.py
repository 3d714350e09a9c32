"""Inside the worker: what arrived of a push cut short, kept so that only the rest is sent again.

When the connection drops in the middle of a push, each large buffer named
by content that had begun to arrive (a memfd of its own, see
:mod:`.buffer_cache`) stays here by digest, with the bytes written from its
start. A client that reconnects asks how much is held (the ``holding`` op)
and pushes the rest (a push's ``offsets``); :meth:`CutPushes.take` hands
the memfd to the push that goes on filling it.

Bounded: only the buffers of the latest push cut short are kept (a new cut
replaces them), at most the session cache's budget in all, for
:data:`KEEP_FOR` seconds; the session's release ends the worker and frees
all of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

__all__ = ["KEEP_FOR", "CutPushes", "same_file"]

#: How long what came of a push cut short is kept for its client to come back, in seconds.
KEEP_FOR = 600.0


class CutPushes:
    """Unsealed memfds by digest, with the bytes that came of each; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, tuple[int, int, tuple[int, int]]] = {}  # digest: (fd, received, identity)
        self._since = 0.0

    def keep(self, parts: Sequence[tuple[str, int, int]], limit: int) -> None:
        """Keep ``parts`` (``(digest, fd, received)``; the fds are this object's
        now) in place of what was kept, as far as ``limit`` bytes of memfd
        allow; the others are closed."""
        self.clear()
        room = limit
        for key, fd, received in parts:
            size = os.fstat(fd).st_size
            if received <= 0 or size > room or key in self._held:
                os.close(fd)
                continue
            room -= size
            st = os.fstat(fd)
            self._held[key] = (fd, received, (st.st_dev, st.st_ino))
        self._since = self._clock()

    def received(self, key: str) -> int:
        """The bytes held of the buffer named ``key`` (0: none)."""
        held = self._live(key)
        return held[1] if held is not None else 0

    def take(self, key: str) -> tuple[int, int] | None:
        """``(fd, received)`` of ``key``, which is the caller's from now on; None if not held."""
        held = self._live(key)
        if held is None:
            return None
        del self._held[key]
        return held[0], held[1]

    def _live(self, key: str) -> tuple[int, int, tuple[int, int]] | None:
        if self._held and self._clock() - self._since > KEEP_FOR:
            self.clear()
        held = self._held.get(key)
        if held is not None and not same_file(held[0], held[2]):  # a cell closed it and the number was reused
            del self._held[key]
            return None
        return held

    def clear(self) -> None:
        for fd, _, identity in self._held.values():
            if same_file(fd, identity):
                os.close(fd)
        self._held.clear()


def same_file(fd: int, identity: tuple[int, int]) -> bool:
    """Whether ``fd`` still names the file whose ``(st_dev, st_ino)`` is ``identity``:
    a cell may have closed a kept descriptor and its number been reused."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity
