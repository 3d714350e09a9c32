"""The server's operations on a worker (push, pull, upload, download, take on
a lease, park, restore): the worker's side of how they are asked and answered.

Runs inside the worker (see :mod:`.kernel`). An operation is a dict with
an ``op`` and an ``id``; its handler (``kernel._handle``) returns the
answer and, for a pull or a download, what sends the buffers after it.
:func:`answer` turns a handler's error into an answer (``ok: false``, its
``ename`` and ``evalue``), so every operation is answered.

It is asked one of two ways, both in the kernel's main thread and between
cells (the server asks one at a time, and none while a cell runs):

* on the data channel's own socket, where the worker runs on this host
  (:class:`Listener`): an ``O`` note in, an ``R`` note out (see
  :mod:`.transfer`). The main loop reads the socket whenever it is idle,
  so an operation costs one note each way and nothing else. As a Jupyter
  comm request, each cost the worker its busy and idle statuses and the
  answer, each sent through ipykernel's IOPub thread, and the server three
  IOPub messages to read: measured here on loopback, a small push took
  2.7 ms (1.3 ms of the worker's CPU) that way and 1.3 ms (0.4) this way.
* on the server's comm (:data:`.kernel.COMM_TARGET`), where the data
  channel is a sealed TLS stream to a server on another host: the request
  is a ``comm_msg``, the answer a message on the same comm.

An interrupt (SIGINT) stops an operation on either path as it stops a
cell: the answer is then a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from .channel import WorkerChannel
from .transfer import OPERATION, parse_json, reply, returned

__all__ = ["Handler", "Listener", "Then", "answer"]

#: What runs after an answer is sent (a pull's buffers), or None.
Then = Callable[[], None] | None
#: An operation's handler: ``(answer, then)``.
Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], Then]]


def answer(handle: Handler, data: dict[str, Any]) -> tuple[dict[str, Any], Then]:
    """``handle(data)``, with an error as the answer; the answer carries the operation's ``id``."""
    then: Then = None
    try:
        result, then = handle(data)
    except (Exception, KeyboardInterrupt) as exc:
        result = {"ok": False, "ename": type(exc).__name__, "evalue": str(exc)}
        name = getattr(exc, "name", None)  # a NameError's
        if isinstance(name, str):
            result["name"] = name
    result["id"] = data.get("id")
    return result, then


class Listener:
    """Serves the operations that come on the data channel's PAIR ``socket``
    (see the module docstring), from the kernel's main loop.

    Any other note read here is left from a transfer that ended, and
    skipped, as a transfer skips it.
    """

    def __init__(self, channel: WorkerChannel, handle: Handler) -> None:
        self.channel = channel
        self.socket = channel.socket
        self.handle = handle
        self.fd = -1
        #: Whether the main loop watches the socket's descriptor now.
        self.watching = False

    def start(self) -> None:
        """Watch the socket once the main loop runs (call before ``app.start()``)."""
        from tornado.ioloop import IOLoop

        IOLoop.current().add_callback(self._watch)

    def _watch(self) -> None:
        import asyncio
        import zmq

        loop = asyncio.get_running_loop()
        self.fd = self.socket.getsockopt(zmq.FD)
        self.watching = True
        loop.add_reader(self.fd, self.readable)

        def again() -> None:
            loop.call_soon_threadsafe(self.resume)

        # A transfer (an operation's, a cell's fetch, in any thread) read the
        # socket: its descriptor signals nothing more until it is read here.
        self.channel.after_use = again
        self.readable()  # what came before the loop ran

    def resume(self) -> None:
        """Watch the socket again (a transfer of another thread is over) and read it."""
        if not self.watching:
            import asyncio

            asyncio.get_running_loop().add_reader(self.fd, self.readable)
            self.watching = True
        self.readable()

    def readable(self) -> None:
        """Serve every operation waiting on the socket. Its descriptor only
        signals a change, so this reads until nothing is left. While a
        transfer of another thread uses the socket, it is not watched: that
        transfer's end brings this back (:meth:`resume`)."""
        import asyncio
        import zmq

        if not self.channel.lock.acquire(blocking=False):
            asyncio.get_running_loop().remove_reader(self.fd)
            self.watching = False
            return
        try:
            while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                kind, payload, *_ = self.socket.recv_multipart(zmq.NOBLOCK)
                if kind == OPERATION:
                    data = parse_json(payload)
                    if data is not None:
                        self.serve(data)
        finally:
            self.channel.lock.release()

    def serve(self, data: dict[str, Any]) -> None:
        """Answer one operation; after a pull's answer, send its buffers, then say it returned."""
        # SIGINT raises KeyboardInterrupt in here, as ipykernel lets it in a request's handler.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            result, then = answer(self.handle, data)
            self.socket.send_multipart(reply(result))
            if then is not None:
                try:
                    then()
                except Exception as exc:  # the server's read of the buffers fails on its own
                    print(f"remote-gpu worker: operation {data.get('op')!r} failed after its answer: {exc}",
                          file=sys.stderr, flush=True)
                finally:
                    self.socket.send_multipart(returned(int(data["id"])))
        finally:
            signal.signal(signal.SIGINT, before)
