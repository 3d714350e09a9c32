"""The worker's IOPub pipe, on a socket that only its own user can reach.

This module runs inside the worker (see :mod:`.kernel`).

ipykernel's IOPub thread takes the output of forked children (a
``multiprocessing`` pool started with fork, a ``DataLoader``'s workers) on
a "pipe": a ZMQ PULL socket bound to ``tcp://127.0.0.1`` on a random port.
Any process on the host can connect to it, and the thread reads each
message whole before it checks the pipe's secret: one 200 MB message sent
by another user's cell made a worker overrun its memory limit and die with
its user's variables.

:class:`PrivatePipe` is that thread with the pipe bound to an ``ipc://``
socket instead, in a fresh folder (mode 0700) of the worker's own
``/tmp``, which is private to it when it is isolated: a tmpfs in its own
mount namespace that becomes its user's at lease time (a root server), or
the sandbox's own ``/tmp`` (bubblewrap). Another user's process cannot
reach that path: not through its own ``/tmp``, and not through
``/proc/PID/root``, which needs the rights to trace the worker. The
worker's own forked children still reach it, so their output still shows.
Nothing else changes: the worker's own output never goes through the pipe.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import zmq
from ipykernel.iostream import IOPubThread
from zmq.eventloop.zmqstream import ZMQStream

__all__ = ["PrivatePipe"]


class PrivatePipe(IOPubThread):
    """ipykernel's ``IOPubThread`` with its pipe on ``ipc://`` in a folder made
    inside ``parent``; see the module docstring."""

    def __init__(self, socket: Any, parent: str | None = None, session: Any = False) -> None:
        self.pipe_folder = tempfile.mkdtemp(prefix="rgpu-iopub-", dir=parent)  # mode 0700
        self.pipe_address = f"ipc://{os.path.join(self.pipe_folder, 'pipe')}"
        super().__init__(socket, pipe=True, session=session)

    def _setup_pipe_in(self) -> None:
        # As ipykernel's, with the address changed.
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        try:
            pipe_in.bind(self.pipe_address)
        except zmq.ZMQError as exc:
            warnings.warn(f"could not bind the IOPub pipe to {self.pipe_address}: {exc}; the output of "
                          "forked processes will not show", stacklevel=2)
            self._pipe_flag = False
            pipe_in.close()
            return
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)

    def _setup_pipe_out(self) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
        # Called in a forked child: a context of its own, as ipykernel's.
        ctx: zmq.Context[Any] = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(self.pipe_address)
        return ctx, pipe_out
