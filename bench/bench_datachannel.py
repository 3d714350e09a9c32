"""The data channel alone, against what Python's TLS can carry on this machine.

    python bench/bench_datachannel.py [--mib 100] [--rounds 5]

Three measurements in one run, each the median of ``--rounds``:

- ``raw TLS``: two processes and nothing else, one sending ``--mib`` MiB in
  1 MiB ``sendall`` calls over mutual TLS 1.3 (the data channel's
  ``pinned_context`` on both ends), the other reading with ``recv_into``:
  the ceiling of any channel built on Python's ``ssl`` here;
- ``tcp``: the server's ``Worker.push`` and ``Worker.pull`` of a numpy array
  to a worker of the local launcher's ``tcp`` transport (the one a Ray node
  starts: notes and pieces over mutual TLS), no client;
- ``ipc``: the same through the shared-memory ring of a worker on this host.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import socket
import statistics
import time
from contextlib import aclosing
from typing import Any

import numpy as np

from remote_gpu_kernel.protocol import dump_values
from remote_gpu_kernel.typing import SlotId
from remote_gpu_server.local_launcher import LocalLauncher
from remote_gpu_server.notes import make_identity, pinned_context
from remote_gpu_server.slots import Slot
from remote_gpu_server.worker import Worker

MIB = 1 << 20
SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")


def _tls_reader(ports: Any, server: tuple[bytes, bytes], client_cert: bytes, total: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    raw, _ = listener.accept()
    with pinned_context(True, *server, client_cert).wrap_socket(raw, server_side=True) as conn:
        view, got = memoryview(bytearray(MIB)), 0
        while got < total:
            read = conn.recv_into(view[:min(MIB, total - got)])
            if not read:
                break
            got += read
        conn.sendall(b"k")


def raw_tls_mb_s(mib: int) -> float:
    server, client = make_identity("server"), make_identity("client")
    ports: Any = multiprocessing.Queue()
    reader = multiprocessing.Process(target=_tls_reader, args=(ports, server, client[1], mib * MIB))
    reader.start()
    raw = socket.create_connection(("127.0.0.1", ports.get()))
    with pinned_context(False, *client, server[1]).wrap_socket(raw) as conn:
        piece = memoryview(bytes(MIB))
        started = time.perf_counter()
        for _ in range(mib):
            conn.sendall(piece)
        conn.recv(1)
        seconds = time.perf_counter() - started
    reader.join()
    return mib * MIB / seconds / 1e6


async def channel_mb_s(transport: str, mib: int, rounds: int) -> tuple[float, float]:
    launcher = LocalLauncher(transport=transport, ip="127.0.0.1")
    worker = await Worker.start(launcher, [SLOT], 120)
    names, counts, buffers = dump_values({"x": np.ones(mib * MIB // 4, dtype=np.float32)})
    pushes, pulls = [], []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            reply = await worker.push(names, counts, buffers)
            assert reply.get("ok"), reply
            pushes.append(mib * MIB / (time.perf_counter() - started) / 1e6)
            started = time.perf_counter()
            reply, pieces = await worker.pull(["x"])
            assert pieces is not None, reply
            async with aclosing(pieces):
                async for _piece in pieces:
                    pass
            pulls.append(mib * MIB / (time.perf_counter() - started) / 1e6)
    finally:
        await worker.kill()
        await launcher.close()
    return statistics.median(pushes), statistics.median(pulls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    raw = statistics.median(raw_tls_mb_s(args.mib) for _ in range(args.rounds))
    tcp = asyncio.run(channel_mb_s("tcp", args.mib, args.rounds))
    ipc = asyncio.run(channel_mb_s("ipc", args.mib, args.rounds))
    print(f"machine: {platform.node()} {platform.machine()}, {multiprocessing.cpu_count()} CPUs, "
          f"{args.mib} MiB, median of {args.rounds}")
    print(f"{'raw TLS, one way':>22}: {raw:7.0f} MB/s")
    print(f"{'tcp channel push/pull':>22}: {tcp[0]:7.0f} / {tcp[1]:.0f} MB/s")
    print(f"{'ipc ring push/pull':>22}: {ipc[0]:7.0f} / {ipc[1]:.0f} MB/s")


if __name__ == "__main__":
    main()
