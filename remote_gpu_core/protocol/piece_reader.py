"""The receive buffer of a websocket connection, keeping socket reads as they came.

The websockets library parses what a connection receives with a small
generator-based reader (``websockets.streams.StreamReader``): each socket
read is appended to one ``bytearray`` and each frame is sliced off its
front. With 1 MiB frames arriving as 256 KiB reads, that ``bytearray`` is
reallocated and copied again and again as it grows and shrinks: profiled
on the server during pushes of 100 MiB, appending to it was a quarter of
the server's time, more than the socket reads themselves, and every
frame's bytes were copied twice before the frame was even unmasked.

:class:`PieceReader` has the same generator-based methods and keeps the
socket reads as they came; a frame is joined out of them once, into
``bytes``, so the library's message assembler (which turns each frame's
data into ``bytes``) copies nothing more. A frame that arrived as one read
is handed on without a copy.

:func:`install` gives it to a websockets ``Protocol`` (client or server)
that has read nothing yet. This module does no I/O and imports nothing of
the websockets library: it follows ``StreamReader``'s documented contract
(the library's sans-I/O layer), which its tests check against the library's
own reader.
"""

from __future__ import annotations

import collections
from collections.abc import Generator
from typing import Any

__all__ = ["PieceReader", "install"]


class PieceReader:
    """A drop-in for ``websockets.streams.StreamReader``: same methods, same
    errors, results as ``bytes``. Not for concurrent reads (neither is it)."""

    def __init__(self) -> None:
        self._parts: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first part
        self._size = 0
        self.eof = False

    def __len__(self) -> int:
        """Bytes received and not yet read."""
        return self._size

    def read_line(self, m: int, too_long_exc_type: type[Exception] = RuntimeError
                  ) -> Generator[None, None, bytes]:
        """A LF-terminated line, LF included; ``too_long_exc_type`` past ``m`` bytes."""
        while True:
            n = self._line_length()
            if n > 0:
                break
            p = self._size
            if p > m:
                raise too_long_exc_type(f"read {p} bytes, expected no more than {m} bytes")
            if self.eof:
                raise EOFError(f"stream ends after {p} bytes, before end of line")
            yield
        if n > m:
            raise too_long_exc_type(f"read {n} bytes, expected no more than {m} bytes")
        return self._take(n)

    def read_exact(self, n: int) -> Generator[None, None, bytes]:
        """Exactly ``n`` bytes; EOFError if the stream ends first."""
        assert n >= 0
        while self._size < n:
            if self.eof:
                raise EOFError(f"stream ends after {self._size} bytes, expected {n} bytes")
            yield
        return self._take(n)

    def read_to_eof(self, m: int, too_long_exc_type: type[Exception] = RuntimeError
                    ) -> Generator[None, None, bytes]:
        """Everything until the stream ends; ``too_long_exc_type`` past ``m`` bytes."""
        while not self.eof:
            if self._size > m:
                raise too_long_exc_type(f"read {self._size} bytes, expected no more than {m} bytes")
            yield
        return self._take(self._size)

    def at_eof(self) -> Generator[None, None, bool]:
        """Whether the stream has ended and everything was read."""
        while True:
            if self._size:
                return False
            if self.eof:
                return True
            yield

    def feed_data(self, data: bytes | bytearray | memoryview) -> None:
        """Keep ``data`` (a socket read); EOFError after :meth:`feed_eof`."""
        if self.eof:
            raise EOFError("stream ended")
        if data:
            self._parts.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def feed_eof(self) -> None:
        if self.eof:
            raise EOFError("stream ended")
        self.eof = True

    def discard(self) -> None:
        """Drop what was received and not read; the stream goes on."""
        self._parts.clear()
        self._offset = self._size = 0

    def _line_length(self) -> int:
        """Bytes up to and with the first LF not yet read; 0 if none came yet.
        Looks through the parts where they are: nothing is joined to find it."""
        seen = 0
        offset = self._offset
        for part in self._parts:
            i = part.find(b"\n", offset)
            if i >= 0:
                return seen + i - offset + 1
            seen += len(part) - offset
            offset = 0
        return 0

    def _take(self, n: int) -> bytes:
        if n == 0:
            return b""
        first = self._parts[0]
        if self._offset == 0 and len(first) == n:  # the frame came as one read: no copy
            self._parts.popleft()
            self._size -= n
            return first
        views: list[memoryview] = []
        need = n
        while need:
            part = self._parts[0]
            left = len(part) - self._offset
            if left <= need:
                views.append(memoryview(part)[self._offset:])
                self._parts.popleft()
                self._offset = 0
                need -= left
            else:
                views.append(memoryview(part)[self._offset : self._offset + need])
                self._offset += need
                need = 0
        self._size -= n
        joined = b"".join(views)
        for view in views:
            view.release()
        return joined


def install(protocol: Any) -> None:
    """Give a websockets ``Protocol`` that has received nothing yet a
    :class:`PieceReader`, and restart its parser on it (the parser holds the
    methods of the reader it started with)."""
    old = protocol.reader
    if old.eof or getattr(old, "buffer", b""):
        raise RuntimeError("the connection has received bytes already: too late to change its reader")
    protocol.reader = PieceReader()
    protocol.parser = protocol.parse()
    next(protocol.parser)
