"""How long a round trip and how fast a bulk send really are through an emulated link.

:class:`EchoServer` listens on loopback in a thread of its own. A
connection that begins with ``E`` is echoed, whatever it sends; one that
begins with ``B`` and an 8-byte length is answered ``r`` (ready), then
``k`` once that many bytes have arrived. Through a proxy (:mod:`link`):

* :func:`first_exchange`: a connect and one small exchange, the TCP
  handshake included (two round trips on a real link);
* :func:`round_trips`: small exchanges on one open connection;
* :func:`bulk_rate`: ``nbytes`` one way; the rate is the bytes over the
  time less one round trip (the last byte's way there and the answer's
  way back).

The benchmark prints these for each link it emulates, and the tests check
the emulator with them.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

__all__ = ["EchoServer", "bulk_rate", "first_exchange", "round_trips"]

#: The bytes of each small exchange.
PING = b"x" * 64


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        got = sock.recv(nbytes - len(data))
        if not got:
            raise ConnectionError(f"the connection ended after {len(data)} of {nbytes} bytes")
        data += got
    return bytes(data)


class EchoServer:
    """An echo and bulk sink on ``127.0.0.1:``:attr:`port`; :meth:`close` (or ``with``) ends it."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="echo-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(1 << 20)
        try:
            mode = _recv_exactly(conn, 1)
            if mode == b"E":
                while n := conn.recv_into(buffer):
                    conn.sendall(memoryview(buffer)[:n])
            elif mode == b"B":
                left = int.from_bytes(_recv_exactly(conn, 8), "big")
                conn.sendall(b"r")
                while left > 0:
                    n = conn.recv_into(buffer, min(left, len(buffer)))
                    if not n:
                        return
                    left -= n
                conn.sendall(b"k")
        except OSError:
            pass  # the client went away, or the server is closing
        finally:
            conn.close()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def first_exchange(port: int) -> float:
    """Seconds from ``connect`` to the answer of the first small message sent on it."""
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(b"E" + PING)
        _recv_exactly(sock, len(PING))
        return time.perf_counter() - started


def round_trips(port: int, count: int) -> list[float]:
    """Seconds of each of ``count`` small exchanges on one connection (after a first, untimed)."""
    with _connect(port) as sock:
        sock.sendall(b"E" + PING)
        _recv_exactly(sock, len(PING))
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(PING)
            _recv_exactly(sock, len(PING))
            seconds.append(time.perf_counter() - started)
        return seconds


def bulk_rate(port: int, nbytes: int, rtt: float) -> float:
    """Bit/s of sending ``nbytes`` one way on an open connection, the ``rtt`` of the answer taken off."""
    payload = bytes(nbytes)
    with _connect(port) as sock:
        sock.sendall(b"B" + nbytes.to_bytes(8, "big"))
        if _recv_exactly(sock, 1) != b"r":
            raise ConnectionError("the echo server did not get ready for a bulk send")
        started = time.perf_counter()
        sock.sendall(payload)
        if _recv_exactly(sock, 1) != b"k":
            raise ConnectionError("the echo server did not confirm the bulk send")
        seconds = time.perf_counter() - started
    return nbytes * 8 / max(seconds - rtt, 1e-9)
