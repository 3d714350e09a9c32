"""The data channel between the server and a worker, both ends.

Pushed and pulled buffers do not travel inside Jupyter messages (measured
five times slower) but over a private ZMQ PAIR socket, as a stream of
two-frame messages::

    [b"H", {"tid": N, "sizes": [...]}]   a transfer starts; sizes in bytes
    [b"D", piece]                        the next piece, in buffer order
    [b"E", b""]                          the transfer is complete
    [b"A", reason]                       the sender gave up; discard it

Pieces are forwarded as they arrive (a client's websocket frames go on to
the worker before the rest of the push has come in), and the receiver copies
each into its final, preallocated buffer, so no hop waits for a whole
100 MiB before starting. A receiver that finds a transfer it did not ask for
(``tid`` from an aborted request) skips it to its end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from remote_gpu_kernel.errors import ProtocolError
from remote_gpu_kernel.protocol.framing import CHUNK_SIZE
from remote_gpu_kernel.protocol.serialization import allocate_buffer

__all__ = ["ABORT", "DATA", "END", "HEADER", "Filler", "header", "pieces"]

HEADER, DATA, END, ABORT = b"H", b"D", b"E", b"A"


def header(tid: int, sizes: list[int]) -> list[bytes]:
    return [HEADER, json.dumps({"tid": tid, "sizes": sizes}).encode()]


def parse_header(payload: Any) -> tuple[int, list[int]]:
    fields = json.loads(bytes(payload))
    return int(fields["tid"]), [int(n) for n in fields["sizes"]]


def pieces(buffers: list[Any], chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """Views of ``buffers`` cut to at most ``chunk_size`` bytes; nothing is copied."""
    for buf in buffers:
        view = memoryview(buf).cast("B")
        for start in range(0, view.nbytes, chunk_size):
            yield view[start : start + chunk_size]


class Filler:
    """Copies arriving pieces into preallocated buffers of the given sizes."""

    def __init__(self, sizes: list[int]) -> None:
        self.buffers = [allocate_buffer(n) for n in sizes]
        self._views = [memoryview(b).cast("B") for b in self.buffers]
        self._sizes = sizes
        self._index = 0
        self._pos = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self._sizes) and self._pos == self._sizes[self._index]:
            self._index, self._pos = self._index + 1, 0

    def add(self, piece: Any) -> None:
        data = memoryview(piece).cast("B")
        while data.nbytes:
            if self._index >= len(self._sizes):
                raise ProtocolError("more bytes arrived than the transfer announced")
            room = self._sizes[self._index] - self._pos
            take = min(room, data.nbytes)
            self._views[self._index][self._pos : self._pos + take] = data[:take]
            self._pos += take
            data = data[take:]
            self._skip_full()

    @property
    def done(self) -> bool:
        return self._index >= len(self._sizes)
