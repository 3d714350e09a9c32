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

A message whose prefix has :data:`FLAG_BULK` set carries its header here
and its buffers' bytes, in order, on a second stream of raw bytes beside
this one (see :mod:`remote_gpu_core.bulk_stream`): the reader hands such a
message, with its buffers still empty, to its ``on_bulk`` handler and
reads the next message at once. Only a peer that agreed to a bulk stream
sets the flag; a reader without a handler refuses it.

Limits: a header longer than ``max_header`` breaks the stream (its buffers'
lengths are in it, so nothing after it can be read). A message whose size
or number of buffers is over its limit is refused whole: the reader raises
:class:`~remote_gpu_core.errors.MessageTooLarge` naming its request,
skips its bytes without keeping them, and goes on with the next message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from ..errors import MessageTooLarge, ProtocolError
from .chunks import Chunks, Frame
from .messages import Message, MessageType, message_from_fields

__all__ = [
    "BulkHandler", "CHUNK_SIZE", "Chunks", "FLAG_BULK", "FRAMING_VERSION", "MAX_BUFFERS", "MAX_HEADER",
    "MAX_MESSAGE", "Reader", "encode", "encode_head", "header_bytes", "views",
]

FRAMING_VERSION = 1
#: Frame size for large buffers; the websocket ``max_size`` is set from it.
CHUNK_SIZE = 1 << 20
#: Largest JSON header accepted (outputs with big images still fit).
MAX_HEADER = 64 << 20
#: Largest message (header and buffers together) accepted by default.
MAX_MESSAGE = 64 << 30
#: Most buffers one message may carry: each costs the reader an object
#: before any of its bytes arrive, so a short header must not make millions.
MAX_BUFFERS = 100_000

#: In a message's prefix: its buffers' bytes come on the bulk stream, not after its header.
FLAG_BULK = 1

_PREFIX = struct.Struct(">2sBBI")
_MAGIC = b"RG"


def encode_head(message: Message, lengths: list[int], chunk_size: int = CHUNK_SIZE, flags: int = 0
                ) -> list[Frame]:
    """The first frames of ``message`` whose buffers, of ``lengths`` bytes,
    the caller sends next as raw frames of at most ``chunk_size`` each (or,
    with ``flags`` :data:`FLAG_BULK`, on the bulk stream).

    For a relay that streams buffers it has not received in full yet.
    """
    fields = message.fields()
    fields["t"] = message.type.value
    fields["b"] = list(lengths)
    header = json.dumps(fields, separators=(",", ":"), default=_json_default).encode()
    head = _PREFIX.pack(_MAGIC, FRAMING_VERSION, flags, len(header)) + header
    return [head[i : i + chunk_size] for i in range(0, len(head), chunk_size)]


def views(buf: Frame | Chunks) -> list[memoryview]:
    """The pieces of one buffer (a bytes-like object, or :class:`Chunks`) as byte views."""
    if isinstance(buf, Chunks):
        return buf.parts
    return [memoryview(buf).cast("B")]


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("binary data must travel in buffers, not in the header")
    # datetimes in Jupyter headers and other plain objects
    return str(value)


def header_bytes(message: Message, lengths: list[int]) -> bytes:
    """The JSON header of ``message`` whose buffers are ``lengths`` bytes long."""
    fields = message.fields()
    fields["t"] = message.type.value
    if lengths:
        fields["b"] = list(lengths)
    return json.dumps(fields, separators=(",", ":"), default=_json_default).encode()


def encode(message: Message, chunk_size: int = CHUNK_SIZE) -> list[Frame]:
    """Return the frames that carry ``message``, each at most ``chunk_size``.

    Buffers are sliced, not copied, unless the whole message is small enough
    to be joined into a single frame.
    """
    buffers = [views(b) for b in getattr(message, "buffers", ())]
    header = header_bytes(message, [sum(p.nbytes for p in parts) for parts in buffers])
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


#: ``on_bulk(message, buffers, lengths, header_size)``: a message whose buffers come
#: on the bulk stream (None where it was refused: the error is raised as for any
#: other), its buffers to fill in order (empty where refused: skip ``lengths``).
#: True: the message is also received now, in its turn among the others; False:
#: the handler delivers it itself (once its buffers are filled).
BulkHandler = Callable[[Union[Message, None], list[Any], list[int], int], bool]


class Reader:
    """Reassembles messages from received frames.

    Call :meth:`receive_data` with each binary frame as it arrives, then
    :meth:`events_received` for the messages completed so far (or
    :meth:`received`, which also gives each message's header size). At the
    end of the connection call :meth:`receive_eof`: it raises
    :class:`ProtocolError` if a message was cut short. A message with a bad
    field raises :class:`ProtocolError` (with the message's ``req``) and the
    reader goes on; so does a message over its limits
    (:class:`MessageTooLarge`). Broken framing (bad magic, bad lengths, bad
    JSON, a header over ``max_header``) leaves the stream out of step, and
    the reader then refuses more data.

    Limits: ``max_header`` bytes of JSON header; ``max_message`` bytes of a
    whole message (header and buffers); ``max_early`` bytes of buffers of a
    message of an ``early`` type (default ``max_message``; a mapping gives
    each early type its own); ``max_buffers`` buffers in one message.
    """

    def __init__(self, max_header: int = MAX_HEADER, max_message: int = MAX_MESSAGE,
                 assemble: bool = True,
                 allocate: Callable[[int], Any] = bytearray,
                 early: Iterable[MessageType] = (),
                 max_early: int | Mapping[MessageType, int] | None = None,
                 max_buffers: int = MAX_BUFFERS) -> None:
        self.max_header = max_header
        self.max_message = max_message
        per_type = max_early if isinstance(max_early, Mapping) else {}
        default = max_message if max_early is None or isinstance(max_early, Mapping) else max_early
        self.max_buffers = max_buffers
        self.assemble = assemble
        self.allocate = allocate
        #: Message types handed out at their header, with filling Chunks
        #: (only where ``assemble`` is false).
        self.early = frozenset(early) if not assemble else frozenset()
        self._early_names = {t.value for t in self.early}
        #: The most bytes of buffers each early type may carry, by its name.
        self._max_early = {t.value: per_type.get(t, default) for t in self.early}
        self._events: list[tuple[Message, int]] = []
        #: Takes each message whose buffers come on the bulk stream (see :data:`BulkHandler`).
        self.on_bulk: BulkHandler | None = None
        self._flags = 0
        self._broken: ProtocolError | None = None
        self._bad: list[ProtocolError] = []
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
        self._header_size = 0

    @property
    def partial(self) -> tuple[dict[str, Any], int, int] | None:
        """The message whose buffers are arriving: its header fields, the
        bytes of its buffers received so far and their total. None between
        messages and while a header is read. For progress reports."""
        if self._state != "buffers" or not self._fields:
            return None
        done = sum(self._lengths[: self._index]) + self._filled
        return self._fields, done, sum(self._lengths)

    def salvage(self) -> tuple[dict[str, Any], list[tuple[Any, int]]] | None:
        """What came of an assembled message cut short in its buffers: its
        header fields and each buffer with the bytes received from its start;
        None otherwise. For a receiver that asks for only the rest."""
        if self._state != "buffers" or not self._fields or not self.assemble:
            return None
        came = [(buf, size if i < self._index else self._filled if i == self._index else 0)
                for i, (buf, size) in enumerate(zip(self._buffers, self._lengths))]
        return dict(self._fields), came

    @property
    def in_message(self) -> bool:
        """Whether part of a message has been received but not all of it."""
        return self._state != "prefix" or bool(self._small)

    @property
    def skipping(self) -> int:
        """Bytes of a refused message still to come, which the reader will skip
        (0 when it is not skipping one). A receiver that will not wait for
        them, since a peer that gave up sending them would have its next
        messages skipped instead, closes the stream."""
        return self._need if self._state == "skip" else 0

    @property
    def broken(self) -> bool:
        """Whether the stream is out of step: every later frame is refused."""
        return self._broken is not None

    def errors_received(self) -> list[ProtocolError]:
        """Every message refused by the latest :meth:`receive_data` (it raised the first)."""
        return list(self._bad)

    def events_received(self) -> list[Message]:
        return [message for message, _ in self.received()]

    def received(self) -> list[tuple[Message, int]]:
        """The messages completed so far, each with the size of its header in bytes."""
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

    def receive_data(self, frame: Frame | str) -> None:
        """Take one websocket frame (a text frame, ``str``, is refused)."""
        if self._broken is not None:
            raise self._broken
        if isinstance(frame, str):
            raise self._fail("text frames are not part of the protocol; send binary frames")
        view = memoryview(frame).cast("B")
        if not view.nbytes:
            raise self._fail("empty frame")
        self._bad = []
        self._consume(view)
        if self._bad:
            raise self._bad[0]

    def _consume(self, view: memoryview) -> None:
        while view.nbytes:
            if self._state == "buffers":
                view = self._fill_buffer(view)
                continue
            if self._state == "skip":
                take = min(self._need, view.nbytes)
                self._need -= take
                view = view[take:]
                if not self._need:
                    self._reset()
                continue
            take = min(self._need - len(self._small), view.nbytes)
            self._small += view[:take]
            view = view[take:]
            if len(self._small) == self._need:
                if self._state == "prefix":
                    self._parse_prefix()
                else:
                    self._parse_header()

    def _fail(self, reason: str, error: type[ProtocolError] = ProtocolError) -> ProtocolError:
        self._broken = error(reason)
        self._fail_open(reason)
        return self._broken

    def _parse_prefix(self) -> None:
        magic, version, self._flags, header_len = _PREFIX.unpack(bytes(self._small))
        if magic != _MAGIC:
            raise self._fail("frame does not start with the protocol's magic bytes")
        if version != FRAMING_VERSION:
            raise self._fail(f"framing version {version} is not {FRAMING_VERSION}")
        if header_len > self.max_header:
            error = self._fail(f"a message header of {header_len} bytes exceeds the limit of "
                               f"{self.max_header} bytes", MessageTooLarge)
            assert isinstance(error, MessageTooLarge)
            error.size, error.limit = header_len, self.max_header
            raise error
        if not header_len:
            raise self._fail("header length 0 is out of bounds")
        if self._flags & FLAG_BULK and self.on_bulk is None:
            raise self._fail("a message for a bulk stream, and none was agreed")
        self._state, self._need, self._small = "header", header_len, bytearray()

    def _parse_header(self) -> None:
        header_size = len(self._small)
        try:
            fields = json.loads(bytes(self._small))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("header is not valid JSON") from None
        except (ValueError, RecursionError):
            # Integers of thousands of digits, arrays nested thousands deep.
            raise self._fail("header is JSON this side does not read (a number too long or "
                             "nesting too deep)") from None
        if not isinstance(fields, dict):
            raise self._fail("header is not a JSON object")
        lengths = fields.pop("b", [])
        if not isinstance(lengths, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths
        ):
            raise self._fail("buffer lengths must be a list of non-negative integers")
        total = sum(lengths)
        self._header_size = header_size
        refused = self._refusal(fields, lengths, total, header_size)
        if self._flags & FLAG_BULK and self.on_bulk is not None:
            self._bulk(fields, lengths, header_size, refused)
            return
        if refused is not None:
            # Refused whole: skip its buffers' bytes, keep none, stay in step.
            self._bad.append(refused)
            self._state, self._need, self._small = "skip", total, bytearray()
            if not total:
                self._reset()
            return
        self._fields, self._lengths = fields, lengths
        self._buffers = [self.allocate(n) if self.assemble else Chunks(expected=n) for n in lengths]
        self._state, self._small = "buffers", bytearray()
        self._index, self._filled = 0, 0
        if self.early and any(lengths) and fields.get("t") in self._early_names:
            # Hand the message out now; its Chunks fill in as frames arrive.
            self._fields = {}
            self._deliver(fields, self._buffers, header_size)
        self._skip_empty()

    def _bulk(self, fields: dict[str, Any], lengths: list[int], header_size: int,
              refused: MessageTooLarge | None) -> None:
        """A message whose buffers' bytes come on the bulk stream: to ``on_bulk`` now."""
        assert self.on_bulk is not None
        self._reset()
        buffers: list[Any] = []
        message: Message | None = None
        if refused is not None:
            self._bad.append(refused)
        else:
            buffers = [self.allocate(n) if self.assemble else Chunks(expected=n) for n in lengths]
            count = len(self._bad)
            self._deliver(fields, buffers, header_size)
            message = self._events.pop()[0] if len(self._bad) == count else None
            buffers = buffers if message is not None else []
        if self.on_bulk(message, buffers, lengths, header_size) and message is not None:
            self._events.append((message, header_size))

    def _refusal(self, fields: dict[str, Any], lengths: list[int], total: int,
                 header_size: int) -> MessageTooLarge | None:
        """Why a message must be refused whole, or None."""
        req = fields.get("req")
        req = req if isinstance(req, int) and not isinstance(req, bool) and 0 <= req < 1 << 63 else 0
        kind: str = fields["t"] if isinstance(fields.get("t"), str) else "message"
        if len(lengths) > self.max_buffers:
            return MessageTooLarge(f"a {kind} of {len(lengths)} buffers is more than the "
                                   f"{self.max_buffers} one message may carry", req,
                                   size=len(lengths), limit=self.max_buffers, what=kind)
        if kind in self._early_names:
            limit = self._max_early[kind]
            if total > limit:
                return MessageTooLarge(f"a {kind} of {total} bytes exceeds the limit of "
                                       f"{limit} bytes", req, size=total, limit=limit, what=kind)
        elif header_size + total > self.max_message:
            return MessageTooLarge(f"a {kind} message of {header_size + total} bytes exceeds the "
                                   f"limit of {self.max_message} bytes", req,
                                   size=header_size + total, limit=self.max_message, what=kind)
        return None

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
        fields, buffers, header_size = self._fields, self._buffers, self._header_size
        self._reset()
        if fields:  # else it was handed out early
            self._deliver(fields, buffers, header_size)

    def _deliver(self, fields: dict[str, Any], buffers: list[Any], header_size: int) -> None:
        # A message whose fields are wrong leaves the stream in step: the
        # error is raised once the frame is consumed, and the reader goes on.
        try:
            self._events.append((message_from_fields(fields, tuple(buffers)), header_size))
        except ProtocolError as exc:
            for buf in buffers:
                if isinstance(buf, Chunks):
                    buf.fail(str(exc))
            req = fields.get("req")
            if isinstance(req, int) and not isinstance(req, bool) and 0 <= req < 1 << 63:
                exc.req = req
            self._bad.append(exc)
