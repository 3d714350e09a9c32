"""A client that speaks the protocol by hand, for tests that send what the real client never would.

:class:`RawClient` opens a websocket to a :class:`~servers.ServerProcess`,
sends messages or raw frames, and reads answers with a protocol
:class:`~remote_gpu_core.protocol.Reader`. :func:`stalled_socket` makes a
TCP socket whose receive buffer is tiny, for a client that stops reading;
:func:`half_frame_socket` a websocket that starts a frame and is left to
send it piece by piece, or never.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from remote_gpu_core.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_core.protocol import messages as m

__all__ = ["RawClient", "half_frame_socket", "server_backlog", "stalled_socket"]


def stalled_socket(url: str) -> socket.socket:
    """A connected TCP socket to ``url``'s server with a receive buffer of a
    few KiB: a client on it that stops reading stops the server's sends soon."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    return sock


def half_frame_socket(url: str, token: str) -> tuple[int, bytes, socket.socket | None]:
    """A websocket opened by hand that has sent the head of a 1 MiB binary
    frame and none of its payload: ``(status, body, socket)``. The caller
    sends payload bytes (at most 1 MiB) on the socket; it gets None (and
    the refusal's status and body) when the server did not switch protocols."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    if status != 101:
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        sock.close()
        return status, body, None
    # FIN, binary; masked (as a client must), 64-bit length 1 MiB; a zero mask.
    sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 1 << 20) + bytes(4))
    return status, b"", sock


def server_backlog(sock: socket.socket) -> int:
    """Bytes the server's end of ``sock``'s connection has queued in the kernel,
    unread by us (Linux, IPv4 loopback: from /proc/net/tcp)."""
    ours = "%08X:%04X" % (int.from_bytes(socket.inet_aton(sock.getsockname()[0]), "little"),
                          sock.getsockname()[1])
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[2] == ours:  # the server's socket: its remote end is ours
                return int(fields[4].split(":")[0], 16)
    return 0


class RawClient:
    """One websocket with a token; ``with RawClient(url, token) as c: ...``."""

    def __init__(self, url: str, token: str, *, sock: socket.socket | None = None,
                 max_queue: int | None = 16) -> None:
        self._connecting = connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None,
            max_size=None, sock=sock, max_queue=max_queue, open_timeout=30)
        self.ws: ClientConnection = self._connecting.__enter__()
        self.reader = Reader()
        self._pending: list[m.Message] = []

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._connecting.__exit__(None, None, None)

    def wait_until_stalled(self, timeout: float = 30) -> None:
        """Return once the server's sends to this client are stuck: a backlog
        of over 1 MiB in the kernel that no longer grows (we read nothing)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            backlog = server_backlog(self.ws.socket)
            if backlog > 1 << 20 and backlog == last:
                return
            last = backlog
            time.sleep(0.2)
        raise AssertionError(f"the server's sends did not stall (backlog {last} bytes)")

    def drain_and_close(self) -> None:
        """Read whatever the server still sends (a client that stalled resumes), then close."""
        try:
            while True:
                self.ws.recv(timeout=5)
        except (TimeoutError, ConnectionClosed):
            pass
        self.close()

    def send(self, message: m.Message) -> None:
        for frame in encode(message):
            self.ws.send(frame)

    def send_raw(self, data: Any) -> None:
        self.ws.send(data)

    def receive(self, timeout: float = 30) -> m.Message:
        """The next message; TimeoutError if none comes in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            self.reader.receive_data(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            self._pending.extend(self.reader.events_received())
        return self._pending.pop(0)

    def answer(self, req: int, *kinds: type[m.Message], timeout: float = 30) -> m.Message:
        """The next message for request ``req`` of one of ``kinds`` (or an Error);
        other messages on the way are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(max(0.01, deadline - time.monotonic()))
            if getattr(msg, "req", None) == req and isinstance(msg, (*kinds, m.Error)):
                return msg

    def hello(self) -> m.Welcome:
        self.send(m.Hello(PROTOCOL_VERSION, "raw-test"))
        welcome = self.receive()
        assert isinstance(welcome, m.Welcome), welcome
        return welcome

    def lease(self, req: int = 1, **fields: Any) -> m.LeaseGranted:
        self.send(m.LeaseRequest(req, **fields))
        granted = self.answer(req, m.LeaseGranted, timeout=60)
        assert isinstance(granted, m.LeaseGranted), granted
        return granted
