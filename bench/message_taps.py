"""Count the messages in one direction of a TCP stream, reading only their frame headers.

The link emulator (:mod:`link`) feeds every chunk it carries to a tap, which
counts the application messages that the chunk completes:

* :class:`WebSocketMessages`: websocket (RFC 6455 §5.2) after the HTTP
  upgrade (a plain HTTP exchange counts none): one data message per final frame of type text, binary or
  continuation; control frames (ping, pong, close) are not messages.
* :class:`ZmtpMessages`: ZMTP 3 (ZeroMQ over TCP, what ipyparallel and
  Jupyter speak) after the 64-byte greeting: one message per frame without
  the MORE flag; commands (READY, SUBSCRIBE, ...) are not messages.

Payloads are skipped, never copied or unmasked: a tap must not slow the
link it measures (the websockets library's sans-I/O parser unmasks and
copies every payload, which costs more than the link itself at 10 Gbit/s).
A chunk may end anywhere, inside a header too. Encrypted streams (TLS,
CurveZMQ) cannot be tapped: the emulator counts only their bytes.
"""

from __future__ import annotations

__all__ = ["TAPS", "Tap", "WebSocketMessages", "ZmtpMessages"]


class Tap:
    """A frame-header reader: :meth:`feed` bytes in order, it returns the messages they completed
    (a message is complete once the last byte of its last frame has come).

    A subclass says how long a frame's header is once its first bytes are
    known (:meth:`header_length`) and what the whole header says
    (:meth:`frame`); the preamble (an HTTP upgrade, a greeting) is skipped first.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._skip = 0
        self._last_frame = False  # the frame being skipped ends a message
        self._preamble = True
        self._foreign = False

    def _end_of_preamble(self, data: bytes) -> int | None:
        """Where the preamble ends in the stream's first bytes ``data`` (``None``: not yet)."""
        raise NotImplementedError

    def _speaks(self, preamble: bytes) -> bool:
        """Whether the stream that began with ``preamble`` is this protocol (else nothing is counted)."""
        raise NotImplementedError

    def header_length(self, head: bytes) -> int:
        """The whole header's length, from its first bytes (as many as the last answer asked for)."""
        raise NotImplementedError

    def frame(self, head: bytes) -> tuple[int, bool]:
        """From a whole header: the payload's length, and whether the frame ends a message."""
        raise NotImplementedError

    def feed(self, data: bytes) -> int:
        """Take the stream's next bytes; return how many messages they completed."""
        if self._foreign:
            return 0
        view = memoryview(data)
        if self._preamble:
            seen = len(self._head)
            self._head += view
            end = self._end_of_preamble(bytes(self._head))
            if end is None:
                return 0
            self._preamble = False
            self._foreign = not self._speaks(bytes(self._head[:end]))
            view = view[end - seen:]
            self._head.clear()
            if self._foreign:
                return 0
        messages = 0
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                if not self._skip and self._last_frame:
                    messages += 1
                continue
            need = self.header_length(bytes(self._head[:2])) if len(self._head) >= 2 else 2
            while len(self._head) < need and view:
                take = need - len(self._head)
                self._head += view[:take]
                view = view[take:]
                if len(self._head) >= 2:
                    need = self.header_length(bytes(self._head[:2]))
            if len(self._head) < need:
                break
            self._skip, self._last_frame = self.frame(bytes(self._head))
            if not self._skip and self._last_frame:
                messages += 1
            self._head.clear()
        return messages


class WebSocketMessages(Tap):
    """Websocket data messages after the HTTP upgrade (request or response)."""

    def _end_of_preamble(self, data: bytes) -> int | None:
        end = data.find(b"\r\n\r\n")
        return None if end < 0 else end + 4

    def _speaks(self, preamble: bytes) -> bool:
        # A plain HTTP request or answer (not an upgrade) has a body, not frames.
        return b"upgrade: websocket" in preamble.lower()

    def header_length(self, head: bytes) -> int:
        code = head[1] & 0x7F
        extended = 2 if code == 126 else 8 if code == 127 else 0
        return 2 + extended + (4 if head[1] & 0x80 else 0)

    def frame(self, head: bytes) -> tuple[int, bool]:
        code = head[1] & 0x7F
        length = (int.from_bytes(head[2:4], "big") if code == 126
                  else int.from_bytes(head[2:10], "big") if code == 127 else code)
        final, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        return length, final and opcode in (0x0, 0x1, 0x2)


class ZmtpMessages(Tap):
    """ZMTP 3 messages after the greeting (and the handshake's commands)."""

    GREETING = 64
    MORE, LONG, COMMAND = 0x01, 0x02, 0x04

    def _end_of_preamble(self, data: bytes) -> int | None:
        return self.GREETING if len(data) >= self.GREETING else None

    def _speaks(self, preamble: bytes) -> bool:
        return preamble[0] == 0xFF and preamble[9] == 0x7F and preamble[10] == 3

    def header_length(self, head: bytes) -> int:
        return 9 if head[0] & self.LONG else 2

    def frame(self, head: bytes) -> tuple[int, bool]:
        flags = head[0]
        length = int.from_bytes(head[1:9], "big") if flags & self.LONG else head[1]
        return length, not flags & (self.MORE | self.COMMAND)


#: The taps a proxy may be given, by name.
TAPS: dict[str, type[Tap]] = {"websocket": WebSocketMessages, "zmtp": ZmtpMessages}
