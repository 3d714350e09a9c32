"""The worker's end of its data channel (see :mod:`.transfer`): the
transfers' notes and bytes, and (through :mod:`.operations`) the server's
operations.

A stream (:mod:`.streams`): one end of a Unix socket pair, with the
pieces in a shared ring, where the server runs on this host; a sealed TLS
stream (:class:`~.sealed.BlockingTls`) where it runs on another. The
stream is read and written here in the kernel's main thread, while a
handler of an operation or a cell's fetch waits for its notes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from .streams import BlockingStream, PlainStream

__all__ = ["DATA_TIMEOUT_MS", "WorkerChannel"]

#: How long one end of a transfer waits for the next note from the server.
DATA_TIMEOUT_MS = 60_000


class WorkerChannel:
    """The worker's end of :mod:`.transfer`: notes on this worker's end of
    the server's socket pair (an ``fd://N`` address) with the bytes in the
    shared ring (``ring_fd``), or, for a server on another host
    (a ``tls://`` address), notes and bytes in sealed records opened with
    mutual TLS (``tls``: this worker's key and certificate and the server's
    certificate, PEM)."""

    def __init__(self, addr: str, ring_fd: int | None, tls: tuple[bytes, bytes, bytes] | None = None) -> None:
        from .transfer import Inline, Ring, Slots

        self.socket: BlockingStream
        if addr.startswith("tls://"):
            from .sealed import BlockingTls, pinned_context

            assert tls is not None, "a tls:// data channel needs its keys"
            host, _, port = addr[len("tls://"):].rpartition(":")
            self.socket = BlockingTls(host.strip("[]"), int(port), pinned_context(True, *tls))
        else:  # fd://N: this worker's end of the socket pair the server made
            sock = socket.socket(fileno=int(addr[len("fd://"):]))
            sock.setblocking(True)
            sock.set_inheritable(False)  # not the user's subprocesses'
            self.socket = BlockingStream(PlainStream(sock))
        #: Called after a transfer used the socket: the listener does not watch
        #: it while another thread holds :attr:`lock`, and a sealed stream may
        #: have been replaced, so it must look again (see :class:`.operations.Listener`).
        self.after_use: Callable[[], None] | None = None
        #: Held by whoever reads or writes the socket: a transfer, in whichever
        #: thread (a cell's thread may open a file that is fetched), or the
        #: operations' listener. Two readers would split a note between them.
        self.lock = threading.RLock()
        self.ring: Slots
        if ring_fd is not None:
            self.ring = Ring(ring_fd)
            os.close(ring_fd)  # mapped: the user's code has no handle on it
        else:
            self.ring = Inline()

    def _recv(self) -> list[Any]:
        if not self.socket.poll(DATA_TIMEOUT_MS):
            raise TimeoutError("the server stopped sending in the middle of a transfer")
        frames: list[Any] = self.socket.recv_multipart()
        return frames

    # -- what the operations' listener uses, under :attr:`lock` ----------------

    def watched(self) -> list[int]:
        """The descriptors to watch for :meth:`pending` (they change as a sealed stream is replaced)."""
        return self.socket.watched()

    def pending(self) -> bool:
        """Whether a note waits."""
        return self.socket.pending()

    def next_note(self) -> list[Any] | None:
        """The note that :meth:`pending` saw; None if the stream broke on it."""
        try:
            return list(self.socket.recv_multipart())
        except (OSError, ValueError):
            return None  # a sealed stream: the server connects again when it next asks

    def receive(self, tid: int, sink: Callable[[list[int]], Any] | None = None) -> Any:
        """The buffers of transfer ``tid``, each in fresh writable memory.

        With ``sink``, the pieces go to ``sink(sizes)`` instead (an object
        with ``add(piece)`` and ``done``, as :class:`~.transfer.Filler`),
        which is returned.
        """
        try:
            with self.lock:
                return self._receive(tid, sink)
        finally:
            self._used()

    def send(self, tid: int, buffers: list[Any]) -> None:
        """Send ``buffers`` through the ring, as fast as the server frees slots.

        Stops early, telling the server, if the server gives up or goes
        quiet or the user interrupts; the pull then fails on the server.
        """
        try:
            with self.lock:
                self._send(tid, buffers)
        finally:
            self._used()

    def _used(self) -> None:
        """The socket was read and written outside :attr:`after_use`'s watch."""
        if self.after_use is not None:
            self.after_use()

    def _receive(self, tid: int, sink: Callable[[list[int]], Any] | None) -> Any:
        from remote_gpu_core.errors import ProtocolError

        from .transfer import ABORT, DATA, END, HEADER, Filler, abort, parse_abort, parse_header, tid_of

        ring = self.ring
        ring.begin(tid)
        while True:  # skip what is left of transfers that were given up
            kind, payload, *_ = self._recv()
            if kind == HEADER:
                got, sizes = parse_header(payload)
                if got == tid:
                    break
            elif kind == ABORT and tid_of(payload) == tid:  # refused before it began (a fetch)
                from .fetch import FetchNotSent

                raise FetchNotSent(parse_abort(payload)[1])
        filler = Filler(sizes) if sink is None else sink(sizes)
        try:
            while True:
                kind, payload, *rest = self._recv()
                if kind == DATA:
                    taken = ring.take(payload, rest)
                    if taken is not None:
                        filler.add(taken[0])
                        self.socket.send_multipart(taken[1])
                elif kind == END and tid_of(payload) == tid:
                    if not filler.done:
                        raise ConnectionError("the push ended before all its bytes came")
                    return filler if sink is not None else filler.buffers
                elif kind == ABORT and tid_of(payload) == tid:
                    raise ConnectionError("the push was cut short: " + parse_abort(payload)[1])
        except (TimeoutError, ProtocolError, ValueError) as exc:
            self.socket.send_multipart(abort(tid, str(exc)))  # the server stops sending
            raise

    def give_up(self, tid: int, reason: str) -> None:
        """Tell the server to stop sending transfer ``tid``."""
        from .transfer import abort

        with self.lock:
            self.socket.send_multipart(abort(tid, reason))

    def _send(self, tid: int, buffers: list[Any]) -> None:
        from .transfer import abort, end, pieces

        ring = self.ring
        ring.begin(tid)
        try:
            for piece in pieces(buffers):
                while not ring.free:
                    kind, payload, *_ = self._recv()
                    if ring.answer(kind, payload) is not None:
                        return  # the server gave up
                self.socket.send_multipart(ring.put(piece), copy=False)
        except (TimeoutError, KeyboardInterrupt) as exc:
            self.socket.send_multipart(abort(tid, str(exc) or "interrupted"))
            return
        self.socket.send_multipart(end(tid))
