"""How a data channel's notes (:mod:`.transfer`) travel on a byte stream.

A note is written as a count byte, then for each frame its length (4
bytes, big-endian) and its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_FRAME", "note_bytes", "note_parts", "read_note"]

_COUNT = struct.Struct(">B")
_LENGTH = struct.Struct(">I")
#: Largest frame a carrier accepts (a piece is at most one ring slot).
MAX_FRAME = 4 << 20
#: Parts of a note smaller than this go out together, in one write.
_SMALL = 64 << 10


def note_bytes(frames: Sequence[Any]) -> list[Any]:
    """The byte strings that carry ``frames`` on a stream, in order, nothing copied."""
    out: list[Any] = [_COUNT.pack(len(frames))]
    for frame in frames:
        view = memoryview(frame).cast("B")
        out.append(_LENGTH.pack(view.nbytes))
        out.append(view)
    return out


def read_note(recv_into: Any, scratch: bytearray | None = None) -> list[Any]:
    """One note from a blocking stream whose ``recv_into(view) -> n`` reads into a buffer.

    With ``scratch`` (at least :data:`MAX_FRAME` bytes), the note's first
    large frame is read into it rather than into fresh memory: a view that
    is valid until the next note is read.
    """
    def exactly(n: int) -> Any:
        nonlocal scratch
        if scratch is not None and n >= _SMALL:
            buf: Any = memoryview(scratch)[:n]
            scratch = None  # one frame per note: the next would overwrite it
        else:
            buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            read = recv_into(view[got:])
            if not read:
                raise ConnectionError("the server closed the data channel")
            got += read
        return buf

    (count,) = _COUNT.unpack(exactly(_COUNT.size))
    frames: list[Any] = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
        if length > MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes is larger than a note may carry")
        frames.append(exactly(length))
    return frames


def note_parts(frames: Sequence[Any]) -> list[Any]:
    """The parts that carry one note, its small parts joined, so that a
    piece is two sealed records and two writes, not seven."""
    out: list[Any] = []
    small = bytearray()
    for part in note_bytes(frames):
        if len(part) < _SMALL:
            small += part
            continue
        if small:
            out.append(small)
            small = bytearray()
        out.append(part)
    if small:
        out.append(small)
    return out
