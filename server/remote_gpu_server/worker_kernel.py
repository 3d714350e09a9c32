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
as described in :mod:`.transfer`. A push's comm message comes first and its
handler reads the buffers as the server forwards them; a pull's buffers are
sent once the pickling succeeded, before the comm reply.
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

        self.socket = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.linger = 0
        # No high-water mark: a large pull is queued whole before the server
        # reads it (it reads after the comm reply), and must not block here.
        self.socket.sndhwm = self.socket.rcvhwm = 0
        self.socket.bind(addr)

    def _recv(self) -> tuple[bytes, Any]:
        if not self.socket.poll(DATA_TIMEOUT_MS):
            raise TimeoutError("the pushed buffers did not arrive")
        kind, payload = self.socket.recv_multipart(copy=False)
        return kind.bytes, payload.buffer

    def receive(self, tid: int) -> list[Any]:
        """The buffers of transfer ``tid``, each in fresh writable memory."""
        from .transfer import ABORT, DATA, END, HEADER, Filler, parse_header

        while True:  # skip what is left of transfers that were given up
            kind, payload = self._recv()
            if kind == HEADER:
                got, sizes = parse_header(payload)
                if got == tid:
                    break
        filler = Filler(sizes)
        while True:
            kind, payload = self._recv()
            if kind == DATA:
                filler.add(payload)
            elif kind == END and filler.done:
                return filler.buffers
            elif kind in (END, ABORT):
                raise ConnectionError("the push was cut short: " + bytes(payload).decode(errors="replace"))

    def send(self, tid: int, buffers: list[Any]) -> list[int]:
        """Send buffers in frame-sized pieces, without copies; return their sizes."""
        from .transfer import DATA, END, header, pieces

        sizes = [memoryview(b).nbytes for b in buffers]
        self.socket.send_multipart(header(tid, sizes))
        for piece in pieces(buffers):
            self.socket.send_multipart([DATA, piece], copy=False)
        self.socket.send_multipart([END, b""])
        return sizes


def _handle(shell: Any, channel: _DataChannel, data: dict[str, Any]) -> dict[str, Any]:
    from remote_gpu_kernel.protocol.serialization import dump_values, load_values

    op, names = data.get("op"), list(data.get("names") or [])
    if op == "push":
        buffers = channel.receive(int(data["id"]))
        values = load_values(names, list(data.get("counts") or []), buffers)
        shell.user_ns.update(values)
        return {"ok": True, "names": names}
    if op == "pull":
        missing = [n for n in names if n not in shell.user_ns]
        if missing:
            raise NameError(f"name {missing[0]!r} is not defined in the remote namespace")
        names, counts, bufs = dump_values({n: shell.user_ns[n] for n in names})
        sizes = channel.send(int(data["id"]), bufs)
        return {"ok": True, "names": names, "counts": counts, "sizes": sizes}
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
    from remote_gpu_kernel.iostreams import skip_empty_flushes

    for stream in (sys.stdout, sys.stderr):  # ipykernel's OutStreams, made by initialize()
        skip_empty_flushes(stream)
    channel = _DataChannel(os.environ["RGPU_DATA_ADDR"])
    app.kernel.comm_manager.register_target(COMM_TARGET, _comm_opener(channel))
    app.start()


if __name__ == "__main__":
    main()
