"""A loopback proxy that counts websocket messages each way and can hold the server's answers.

Between a client and a real server (the client's URL points at it), it
counts the websocket data messages that cross each way (with the network
benchmark's tap, ``bench/message_taps.py``: frame headers only). A test
that must prove the client sends its requests without waiting for an
answer in between calls :meth:`MessageGate.hold_answers`: from then on,
nothing the server sends reaches the client until the client has sent
that many more messages (the answer to the websocket upgrade itself is
never held). A client that waits for an answer before its last request
never gets one, and the test's own deadline fails it.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from tcp_proxy import TcpProxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from message_taps import WebSocketMessages  # noqa: E402

__all__ = ["MessageGate"]


class MessageGate(TcpProxy):
    """A :class:`TcpProxy` that counts websocket messages: :attr:`sent` (client →
    server) and :attr:`answered` (server → client), over all its connections."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.sent = 0
        self.answered = 0
        self._held_until: int | None = None
        self._changed = threading.Condition()
        super().__init__(target_host, target_port)

    @classmethod
    def for_url(cls, url: str) -> MessageGate:
        host, _, port = url.removeprefix("ws://").rstrip("/").rpartition(":")
        return cls(host, int(port))

    def hold_answers(self, until_sent: int) -> None:
        """Hold what the server sends until the client has sent ``until_sent`` more messages."""
        with self._changed:
            self._held_until = self.sent + until_sent

    def open(self) -> None:
        """Let the server's messages through again (a test that failed unblocks its client)."""
        with self._changed:
            self._held_until = None
            self._changed.notify_all()

    @property
    def holding(self) -> bool:
        with self._changed:
            return self._held_until is not None

    def counts(self) -> tuple[int, int]:
        """``(sent, answered)`` now."""
        with self._changed:
            return self.sent, self.answered

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        upward = up
        tap = WebSocketMessages()
        head = b""  # the answer to the HTTP upgrade, never held: no message comes before it
        try:
            while data := src.recv(65536):
                if not upward and head is not None:
                    head += data
                    if b"\r\n\r\n" in head:
                        head = None
                    with self._changed:
                        self.answered += tap.feed(data)
                    dst.sendall(data)
                    continue
                if upward:
                    dst.sendall(data)
                    with self._changed:
                        self.sent += tap.feed(data)
                        if self._held_until is not None and self.sent >= self._held_until:
                            self._held_until = None
                        self._changed.notify_all()
                else:
                    with self._changed:
                        self._changed.wait_for(lambda: self._held_until is None or self._closed)
                        self.answered += tap.feed(data)
                    dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.open()
        super().close()
