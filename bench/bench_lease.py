"""What isolation adds to a lease: isolated workers against unisolated ones.

    python bench/bench_lease.py [--leases 15] [--smoke]

Starts two servers with one CPU slot each, in one run: one as this process
runs it (as root: each lease's worker takes on the user's uid, session
folder and private /tmp before it is handed over) and one with
``--no-isolation`` (workers stay as the server's user). Leases alternate
between them, each taking the slot's warm worker: before each, the server's
``/api/status`` must show the slot warm again (``warm_server.py``). The
time runs from asking for a session to holding it, the client's connection
included; the first round warms the clients up and is dropped. Prints the
median, p90 and worst of each, how ``/api/status`` says each server
isolates, and the target (median lease under 20 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from reporting import finish, parse_args, table
from rounds import Spread, timed
from warm_server import WarmServer

SMOKE = {"leases": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=15, help="leases per server (default 15)")
    args = parse_args(parser, SMOKE)

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rgpu-bench-lease-")))
        servers = {"isolated": WarmServer(folder / "isolated", "cpu:1"),
                   "--no-isolation": WarmServer(folder / "plain", "cpu:1", "--no-isolation")}
        for server in servers.values():
            stack.callback(server.stop)
            server.launch()
        clients = {name: server.client() for name, server in servers.items()}
        modes = {name: server.status()["isolation"] for name, server in servers.items()}
        times: dict[str, list[float]] = {name: [] for name in servers}
        for round_ in range(args.leases + 1):
            for name, server in servers.items():
                server.wait_warm()
                session: list[Any] = []
                seconds = timed(lambda: session.append(clients[name].session()))
                session[0].release()
                if round_:
                    times[name].append(seconds)

    spreads = {name: Spread.of(values) for name, values in times.items()}
    print(table(["server", "median ms", "p90 ms", "worst ms", "best ms", "workers (/api/status)"],
                [[name, s.median * 1000, s.p90 * 1000, s.worst * 1000, s.best * 1000,
                  f"{modes[name]['mode']}, memory: {modes[name]['memory']}"] for name, s in spreads.items()]))
    ratio = spreads["isolated"].median / spreads["--no-isolation"].median
    print(f"\nisolated / --no-isolation: {ratio:.2f}× at the median; {args.leases} leases each")
    if not args.smoke:
        met = "met" if spreads["isolated"].median < 0.020 else "NOT met"
        print(f"target, a median lease under 20 ms: {met}")
    finish(args)


if __name__ == "__main__":
    main()
