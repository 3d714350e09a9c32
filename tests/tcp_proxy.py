"""A loopback TCP proxy whose connections a test can cut, and that can keep what it carries.

The Remote GPU kernel's tests put it between the kernel and a real server
(``RGPU_URL`` points at the proxy) and call :meth:`TcpProxy.drop` to break
every open connection at the TCP level, as a network failure would: both
sockets are shut down, the server and the client each see their websocket
close without a closing handshake. New connections are still accepted
afterwards, so the client can reconnect. Nothing in the product has a
test-only hook for this. With ``keep``, every byte it forwards, both ways,
is kept in :attr:`TcpProxy.carried`, for tests that look for what crosses
in clear; :attr:`TcpProxy.up` and :attr:`TcpProxy.down` count the bytes
each way.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``; :meth:`drop` cuts, :meth:`close` ends."""

    def __init__(self, target_host: str, target_port: int, *, keep: bool = False) -> None:
        self.target = (target_host, target_port)
        #: What it forwarded, both ways, where ``keep`` is set.
        self.carried = bytearray()
        self._keep = keep
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        #: Bytes forwarded so far towards the target (``up``) and back (``down``).
        self.up = 0
        self.down = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        host, _, port = url.removeprefix("ws://").rstrip("/").rpartition(":")
        return cls(host, int(port))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    if self._keep:
                        self.carried += data
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def drop(self) -> int:
        """Cut every open connection; return how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self.drop()
        self._listener.close()
