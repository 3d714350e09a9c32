"""Issue benchmarks for the server, the client and the warm pool, in one run.

    python bench/bench_core.py [--runs 300] [--mib 100]

1. a trivial cell through ``session.execute`` against the same cell sent to
   a local ipykernel through jupyter_client (reply and idle both awaited);
2. push and pull of 100 MiB float32 (numpy and torch) against ipyparallel's
   push and pull with one engine, the four transfers taking turns;
3. a lease of a warm worker against starting a cold kernel that imports torch.

It starts its own server (``rgpu serve --slots cpu:2``) on a free port with
a throw-away SQLite file, and prints a table of medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client  # noqa: E402


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def interleaved_ms(ops: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each op, the ops taking turns in every round.

    Taking turns keeps a change of the machine's load, or a process's first
    allocations of 100 MiB, from landing on one kind of transfer only.
    """
    times: dict[str, list[float]] = {name: [] for name in ops}
    for round_ in range(warmup + runs):
        for name, op in ops.items():
            t = time.perf_counter()
            op()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def transfer_ops(push: Callable[[object], object], pull: Callable[[], object],
                 arrays: dict[str, object]) -> dict[str, Callable[[], object]]:
    ops: dict[str, Callable[[], object]] = {}
    for name, value in arrays.items():
        ops[f"push {name}"] = lambda value=value: push(value)  # type: ignore[misc]
        ops[f"pull {name}"] = pull
    return ops


def local_kernel_cell(runs: int) -> float:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)

    def cell() -> None:
        msg_id = kc.execute("1+1")
        idle = reply = False
        while not (idle and reply):
            if not reply:
                if kc.get_shell_msg(timeout=10)["parent_header"].get("msg_id") == msg_id:
                    reply = True
            while not idle:
                msg = kc.get_iopub_msg(timeout=10)
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    idle = True

    try:
        return median_ms(cell, runs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def cold_torch_kernel(runs: int) -> float:
    from jupyter_client.manager import KernelManager

    def start() -> None:
        km = KernelManager(kernel_name="python3")
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        kc.execute_interactive("import torch", timeout=120, output_hook=lambda _: None)
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    return median_ms(start, runs, warmup=1)


def ipyparallel_transfer(arrays: dict[str, object], runs: int) -> dict[str, float]:
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=120)
        view = rc[0]
        view.block = True
        view.execute("import numpy, torch")
        return interleaved_ms(transfer_ops(lambda v: view.push({"v": v}), lambda: view.pull("v"),
                                           arrays), runs)
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def raw_websockets(payload: bytes, runs: int) -> dict[str, float]:
    """The ceiling: 1 MiB binary messages one way over loopback, no framing of ours."""
    import asyncio
    import threading

    from websockets.asyncio.server import serve
    from websockets.sync.client import connect

    chunk = 1 << 20
    got = threading.Event()
    ready = threading.Event()
    port: list[int] = []

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        while True:
            received = 0
            async for message in ws:
                received += len(message)
                if received >= len(payload):
                    break
            if received == 0:
                return
            got.set()
            await ws.send(b"ok")

    async def run_server() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=chunk) as server:
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            await asyncio.Future()

    threading.Thread(target=lambda: asyncio.run(run_server()), daemon=True).start()
    ready.wait(10)
    view = memoryview(payload)
    with connect(f"ws://127.0.0.1:{port[0]}", compression=None, max_size=chunk) as ws:
        def send() -> None:
            for i in range(0, len(payload), chunk):
                ws.send(view[i : i + chunk])
            ws.recv()

        return {"one way": median_ms(send, runs, warmup=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="trivial cells per side")
    parser.add_argument("--transfers", type=int, default=7, help="transfers per kind and side")
    parser.add_argument("--leases", type=int, default=15, help="leases / cold starts")
    parser.add_argument("--mib", type=int, default=100, help="size of the transferred arrays")
    args = parser.parse_args()

    import torch

    n = args.mib * (1 << 20) // 4
    arrays = {"numpy": np.random.default_rng(0).random(n, dtype=np.float32),
              "torch": torch.rand(n, dtype=torch.float32)}
    rows: list[tuple[str, float, str, float, str]] = []

    tmp = Path(tempfile.mkdtemp(prefix="rgpu-bench-"))
    server = ServerProcess(tmp, "cpu:2").start()
    try:
        client = Client(server.url, server.token("bench"))
        with client.session() as session:
            ours = median_ms(lambda: session.execute("1+1", on_output=lambda _: None), args.runs)
            theirs = local_kernel_cell(args.runs)
            rows.append(("trivial cell (ms)", ours, "local ipykernel", theirs, "≤ 1.5×"))

            transfer = interleaved_ms(transfer_ops(lambda v: session.push(v=v), lambda: session.pull("v"),
                                                   arrays), args.transfers)
        peer = ipyparallel_transfer(arrays, args.transfers)
        ceiling = raw_websockets(arrays["numpy"].tobytes(), args.transfers)["one way"]
        for key, ms in transfer.items():
            rows.append((f"{key} {args.mib} MiB (MB/s)", args.mib * 1.048576 / ms * 1000, "ipyparallel",
                         args.mib * 1.048576 / peer[key] * 1000, "≥ 2× and > 1000"))
        rows.append((f"raw websockets {args.mib} MiB (MB/s)", args.mib * 1.048576 / ceiling * 1000,
                     "(ceiling: 1 MiB messages)", args.mib * 1.048576 / ceiling * 1000, "-"))

        lease_ms = []
        for _ in range(args.leases):
            wait_warm(server, 2)
            t = time.perf_counter()
            s = client.session()
            lease_ms.append((time.perf_counter() - t) * 1000)
            s.release()
        wait_warm(server, 2)
        cold = cold_torch_kernel(max(3, args.leases // 5))
        rows.append(("lease of a warm worker (ms)", statistics.median(lease_ms), "cold kernel + import torch",
                     cold, "< 50 ms"))
    finally:
        server.stop()

    print(f"\n{'what':34} {'ours':>10} {'peer':>28} {'peer value':>11} {'ratio':>7}  target")
    for what, ours_v, peer_name, peer_v, target in rows:
        ratio = ours_v / peer_v
        print(f"{what:34} {ours_v:10.2f} {peer_name:>28} {peer_v:11.2f} {ratio:6.2f}×  {target}")
    print(f"\n{time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, Python {sys.version.split()[0]}")


def wait_warm(server: ServerProcess, slots: int, timeout: float = 120) -> None:
    """Wait until every slot has a warm worker: workers started = slots + releases."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = sum("ready on" in line and "(pid" in line for line in server.log)
        released = sum("released session" in line for line in server.log)
        if started >= slots + released:
            return
        time.sleep(0.05)
    raise TimeoutError("the warm pool did not refill")


if __name__ == "__main__":
    main()
