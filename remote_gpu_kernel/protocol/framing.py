"""Messages to websocket frames and back, with no I/O.

A message is a JSON header plus zero or more binary buffers. On the wire it
is one byte stream cut into websocket binary frames of at most
``chunk_size`` bytes::

    b"RG" | version:u8 | flags:u8 | header_len:u32 big-endian   (8 bytes)
    header: UTF-8 JSON {"t": type, ...fields, "b": [len0, len1, ...]}
    buffer 0 | buffer 1 | ...                                   (raw bytes)

Small messages (the usual case) fit in one frame. A large buffer is sent as
slices of itself, never copied into a pickle or a joined byte string; the
websockets library is measured five times faster with 1 MiB frames than with
one 100 MiB frame.

Use :func:`encode` to get the frames of a message and :class:`Reader` to turn
received frames back into messages (``receive_data`` then
``events_received``, as in the websockets library's sans-I/O layer).

A relay (the server) reads with ``Reader(assemble=False)``: each buffer then
arrives as :class:`Chunks`, the received frames themselves, and is passed on
frame by frame without ever being joined. Joining 100 MiB into fresh memory
costs more here than the whole network path (page faults, not copying), so
only the final receiver joins.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from typing import Any, Union

from ..errors import ProtocolError
from .messages import Message, MessageType, message_from_fields

__all__ = [
    "CHUNK_SIZE",
    "Chunks",
    "encode_head",
    "FRAMING_VERSION",
    "MAX_HEADER",
    "MAX_MESSAGE",
    "Reader",
    "encode",
]

FRAMING_VERSION = 1
#: Frame size for large buffers; the websocket ``max_size`` is set from it.
CHUNK_SIZE = 1 << 20
#: Largest JSON header accepted (outputs with big images still fit).
MAX_HEADER = 64 << 20
#: Largest message (header and buffers together) accepted by default.
MAX_MESSAGE = 64 << 30

_PREFIX = struct.Struct(">2sBBI")
_MAGIC = b"RG"

Frame = Union[bytes, bytearray, memoryview]


class Chunks:
    """One buffer held as the pieces it arrived in, not joined.

    In a reader with ``early`` message types, a message is handed out as
    soon as its header is read and its :class:`Chunks` fill in as frames
    arrive: ``complete`` turns true at the end, ``failed`` holds a reason if
    the stream broke first, and ``listener`` (if set) is called after each
    change, so a relay can pass pieces on while the rest is still coming.
    """

    __slots__ = ("parts", "nbytes", "expected", "complete", "failed", "listener")

    def __init__(self, parts: Iterable[Frame] = (), expected: int | None = None) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(p.nbytes for p in self.parts)
        self.expected = self.nbytes if expected is None else expected
        self.complete = expected is None or self.nbytes == expected
        self.failed: str | None = None
        self.listener: Callable[[], None] | None = None

    def append(self, part: Frame) -> None:
        view = memoryview(part).cast("B")
        self.parts.append(view)
        self.nbytes += view.nbytes
        if self.nbytes >= self.expected:
            self.complete = True
        self._changed()

    def fail(self, reason: str) -> None:
        if not self.complete and self.failed is None:
            self.failed = reason
            self._changed()

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


def encode_head(message: Message, lengths: list[int], chunk_size: int = CHUNK_SIZE) -> list[Frame]:
    """The first frames of ``message`` whose buffers, of ``lengths`` bytes,
    the caller sends next as raw frames of at most ``chunk_size`` each.

    For a relay that streams buffers it has not received in full yet.
    """
    fields = message.fields()
    fields["t"] = message.type.value
    fields["b"] = list(lengths)
    header = json.dumps(fields, separators=(",", ":"), default=_json_default).encode()
    head = _PREFIX.pack(_MAGIC, FRAMING_VERSION, 0, len(header)) + header
    return [head[i : i + chunk_size] for i in range(0, len(head), chunk_size)]


def _views(buf: Frame | Chunks) -> list[memoryview]:
    if isinstance(buf, Chunks):
        return buf.parts
    return [memoryview(buf).cast("B")]


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("binary data must travel in buffers, not in the header")
    # datetimes in Jupyter headers and other plain objects
    return str(value)


def encode(message: Message, chunk_size: int = CHUNK_SIZE) -> list[Frame]:
    """Return the frames that carry ``message``, each at most ``chunk_size``.

    Buffers are sliced, not copied, unless the whole message is small enough
    to be joined into a single frame.
    """
    fields = message.fields()
    fields["t"] = message.type.value
    buffers = [_views(b) for b in getattr(message, "buffers", ())]
    if buffers:
        fields["b"] = [sum(p.nbytes for p in parts) for parts in buffers]
    header = json.dumps(fields, separators=(",", ":"), default=_json_default).encode()
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"message header of {len(header)} bytes is too large")
    head = _PREFIX.pack(_MAGIC, FRAMING_VERSION, 0, len(header)) + header
    pieces = [p for parts in buffers for p in parts]
    total = len(head) + sum(p.nbytes for p in pieces)
    if total <= chunk_size:
        return [b"".join([head, *pieces])]
    frames: list[Frame] = [head[i : i + chunk_size] for i in range(0, len(head), chunk_size)]
    for piece in pieces:
        for start in range(0, piece.nbytes, chunk_size):
            frames.append(piece[start : start + chunk_size])
    return frames


class Reader:
    """Reassembles messages from received frames.

    Call :meth:`receive_data` with each binary frame as it arrives, then
    :meth:`events_received` for the messages completed so far. At the end of
    the connection call :meth:`receive_eof`: it raises :class:`ProtocolError`
    if a message was cut short. A message with a bad field raises
    :class:`ProtocolError` and the reader goes on; broken framing (bad magic,
    bad lengths, bad JSON) leaves the stream out of step, and the reader then
    refuses more data.
    """

    def __init__(self, max_header: int = MAX_HEADER, max_message: int = MAX_MESSAGE,
                 assemble: bool = True,
                 allocate: Callable[[int], Any] = bytearray,
                 early: Iterable[MessageType] = ()) -> None:
        self.max_header = max_header
        self.max_message = max_message
        self.assemble = assemble
        self.allocate = allocate
        #: Message types handed out at their header, with filling Chunks
        #: (only where ``assemble`` is false).
        self.early = frozenset(early) if not assemble else frozenset()
        self._events: list[Message] = []
        self._broken: ProtocolError | None = None
        self._bad: ProtocolError | None = None
        self._reset()

    def _reset(self) -> None:
        self._need = _PREFIX.size
        self._small = bytearray()
        self._state = "prefix"
        self._fields: dict[str, Any] = {}
        self._buffers: list[Any] = []
        self._lengths: list[int] = []
        self._index = 0
        self._filled = 0

    @property
    def partial(self) -> tuple[dict[str, Any], int, int] | None:
        """The message whose buffers are arriving: its header fields, the
        bytes of its buffers received so far and their total. None between
        messages and while a header is read. For progress reports."""
        if self._state != "buffers" or not self._fields:
            return None
        done = sum(self._lengths[: self._index]) + self._filled
        return self._fields, done, sum(self._lengths)

    @property
    def in_message(self) -> bool:
        """Whether part of a message has been received but not all of it."""
        return self._state != "prefix" or bool(self._small)

    def events_received(self) -> list[Message]:
        events, self._events = self._events, []
        return events

    def receive_eof(self) -> None:
        if self.in_message:
            raise self._fail("connection closed in the middle of a message (truncated)")

    def abort(self, reason: str) -> None:
        """The stream ended: fail the Chunks of a message handed out early."""
        self._fail_open(reason)

    def _fail_open(self, reason: str) -> None:
        if self._state == "buffers":
            for buf in self._buffers:
                if isinstance(buf, Chunks):
                    buf.fail(reason)

    def receive_data(self, frame: Frame) -> None:
        if self._broken is not None:
            raise self._broken
        if isinstance(frame, str):
            raise self._fail("text frames are not part of the protocol; send binary frames")
        view = memoryview(frame).cast("B")
        if not view.nbytes:
            raise self._fail("empty frame")
        try:
            self._consume(view)
        finally:
            bad, self._bad = self._bad, None
        if bad is not None:
            raise bad

    def _consume(self, view: memoryview) -> None:
        while view.nbytes:
            if self._state == "buffers":
                view = self._fill_buffer(view)
                continue
            take = min(self._need - len(self._small), view.nbytes)
            self._small += view[:take]
            view = view[take:]
            if len(self._small) == self._need:
                if self._state == "prefix":
                    self._parse_prefix()
                else:
                    self._parse_header()

    def _fail(self, reason: str) -> ProtocolError:
        self._broken = ProtocolError(reason)
        self._fail_open(reason)
        return self._broken

    def _parse_prefix(self) -> None:
        magic, version, _flags, header_len = _PREFIX.unpack(bytes(self._small))
        if magic != _MAGIC:
            raise self._fail("frame does not start with the protocol's magic bytes")
        if version != FRAMING_VERSION:
            raise self._fail(f"framing version {version} is not {FRAMING_VERSION}")
        if not 0 < header_len <= self.max_header:
            raise self._fail(f"header length {header_len} is out of bounds")
        self._state, self._need, self._small = "header", header_len, bytearray()

    def _parse_header(self) -> None:
        try:
            fields = json.loads(bytes(self._small))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise self._fail("header is not a JSON object")
        lengths = fields.pop("b", [])
        if not isinstance(lengths, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths
        ):
            raise self._fail("buffer lengths must be a list of non-negative integers")
        if sum(lengths) > self.max_message:
            raise self._fail(f"message of {sum(lengths)} bytes exceeds {self.max_message}")
        self._fields, self._lengths = fields, lengths
        self._buffers = [self.allocate(n) if self.assemble else Chunks(expected=n) for n in lengths]
        self._state, self._small = "buffers", bytearray()
        self._index, self._filled = 0, 0
        if self.early and any(lengths) and fields.get("t") in {t.value for t in self.early}:
            # Hand the message out now; its Chunks fill in as frames arrive.
            self._fields = {}
            self._deliver(fields, self._buffers)
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._lengths) and self._lengths[self._index] == 0:
            self._index += 1
        if self._index == len(self._lengths):
            self._emit()

    def _fill_buffer(self, view: memoryview) -> memoryview:
        buf = self._buffers[self._index]
        size = self._lengths[self._index]
        take = min(size - self._filled, view.nbytes)
        if self.assemble:
            memoryview(buf).cast("B")[self._filled : self._filled + take] = view[:take]
        else:
            buf.append(view[:take])
        self._filled += take
        if self._filled == size:
            self._index, self._filled = self._index + 1, 0
            self._skip_empty()
        return view[take:]

    def _emit(self) -> None:
        fields, buffers = self._fields, self._buffers
        self._reset()
        if fields:  # else it was handed out early
            self._deliver(fields, buffers)

    def _deliver(self, fields: dict[str, Any], buffers: list[Any]) -> None:
        # A message whose fields are wrong leaves the stream in step: the
        # error is raised once the frame is consumed, and the reader goes on.
        try:
            self._events.append(message_from_fields(fields, tuple(buffers)))
        except ProtocolError as exc:
            for buf in buffers:
                if isinstance(buf, Chunks):
                    buf.fail(str(exc))
            self._bad = self._bad or exc
