"""One received buffer held as the pieces it arrived in (:class:`Chunks`), for a relay."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

__all__ = ["Chunks", "Frame"]

Frame = Union[bytes, bytearray, memoryview]

_EMPTY = memoryview(b"")


class Chunks:
    """One buffer held as the pieces it arrived in, not joined.

    In a reader with ``early`` message types, a message is handed out as
    soon as its header is read and its :class:`Chunks` fill in as frames
    arrive: ``complete`` turns true at the end, ``failed`` holds a reason if
    the stream broke first, and ``listener`` (if set) is called after each
    change, so a relay can pass pieces on while the rest is still coming.

    A relay that has passed piece ``i`` on calls :meth:`release` so the
    memory goes; ``nbytes - released`` is what the chunks hold now, and
    ``on_release`` (if set) hears of each release (a connection that bounds
    what it holds). Once ``failed``, the chunks keep nothing: what they held
    is dropped and bytes that still arrive are only counted.
    """

    __slots__ = ("parts", "nbytes", "expected", "complete", "failed", "listener", "released",
                 "on_release")

    def __init__(self, parts: Iterable[Frame] = (), expected: int | None = None) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(p.nbytes for p in self.parts)
        self.expected = self.nbytes if expected is None else expected
        self.complete = expected is None or self.nbytes == expected
        self.failed: str | None = None
        self.listener: Callable[[], None] | None = None
        self.released = 0
        self.on_release: Callable[[], None] | None = None

    @property
    def held(self) -> int:
        """Bytes these chunks keep in memory now."""
        return self.nbytes - self.released

    def append(self, part: Frame) -> None:
        view = memoryview(part).cast("B")
        self.nbytes += view.nbytes
        if self.failed is not None:  # refused or cut short: count, keep nothing
            self.released += view.nbytes
            return
        self.parts.append(view)
        if self.nbytes >= self.expected:
            self.complete = True
        self._changed()

    def release(self, index: int) -> memoryview:
        """Piece ``index``, forgotten here: the caller passed it on."""
        piece = self.parts[index]
        self.parts[index] = _EMPTY
        self.released += piece.nbytes
        if self.on_release is not None:
            self.on_release()
        return piece

    def fail(self, reason: str) -> None:
        if not self.complete and self.failed is None:
            self.failed = reason
            self.parts = []
            self.released = self.nbytes
            self._changed()
            if self.on_release is not None:
                self.on_release()

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener()

    def join(self, allocate: Callable[[int], Any] = bytearray) -> Any:
        """The pieces copied into one writable buffer from ``allocate``."""
        out = allocate(self.nbytes)
        view, pos = memoryview(out).cast("B"), 0
        for part in self.parts:
            view[pos : pos + part.nbytes] = part
            pos += part.nbytes
        return out

    def __len__(self) -> int:
        return self.expected
