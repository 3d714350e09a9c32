"""A Ray cluster's head against a single-machine server, in one run.

    python bench/bench_ray.py [--runs 200] [--leases 15] [--gap 3] [--transfers 5] [--mib 100]
                              [--ray ADDRESS] [--smoke]

It starts a real Ray cluster on this machine (``ray.cluster_utils``: a head
and one node of two GPUs, counted only; or uses the one ``--ray`` names)
and two servers: ``rgpu serve --slots cpu:2`` and ``rgpu serve --ray
ADDRESS``, both with ``--session-cache none`` (every push and pull moves
its bytes, rather than naming what the other end holds), each ready when ``/api/status`` shows every slot warm
(``warm_server.py``). For each it measures a trivial cell's round trip
(``session.execute``), the lease of a warm worker (``client.session()``,
every slot warm again before each lease), leases ``--gap`` seconds apart
(each asked for that long after the one before was released, whatever the
workers are doing then, as a user who restarts a kernel or runs a cell
now and then: a lease must still take a warm worker where one is free),
and push and pull
of a float32 numpy array from the client: on one machine through the
memfd ring, on the Ray node over the TCP data channel (sealed records
opened with mutual TLS). It also measures the TCP data channel alone, the
server's end pushing to and pulling from a worker with no client (as
``bench/bench_datachannel.py`` does). Targets: a Ray lease under 20 ms
median, warm or ``--gap`` seconds apart, a Ray cell within 1.2× the single-machine one, and at least 1 GB/s
each way over the TCP data channel on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench_datachannel import channel_mb_s
from reporting import finish, parse_args
from rounds import Spread, consecutive, interleaved, timed
from warm_server import WarmServer

from remote_gpu_kernel import Client

SMOKE = {"runs": 5, "leases": 1, "gap": 0.1, "transfers": 1, "warmup": 0, "mib": 4}


def cell_ms(client: Client, runs: int, warmup: int) -> float:
    with client.session() as session:
        return consecutive(lambda: session.execute("1+1", on_output=lambda _: None), runs, warmup).median * 1000


def lease_ms(server: WarmServer, client: Client, runs: int, warmup: int) -> float:
    """Median of leasing a warm worker; before each lease every slot is warm
    again, as the server's ``/api/status`` says."""
    times = []
    for _ in range(warmup + runs):
        server.wait_warm()
        session: list[Any] = []
        times.append(timed(lambda: session.append(client.session())))
        session[0].release()
    return Spread.of(times[warmup:]).median * 1000


def gap_lease(client: Client, runs: int, warmup: int, gap: float) -> Spread:
    """Leases ``gap`` seconds apart: each is asked for ``gap`` seconds after
    the one before was released, without waiting for any worker; the gap is
    the user's pause, not a wait for the server."""
    times = []
    for _ in range(warmup + runs):
        session: list[Any] = []
        times.append(timed(lambda: session.append(client.session())))
        session[0].release()
        time.sleep(gap)
    return Spread.of(times[warmup:])


def transfer_mb_s(client: Client, array: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    with client.session() as session:
        spreads = interleaved({"push": {"ours": lambda: session.push(x=array)},
                               "pull": {"ours": lambda: session.pull("x")}}, runs, warmup)
    return {kind: by_side["ours"].mb_s(array.nbytes) for kind, by_side in spreads.items()}


@contextlib.contextmanager
def ray_address(given: str | None) -> Iterator[str]:
    """``given``, or the address of a Ray cluster started here (a head and one node of two GPUs)."""
    if given:
        yield given
        return
    from ray_cluster import RayTestCluster  # tests/, put on the path by warm_server

    cluster = RayTestCluster(nodes=1)
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="trivial cells per server")
    parser.add_argument("--leases", type=int, default=15, help="leases per server")
    parser.add_argument("--gap", type=float, default=3.0, metavar="SECONDS",
                        help="also lease --leases times this many seconds after each release, "
                             "without waiting for warm workers (0: do not)")
    parser.add_argument("--transfers", type=int, default=5, help="pushes and pulls per server")
    parser.add_argument("--warmup", type=int, default=3, help="rounds of each run first and dropped")
    parser.add_argument("--mib", type=int, default=100, help="size of the transferred array")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="use this running Ray cluster (GCS address) instead of starting one")
    args = parse_args(parser, SMOKE)
    array = np.random.default_rng(0).random(args.mib * (1 << 20) // 4, dtype=np.float32)
    results: dict[str, dict[str, float]] = {}
    gaps: dict[str, Spread] = {}
    with ray_address(args.ray) as address, tempfile.TemporaryDirectory(prefix="rgpu-bench-ray-") as tmp:
        local = WarmServer(Path(tmp) / "local", "cpu:2", "--session-cache", "none")
        head = WarmServer(Path(tmp) / "head", "auto", "--ray", address, "--session-cache", "none")
        for name, server in (("one machine", local), ("Ray head", head)):
            with server:
                client = server.client()
                results[name] = {  # the leases first: each waits for every slot to be warm
                    "lease": lease_ms(server, client, args.leases, min(1, args.warmup)),
                    "cell": cell_ms(client, args.runs, args.warmup),
                    **transfer_mb_s(client, array, args.transfers, args.warmup),
                }
                if args.gap > 0:
                    server.wait_warm()  # as a user's first lease finds them
                    gaps[name] = gap_lease(client, args.leases, min(1, args.warmup), args.gap)
    channel = asyncio.run(channel_mb_s("tcp", args.mib, args.transfers, args.warmup))
    one, ray = results["one machine"], results["Ray head"]
    print(f"\n{'what':34} {'Ray head':>10} {'one machine':>12} {'ratio':>7}  target")
    print(f"{'trivial cell (ms)':34} {ray['cell']:10.2f} {one['cell']:12.2f} {ray['cell'] / one['cell']:6.2f}×  ≤ 1.2×")
    print(f"{'lease of a warm worker (ms)':34} {ray['lease']:10.2f} {one['lease']:12.2f} "
          f"{ray['lease'] / one['lease']:6.2f}×  < 20 ms")
    if gaps:
        ray_gap, one_gap = gaps["Ray head"], gaps["one machine"]
        print(f"{f'lease {args.gap:g} s after a release (ms)':34} {ray_gap.median * 1000:10.2f} "
              f"{one_gap.median * 1000:12.2f} {ray_gap.median / one_gap.median:6.2f}×  < 20 ms")
        for label, attribute in (("p90", "p90"), ("worst", "worst")):
            ray_value, one_value = getattr(ray_gap, attribute) * 1000, getattr(one_gap, attribute) * 1000
            print(f"{f'  its {label} (ms)':34} {ray_value:10.2f} {one_value:12.2f}")
    for kind in ("push", "pull"):
        print(f"{f'{kind} numpy {args.mib} MiB (MB/s)':34} {ray[kind]:10.0f} {one[kind]:12.0f} "
              f"{ray[kind] / one[kind]:6.2f}×")
    for kind, value in zip(("push", "pull"), channel):
        print(f"{f'{kind}, TCP data channel alone (MB/s)':34} {value:10.0f} {'':>12} {'':>7}  ≥ 1000 MB/s")
    finish(args, ("ray",))


if __name__ == "__main__":
    main()
