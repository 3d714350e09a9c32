"""What isolation adds to a lease: isolated workers against unisolated ones.

    python bench/bench_lease.py [--leases 15]

Starts two servers with one CPU slot each, in one run: one as this process
runs it (as root: each lease's worker takes on the user's uid, session
folder and private /tmp before it is handed over) and one with
``--no-isolation`` (workers stay as the server's user, as before isolation).
Leases alternate between them, each taking the slot's warm worker; the time
is from asking for a session to holding it, the client's connection
included. Prints the medians and the target (median lease under 20 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import wait_warm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=15, help="leases per server")
    args = parser.parse_args()

    servers = {
        "isolated": ServerProcess(Path(tempfile.mkdtemp(prefix="rgpu-bench-")), "cpu:1"),
        "--no-isolation": ServerProcess(Path(tempfile.mkdtemp(prefix="rgpu-bench-")), "cpu:1",
                                        "--no-isolation"),
    }
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        clients = {name: Client(server.start().url, server.token("bench")) for name, server in servers.items()}
        modes = {name: next((line[line.index("workers are"):][:60] for line in server.log
                             if "workers are" in line), "?") for name, server in servers.items()}
        for _ in range(args.leases + 1):  # the first round warms the clients up
            for name, server in servers.items():
                wait_warm(server, 1)
                started = time.perf_counter()
                session = clients[name].session()
                times[name].append((time.perf_counter() - started) * 1000)
                session.release()
    finally:
        for server in servers.values():
            server.stop()

    print(f"\n{'server':16} {'median ms':>10} {'min':>8} {'max':>8}   workers")
    for name, values in times.items():
        kept = values[1:]
        print(f"{name:16} {statistics.median(kept):10.2f} {min(kept):8.2f} {max(kept):8.2f}   {modes[name]}")
    ratio = statistics.median(times["isolated"][1:]) / statistics.median(times["--no-isolation"][1:])
    print(f"\nisolated / --no-isolation: {ratio:.2f}x; target: median lease under 20 ms")
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, uid {os.geteuid()}, "
          f"Python {sys.version.split()[0]}, {args.leases} leases each")


if __name__ == "__main__":
    main()
