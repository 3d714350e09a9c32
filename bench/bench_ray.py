"""A Ray cluster's head against a single-machine server, in one run.

    python bench/bench_ray.py [--runs 200] [--leases 15] [--transfers 5] [--mib 100]

It starts a real Ray cluster on this machine (``ray.cluster_utils``: a head
and one node of two GPUs, counted only) and two servers: ``rgpu serve
--slots cpu:2`` and ``rgpu serve --ray ADDRESS``. For each it measures a
trivial cell's round trip (``session.execute``), the lease of a warm worker
(``client.session()``, the pool refilled between leases), and push and pull
of a float32 numpy array from the client: on one machine through the
memfd ring, on the Ray node over the TCP data channel (sealed records
opened with mutual TLS). It also measures the TCP data channel alone, the
server's end pushing to and pulling from a worker with no client (as
``bench/bench_datachannel.py`` does). Targets: a Ray lease under 20 ms
median, a Ray cell within 1.2× the single-machine one, and at least 1 GB/s
each way over the TCP data channel on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_core import interleaved_ms, median_ms  # noqa: E402
from bench_datachannel import channel_mb_s  # noqa: E402
from ray_cluster import RayTestCluster  # noqa: E402
from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client  # noqa: E402


def cell_ms(client: Client, runs: int) -> float:
    with client.session() as session:
        return median_ms(lambda: session.execute("1+1", on_output=lambda _: None), runs)


def _ready_workers(server: ServerProcess) -> int:
    return sum(" ready on " in line for line in list(server.log))


def lease_ms(server: ServerProcess, client: Client, runs: int) -> float:
    """Median of leasing a warm worker; after each release the fresh worker that
    replaces it is waited for (the server's log says when it is ready)."""
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        session = client.session()
        times.append(time.perf_counter() - started)
        ready = _ready_workers(server)
        session.release()
        deadline = time.monotonic() + 120
        while _ready_workers(server) <= ready and time.monotonic() < deadline:
            time.sleep(0.05)
    return statistics.median(times[1:]) * 1000


def transfer_mb_s(client: Client, array: np.ndarray, runs: int) -> dict[str, float]:
    with client.session() as session:
        ms = interleaved_ms({"push": lambda: session.push(x=array), "pull": lambda: session.pull("x")}, runs)
    return {name: array.nbytes / (value / 1000) / 1e6 for name, value in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="trivial cells per server")
    parser.add_argument("--leases", type=int, default=15, help="leases per server")
    parser.add_argument("--transfers", type=int, default=5, help="pushes and pulls per server")
    parser.add_argument("--mib", type=int, default=100, help="size of the transferred array")
    args = parser.parse_args()
    array = np.random.default_rng(0).random(args.mib * (1 << 20) // 4, dtype=np.float32)
    cluster = RayTestCluster(nodes=1)
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = ServerProcess(Path(tmp) / "local", "cpu:2")
            head = ServerProcess(Path(tmp) / "head", "auto", "--ray", cluster.address)
            for name, server in (("one machine", local), ("Ray head", head)):
                server.tmp.mkdir(parents=True, exist_ok=True)
                server.start(timeout=180)
                try:
                    client = Client(server.url, server.token("bench"))
                    results[name] = {
                        "cell": cell_ms(client, args.runs),
                        "lease": lease_ms(server, client, args.leases),
                        **transfer_mb_s(client, array, args.transfers),
                    }
                finally:
                    server.stop()
    finally:
        cluster.shutdown()
    channel = asyncio.run(channel_mb_s("tcp", args.mib, args.transfers))
    one, ray = results["one machine"], results["Ray head"]
    print(f"\n{'what':34} {'Ray head':>10} {'one machine':>12} {'ratio':>7}  target")
    print(f"{'trivial cell (ms)':34} {ray['cell']:10.2f} {one['cell']:12.2f} {ray['cell'] / one['cell']:6.2f}×  ≤ 1.2×")
    print(f"{'lease of a warm worker (ms)':34} {ray['lease']:10.2f} {one['lease']:12.2f} "
          f"{ray['lease'] / one['lease']:6.2f}×  < 20 ms")
    for kind in ("push", "pull"):
        print(f"{f'{kind} numpy {args.mib} MiB (MB/s)':34} {ray[kind]:10.0f} {one[kind]:12.0f} "
              f"{ray[kind] / one[kind]:6.2f}×")
    for kind, value in zip(("push", "pull"), channel):
        print(f"{f'{kind}, TCP data channel alone (MB/s)':34} {value:10.0f} {'':>12} {'':>7}  ≥ 1000 MB/s")
    print(f"\n{time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
