"""The code that runs inside a worker: an ipykernel plus variable transfer.

Started as ``python -m remote_gpu_server.worker_kernel -f CONNECTION_FILE``
with ``CUDA_VISIBLE_DEVICES`` already in its environment. Before it answers
its first request it imports torch (when installed) and initialises CUDA when
a GPU is visible, so that a leased worker's first cell pays neither.

Variables travel in two parts. The request and its answer go over a comm
with target :data:`COMM_TARGET`, in the kernel's main thread, in order with
the cells: ``{"op": "push"|"pull", "id": N, "names": [...], "counts": [...]}``
and ``{"id": N, "ok": true, ...}`` or ``{"id": N, "ok": false, "ename",
"evalue"}``. The buffers themselves go over a private ZMQ PAIR socket at
``RGPU_DATA_ADDR`` (an ``ipc://`` path in the server's own runtime folder),
sent without copies: carried inside Jupyter messages they measured five
times slower. A push's buffers are sent before its comm message; a pull's
after the pickling succeeded and before the comm reply.
Only this process unpickles what a client pushed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["COMM_TARGET", "main"]

COMM_TARGET = "rgpu.vars"


def _preload() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.init()


#: How long a push waits for its buffers on the data socket.
DATA_TIMEOUT_MS = 60_000


class _DataChannel:
    def __init__(self, addr: str) -> None:
        import zmq

        self._zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.linger = 0
        self.socket.bind(addr)

    def receive(self, parts: list[int]) -> list[Any]:
        """The pushed buffers; ZMQ frames are writable, so one piece is no copy."""
        from remote_gpu_kernel.protocol.serialization import join_parts

        if not self.socket.poll(DATA_TIMEOUT_MS):
            raise TimeoutError("the pushed buffers did not arrive")
        frames = self.socket.recv_multipart(copy=False)
        return join_parts([f.buffer for f in frames], parts)

    def send(self, buffers: list[Any]) -> list[int]:
        """Send buffers in frame-sized pieces, without copies; return the counts."""
        from remote_gpu_kernel.protocol.framing import CHUNK_SIZE
        from remote_gpu_kernel.protocol.serialization import split_parts

        pieces, counts = split_parts(buffers, CHUNK_SIZE)
        self.socket.send_multipart(pieces, copy=False)
        return counts


def _handle(shell: Any, channel: _DataChannel, data: dict[str, Any]) -> dict[str, Any]:
    from remote_gpu_kernel.protocol.serialization import dump_values, load_values

    op, names = data.get("op"), list(data.get("names") or [])
    if op == "push":
        buffers = channel.receive(list(data.get("parts") or []))
        values = load_values(names, list(data.get("counts") or []), buffers)
        shell.user_ns.update(values)
        return {"ok": True, "names": names}
    if op == "pull":
        missing = [n for n in names if n not in shell.user_ns]
        if missing:
            raise NameError(f"name {missing[0]!r} is not defined in the remote namespace")
        names, counts, bufs = dump_values({n: shell.user_ns[n] for n in names})
        parts = channel.send(bufs)
        return {"ok": True, "names": names, "counts": counts, "parts": parts}
    raise ValueError(f"unknown variable transfer op {op!r}")


def _comm_opener(channel: _DataChannel) -> Any:
    def on_open(comm: Any, open_msg: Any) -> None:
        from IPython import get_ipython

        shell = get_ipython()

        def on_msg(msg: dict[str, Any]) -> None:
            data = msg["content"]["data"]
            try:
                reply = _handle(shell, channel, data)
            except Exception as exc:
                reply = {"ok": False, "ename": type(exc).__name__, "evalue": str(exc)}
                if isinstance(getattr(exc, "name", None), str):
                    reply["name"] = exc.name  # type: ignore[attr-defined]
            reply["id"] = data.get("id")
            comm.send(reply)

        comm.on_msg(on_msg)

    return on_open


def main(argv: list[str] | None = None) -> None:
    from ipykernel.kernelapp import IPKernelApp

    _preload()
    app = IPKernelApp.instance()
    app.initialize(sys.argv[1:] if argv is None else argv)
    channel = _DataChannel(os.environ["RGPU_DATA_ADDR"])
    app.kernel.comm_manager.register_target(COMM_TARGET, _comm_opener(channel))
    app.start()


if __name__ == "__main__":
    main()
