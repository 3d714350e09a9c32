"""The data channel alone, against what Python's TLS can carry on this machine.

    python bench/bench_datachannel.py [--mib 100] [--rounds 5] [--smoke]

Four measurements in one run, each the median of ``--rounds``:

- ``Python TLS``: two processes and nothing else, one sending ``--mib`` MiB
  in 1 MiB ``sendall`` calls over mutual TLS 1.3 (``ssl.SSLSocket`` with
  the data channel's ``pinned_context`` on both ends), the other reading
  with ``recv_into``: the ceiling of a channel built on TLS records;
- ``sealed``: the same over the data channel's own stream (``open_stream``:
  that TLS handshake, then AES-256-GCM records);
- ``tcp``: the server's ``Worker.push`` and ``Worker.pull`` of a numpy array
  to a worker of the local launcher's ``tcp`` transport (the one a Ray node
  starts: notes and pieces in sealed records), no client;
- ``ipc``: the same through the shared-memory ring of a worker on this host.

Transfers start after ``--warmup`` unmeasured rounds (default
:data:`WARMUP`): a process's first
allocations of 100 MiB cost up to ten times the later ones here (the kernel
finds and zeroes their pages), whatever carries the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import numpy as np

from remote_gpu_core.protocol import dump_values
from remote_gpu_core.ids import SlotId
from remote_gpu_server.workers.local_launcher import LocalLauncher
from remote_gpu_server.worker_process.sealed import open_stream, pinned_context
from remote_gpu_server.workers.carriers import make_identity
from remote_gpu_server.gpus.slots import Slot
from remote_gpu_server.workers.worker import Worker

from reporting import finish, parse_args

MIB = 1 << 20
WARMUP = 3
SMOKE = {"mib": 4, "rounds": 1, "warmup": 0}
SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")


def _connection(raw: socket.socket, kind: str, server_side: bool, key: bytes, cert: bytes,
                peer: bytes) -> tuple[Any, Callable[[Any], None]]:
    """The stream of ``kind`` on ``raw`` and how to write bytes to it."""
    context = pinned_context(server_side, key, cert, peer)
    if kind == "sealed":
        stream = open_stream(raw, context, server_side)
        return stream, lambda data: stream.send_parts([data])
    tls = context.wrap_socket(raw, server_side=server_side)
    return tls, tls.sendall


def _reader(kind: str, ports: Any, server: tuple[bytes, bytes], client_cert: bytes, total: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    raw, _ = listener.accept()
    conn, send = _connection(raw, kind, True, *server, client_cert)
    view, got = memoryview(bytearray(MIB)), 0
    while got < total:
        read = conn.recv_into(view[:min(MIB, total - got)])
        if not read:
            break
        got += read
    send(b"k")
    conn.close()


def one_way_mb_s(kind: str, mib: int) -> float:
    """``kind``: ``tls`` (``ssl.SSLSocket``) or ``sealed`` (the data channel's stream)."""
    server, client = make_identity("server"), make_identity("client")
    ports: Any = multiprocessing.Queue()
    reader = multiprocessing.Process(target=_reader, args=(kind, ports, server, client[1], mib * MIB))
    reader.start()
    key, cert = client
    conn, send = _connection(socket.create_connection(("127.0.0.1", ports.get())), kind, False,
                             key, cert, server[1])
    piece = memoryview(bytes(MIB))
    started = time.perf_counter()
    for _ in range(mib):
        send(piece)
    conn.recv_into(memoryview(bytearray(1)))
    seconds = time.perf_counter() - started
    conn.close()
    reader.join()
    return mib * MIB / seconds / 1e6


async def channel_mb_s(transport: str, mib: int, rounds: int, warmup: int = WARMUP) -> tuple[float, float]:
    launcher = LocalLauncher(transport=transport, ip="127.0.0.1")
    worker = await Worker.start(launcher, [SLOT], 120)
    names, counts, buffers = dump_values({"x": np.ones(mib * MIB // 4, dtype=np.float32)})
    pushes, pulls = [], []
    try:
        for round_ in range(warmup + rounds):
            measured = round_ >= warmup
            started = time.perf_counter()
            reply = await worker.push(names, counts, buffers)
            assert reply.get("ok"), reply
            if measured:
                pushes.append(mib * MIB / (time.perf_counter() - started) / 1e6)
            started = time.perf_counter()
            reply, pieces = await worker.pull(["x"])
            assert pieces is not None, reply
            async with aclosing(pieces):
                async for _piece in pieces:
                    pass
            if measured:
                pulls.append(mib * MIB / (time.perf_counter() - started) / 1e6)
    finally:
        await worker.kill()
        await launcher.close()
    return statistics.median(pushes), statistics.median(pulls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="channel rounds run first, not measured")
    args = parse_args(parser, SMOKE)
    tls = statistics.median(one_way_mb_s("tls", args.mib) for _ in range(args.rounds))
    sealed = statistics.median(one_way_mb_s("sealed", args.mib) for _ in range(args.rounds))
    tcp = asyncio.run(channel_mb_s("tcp", args.mib, args.rounds, args.warmup))
    ipc = asyncio.run(channel_mb_s("ipc", args.mib, args.rounds, args.warmup))
    print(f"{args.mib} MiB, median of {args.rounds}")
    print(f"{'Python TLS, one way':>22}: {tls:7.0f} MB/s")
    print(f"{'sealed, one way':>22}: {sealed:7.0f} MB/s")
    print(f"{'tcp channel push/pull':>22}: {tcp[0]:7.0f} / {tcp[1]:.0f} MB/s")
    print(f"{'ipc ring push/pull':>22}: {ipc[0]:7.0f} / {ipc[1]:.0f} MB/s")
    finish(args, ("cryptography",))


if __name__ == "__main__":
    main()
