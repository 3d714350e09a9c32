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

Then the same per Python environment (``--no-envs`` leaves it out; a smoke
run does too): one isolated server with three CPU slots and two named
environments besides ``default`` (the tests' venvs, numpy 1.26.4 and 2.x,
see ``tests/environments.py``; made once and cached), leases taking turns
over the three, each from a slot warm in its environment (``/api/status``
says which environment each slot's warm worker runs).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from reporting import finish, parse_args, table
from rounds import Spread, timed
from warm_server import POLL, WarmServer

SMOKE = {"leases": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=15, help="leases per server (default 15)")
    parser.add_argument("--no-envs", action="store_true", help="leave out the leases per environment")
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
    if not (args.no_envs or args.smoke):
        with tempfile.TemporaryDirectory(prefix="rgpu-bench-lease-envs-") as folder:
            by_env = environment_leases(Path(folder), args.leases)
        print()
        print(table(["environment (isolated)", "median ms", "p90 ms", "worst ms", "best ms"],
                    [[name, s.median * 1000, s.p90 * 1000, s.worst * 1000, s.best * 1000]
                     for name, s in by_env.items()]))
    finish(args)


def environment_leases(folder: Path, leases: int, timeout: float = 180) -> dict[str, Spread]:
    """Warm leases in each environment, taking turns (see the module docstring)."""
    from environments import make_environments

    pythons = make_environments()
    server = WarmServer(folder, "cpu:3", *(f"--env={name}={python}" for name, python in pythons.items()))
    try:
        server.launch()
        client = server.client()
        names = ["default", *pythons]
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(leases + 1):
            for name in names:
                _wait_warm_in(server, names, timeout)
                session: list[Any] = []
                seconds = timed(lambda: session.append(client.session(env=name)))
                session[0].release()
                if round_:
                    times[name].append(seconds)
    finally:
        server.stop()
    return {name: Spread.of(values) for name, values in times.items()}


def _wait_warm_in(server: WarmServer, names: list[str], timeout: float) -> None:
    """Return once every slot is warm and each of ``names`` has a warm worker."""
    deadline = time.monotonic() + timeout
    while True:
        slots = server.status()["slots"]
        if all(s["warm"] for s in slots) and set(names) <= {s["env"] for s in slots}:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm worker in each of {names} within {timeout:g} s: "
                               f"{[(s['id'], s['warm'], s['env']) for s in slots]}")
        time.sleep(POLL)


if __name__ == "__main__":
    main()
