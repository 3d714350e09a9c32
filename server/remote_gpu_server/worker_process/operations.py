"""The server's operations on a worker (push, pull, upload, download, take on
a lease, park, restore): the worker's side of how they are asked and answered.

Runs inside the worker (see :mod:`.kernel`). An operation is a dict with
an ``op`` and an ``id``; its handler (``kernel._handle``) returns the
answer and, for a pull or a download, what sends the buffers after it.
:func:`answer` turns a handler's error into an answer (``ok: false``, its
``ename`` and ``evalue``), so every operation is answered.

It is asked on the worker's data channel (:class:`Listener`), in the
kernel's main thread, between cells (the server asks one at a time, and
none while a cell runs): an ``O`` note in, an ``R`` note out (see
:mod:`.transfer`), on the PAIR socket to a server on this host or the
sealed TLS stream to one on another. The main loop reads the channel
whenever it is idle, so an operation costs one note each way and nothing
else. They were Jupyter comm requests before: each cost the worker its
busy and idle statuses and the answer, each sent through ipykernel's IOPub
thread, and the server three IOPub messages to read; measured here on
loopback, a small push took 2.7 ms (1.3 ms of the worker's CPU) that way
and 1.3 ms (0.4) this way. The server's comm (:data:`.kernel.COMM_TARGET`)
now carries only the worker's own requests (a fetch, see :mod:`.fetch`).

An interrupt (SIGINT) stops an operation as it stops a cell: the answer is
then a ``KeyboardInterrupt``.
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
    """Serves the operations that come on the worker's data channel (see the
    module docstring), from the kernel's main loop.

    Any other note read here is left from a transfer that ended, and
    skipped, as a transfer skips it.
    """

    def __init__(self, channel: WorkerChannel, handle: Handler) -> None:
        self.channel = channel
        self.handle = handle
        #: The descriptors the main loop watches now (none while paused).
        self.fds: list[int] = []

    def start(self) -> None:
        """Watch the channel once the main loop runs (call before ``app.start()``)."""
        from tornado.ioloop import IOLoop

        IOLoop.current().add_callback(self._watch)

    def _watch(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()

        def again() -> None:
            loop.call_soon_threadsafe(self.readable)

        # A transfer (an operation's, a cell's fetch, in any thread) used the
        # channel: its descriptors signal nothing more until it is read here.
        self.channel.after_use = again
        self.readable()

    def _rewatch(self, fds: list[int]) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        for fd in self.fds:
            loop.remove_reader(fd)
        self.fds = fds
        for fd in fds:
            loop.add_reader(fd, self.readable)

    def readable(self) -> None:
        """Serve every operation waiting on the channel. A ZMQ socket's
        descriptor only signals a change, so this reads until nothing is left.
        While a transfer of another thread uses the channel, it is not
        watched: that transfer's end calls this again (``after_use``)."""
        if not self.channel.lock.acquire(blocking=False):
            self._rewatch([])
            return
        try:
            while self.channel.pending():
                note = self.channel.next_note()
                if note and note[0] == OPERATION and len(note) > 1:
                    data = parse_json(note[1])
                    if data is not None:
                        self.serve(data)
            fds = self.channel.watched()
            if fds != self.fds:
                self._rewatch(fds)
        finally:
            self.channel.lock.release()

    def serve(self, data: dict[str, Any]) -> None:
        """Answer one operation; after a pull's answer, send its buffers, then say it returned."""
        # SIGINT raises KeyboardInterrupt in here, as ipykernel lets it in a request's handler.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self._serve(data)
        except OSError as exc:  # a sealed stream broke: the server's wait fails on its own
            print(f"remote-gpu worker: the answer to operation {data.get('op')!r} was not sent: {exc}",
                  file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGINT, before)

    def _serve(self, data: dict[str, Any]) -> None:
        result, then = answer(self.handle, data)
        self.channel.socket.send_multipart(reply(result))
        if then is not None:
            try:
                then()
            except Exception as exc:  # the server's read of the buffers fails on its own
                print(f"remote-gpu worker: operation {data.get('op')!r} failed after its answer: {exc}",
                      file=sys.stderr, flush=True)
            finally:
                self.channel.socket.send_multipart(returned(int(data["id"])))
