"""The data channel between the server and a worker, both ends.

Pushed and pulled buffers do not travel inside Jupyter messages (measured
five times slower) but through a ring of shared memory: a sealed memfd of
:data:`RING_SLOTS` slots of :data:`SLOT_SIZE` bytes that the server creates
for each worker, passes to it at start and maps on both sides. The sender
copies a piece of at most one slot into a free slot and says so; the
receiver copies it into its final buffer and hands the slot back. Those
small notes travel on a Unix socket pair that only the two share (see
:mod:`.streams`), as two-frame notes::

    [b"H", {"tid": N, "sizes": [...]}]   a push starts; sizes in bytes (a pull's
                                         sizes come first, in its comm reply)
    [b"D", tid|slot|length]              the next piece is in that slot
    [b"F", tid|slot]                     the receiver is done with that slot
    [b"E", tid]                          the transfer is complete
    [b"A", tid|reason]                   the sender or receiver gave up

The server's operations (a push, a pull, taking on a lease; see
:mod:`.operations`) ride the same stream, so that one costs a note each
way and no Jupyter request::

    [b"O", {"id": N, "op": ..., ...}]    the server asks operation N
    [b"R", {"id": N, "ok": ..., ...}]    the worker's answer, once its handler returned
    [b"K", tid]                          after an answer that had buffers to send
                                         (a pull, a download): they are sent, and
                                         the worker no longer touches the ring

Each piece is one copy into the ring and one copy out of it, with no socket
copies: measured here against streaming the pieces over the socket itself,
100 MiB cost the sender 12 ms of CPU instead of 43 and the receiver 20
instead of 40. Pieces are passed on as they arrive (a client's websocket
frames go on to the worker before the rest of the push has come in), so no
hop waits for a whole 100 MiB before starting.

Every note carries its transfer id; a note of another transfer (left from
one that was given up) is skipped. A transfer starts with every slot free:
the caller runs one transfer at a time and ends each only when the other
side is done with the ring (the comm reply of a push, the end of a pull's
request). The seals keep a worker — which runs its user's code — from
shrinking the memfd under the server's mapping.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol.framing import CHUNK_SIZE
from remote_gpu_core.protocol.serialization import allocate_buffer

__all__ = [
    "ABORT", "DATA", "END", "FREED", "HEADER", "OPERATION", "REPLY", "RETURNED", "RING_SLOTS", "SLOT_SIZE",
    "Filler", "Inline", "Ring", "Slots", "abort", "create_ring", "end", "header", "operation", "parse_abort",
    "parse_json", "pieces", "reply", "returned",
]

HEADER, DATA, FREED, END, ABORT = b"H", b"D", b"F", b"E", b"A"
OPERATION, REPLY, RETURNED = b"O", b"R", b"K"
#: Slots in a worker's ring, and the bytes of each: 16 MiB of shared memory
#: per worker. A piece's notes and wake-ups cost the same whatever its size,
#: so larger pieces cost less per byte: measured here (``bench/transfer_cpu.py``,
#: 100 MiB), 4 slots of 4 MiB against 8 of 1 MiB took the server's CPU per
#: push from 38 to 29–31 ms and the worker's from 23 to 18–20, a push from 58
#: to 48–52 ms; 8 slots of 4 MiB were no faster than 4.
RING_SLOTS = 4
#: A slot holds four websocket frames' worth of a buffer: a push that comes on
#: the websocket takes one slot per frame, one on the bulk stream one per piece.
SLOT_SIZE = 4 * CHUNK_SIZE

_TID = struct.Struct(">I")
_PIECE = struct.Struct(">IHI")  # tid, slot, length
_FREED = struct.Struct(">IH")  # tid, slot


def header(tid: int, sizes: list[int]) -> list[bytes]:
    return [HEADER, json.dumps({"tid": tid, "sizes": sizes}).encode()]


def parse_header(payload: Any) -> tuple[int, list[int]]:
    fields = json.loads(bytes(payload))
    return int(fields["tid"]), [int(n) for n in fields["sizes"]]


def end(tid: int) -> list[bytes]:
    return [END, _TID.pack(tid)]


def abort(tid: int, reason: str) -> list[bytes]:
    return [ABORT, _TID.pack(tid) + reason.encode()]


def parse_abort(payload: Any) -> tuple[int, str]:
    data = bytes(payload)
    return _TID.unpack_from(data)[0], data[_TID.size:].decode(errors="replace")


def operation(tid: int, data: dict[str, Any]) -> list[bytes]:
    return [OPERATION, json.dumps({**data, "id": tid}).encode()]


def reply(answer: dict[str, Any]) -> list[bytes]:
    return [REPLY, json.dumps(answer).encode()]


def returned(tid: int) -> list[bytes]:
    return [RETURNED, _TID.pack(tid)]


def parse_json(payload: Any) -> dict[str, Any] | None:
    """The object of an ``O`` or ``R`` note, with its ``id``; None for what is not one."""
    try:
        data = json.loads(bytes(payload))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("id"), int) else None


def tid_of(payload: Any) -> int:
    """The transfer id that an ``E``, ``A``, ``D``, ``F`` or ``K`` note starts with."""
    return int(_TID.unpack_from(bytes(payload[: _TID.size]))[0])


def pieces(buffers: list[Any], chunk_size: int = SLOT_SIZE) -> Iterator[memoryview]:
    """Views of ``buffers`` cut to at most ``chunk_size`` bytes; nothing is copied."""
    for buf in buffers:
        view = memoryview(buf).cast("B")
        for start in range(0, view.nbytes, chunk_size):
            yield view[start : start + chunk_size]


def create_ring(slots: int = RING_SLOTS) -> int:
    """A sealed memfd for a ring of ``slots``, its pages allocated now.

    Allocating up front means a full memory never shows as SIGBUS on a
    later write; the seals mean nobody can shrink or grow it. The fd is
    close-on-exec: pass it to one worker with ``pass_fds``.
    """
    size = slots * SLOT_SIZE
    fd = os.memfd_create("rgpu-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Slots(Protocol):
    """Where the pieces of a transfer travel: a shared ring, or inside the notes.

    The sender calls :meth:`begin`, then :meth:`put` while :attr:`free` is
    not empty and :meth:`answer` for each note from the receiver; the
    receiver calls :meth:`begin`, then :meth:`take` for each ``D`` note
    (its payload and the frames after it) and sends the ``F`` note it
    returns once it is done with the piece.
    """

    free: list[int]
    #: :meth:`put` copies the piece (into the ring): the caller may reuse it at once.
    copies: bool

    def begin(self, tid: int) -> None: ...

    def put(self, piece: Any) -> list[Any]: ...

    def answer(self, kind: bytes, payload: Any) -> str | None: ...

    def take(self, payload: Any, rest: Sequence[Any] = ()) -> tuple[memoryview, list[bytes]] | None: ...

    def close(self) -> None: ...


class _Credits:
    """The slot bookkeeping both kinds of :class:`Slots` share."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.tid = 0
        self.free: list[int] = []

    def begin(self, tid: int) -> None:
        self.tid = tid
        self.free = list(range(self.slots - 1, -1, -1))

    def freed(self, payload: Any) -> None:
        tid, slot = _FREED.unpack(bytes(payload))
        if tid == self.tid and 0 <= slot < self.slots and slot not in self.free:
            self.free.append(slot)

    def answer(self, kind: bytes, payload: Any) -> str | None:
        """Take a note from the receiver, as the sender: a freed slot is
        free again; the receiver giving up on this transfer returns its
        reason. Notes of other transfers are skipped."""
        if kind == FREED:
            self.freed(payload)
        elif kind == ABORT:
            tid, reason = parse_abort(payload)
            if tid == self.tid:
                return reason
        return None

    def _piece(self, payload: Any) -> tuple[int, int, int] | None:
        tid, slot, length = _PIECE.unpack(bytes(payload))
        if tid != self.tid:
            return None
        if slot >= self.slots or length > SLOT_SIZE:
            raise ProtocolError(f"a data note points outside the ring (slot {slot}, {length} bytes)")
        return tid, slot, length


class Inline(_Credits):
    """Pieces travel inside the ``D`` notes themselves (a third frame), for a
    socket between two hosts; the slots are only credits, so the sender never
    has more than ``slots`` pieces unacknowledged."""

    copies = False

    def __init__(self, slots: int = RING_SLOTS) -> None:
        super().__init__(slots)

    def put(self, piece: Any) -> list[Any]:
        data = memoryview(piece).cast("B")
        slot = self.free.pop()
        return [DATA, _PIECE.pack(self.tid, slot, data.nbytes), data]

    def take(self, payload: Any, rest: Sequence[Any] = ()) -> tuple[memoryview, list[bytes]] | None:
        found = self._piece(payload)
        if found is None:
            return None
        tid, slot, length = found
        if len(rest) != 1 or memoryview(rest[0]).nbytes != length:
            raise ProtocolError("a data note does not carry the bytes it announces")
        return memoryview(rest[0]).cast("B"), [FREED, _FREED.pack(tid, slot)]

    def close(self) -> None:
        pass


class Ring(_Credits):
    """One end's mapping of a ring, and the slots it may write to now.

    The sender calls :meth:`begin`, then :meth:`put` while :attr:`free` is
    not empty and :meth:`freed` for each ``F`` note; the receiver calls
    :meth:`begin`, then :meth:`take` for each ``D`` note and sends the ``F``
    note it returns once it is done with the piece.
    """

    copies = True

    def __init__(self, fd: int, slots: int = RING_SLOTS) -> None:
        super().__init__(slots)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(fd, slots * SLOT_SIZE, flags=flags)
        self._view = memoryview(self._map)

    def put(self, piece: Any) -> list[bytes]:
        """Copy ``piece`` into a free slot; return the ``D`` note to send."""
        data = memoryview(piece).cast("B")
        slot = self.free.pop()
        start = slot * SLOT_SIZE
        self._view[start : start + data.nbytes] = data
        return [DATA, _PIECE.pack(self.tid, slot, data.nbytes)]

    def take(self, payload: Any, rest: Sequence[Any] = ()) -> tuple[memoryview, list[bytes]] | None:
        """The piece a ``D`` note points at and the ``F`` note that frees it;
        None for a note of another transfer."""
        found = self._piece(payload)
        if found is None:
            return None
        tid, slot, length = found
        start = slot * SLOT_SIZE
        return self._view[start : start + length], [FREED, _FREED.pack(tid, slot)]

    def close(self) -> None:
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a piece is still referenced; the mapping goes with the last one


class Filler:
    """Copies arriving pieces into preallocated buffers of the given sizes.

    The cursor (which buffer, where in it) is kept here; a sink that puts
    the bytes elsewhere (:class:`~.buffer_cache.CacheFiller`: into memfds)
    calls :meth:`_start` and overrides :meth:`_write`.
    """

    def __init__(self, sizes: list[int]) -> None:
        self.buffers = [allocate_buffer(n) for n in sizes]
        self._views = [memoryview(b).cast("B") for b in self.buffers]
        self._start(sizes)

    def _start(self, sizes: list[int]) -> None:
        self._sizes = sizes
        self._index = 0
        self._pos = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while self._index < len(self._sizes) and self._pos == self._sizes[self._index]:
            self._index, self._pos = self._index + 1, 0

    def _write(self, index: int, pos: int, data: memoryview) -> None:
        """Put ``data`` at ``pos`` of buffer ``index`` (it fits there)."""
        self._views[index][pos : pos + data.nbytes] = data

    def add(self, piece: Any) -> None:
        data = memoryview(piece).cast("B")
        while data.nbytes:
            if self._index >= len(self._sizes):
                raise ProtocolError("more bytes arrived than the transfer announced")
            take = min(self._sizes[self._index] - self._pos, data.nbytes)
            self._write(self._index, self._pos, data[:take])
            self._pos += take
            data = data[take:]
            self._skip_full()

    @property
    def done(self) -> bool:
        return self._index >= len(self._sizes)
