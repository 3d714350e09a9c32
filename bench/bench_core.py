"""Transfers, a trivial cell and a lease: ours against ipyparallel and a local ipykernel.

    python bench/bench_core.py [--rounds 15] [--mib 100] [--consecutive 30]
                               [--cells 300] [--leases 15] [--neighbours 0] [--smoke]

Three sides run at once on this machine: two servers of ours (``rgpu serve
--slots cpu:1 --session-cache none``: every transfer moves its bytes), one isolated as this process's user runs it (as root:
each lease's worker takes on a uid of its own before it is handed over) and
one with ``--no-isolation``, each driven by the blocking ``Client``; and an
ipyparallel cluster of one engine, driven by a ``DirectView``. Both servers
are ready when ``/api/status`` shows every slot warm (``warm_server.py``).

1. Transfers, taking turns: each round pushes and then pulls a float32
   numpy array and then a float32 torch tensor of ``--mib`` MiB on each
   side, the sides' order going through every permutation, round by round,
   and each op starting once the run's processes are idle (``rounds.py``:
   ipyparallel's go on for up to 200 ms after its calls return, and that
   fell on the side after it); three warm-up
   rounds are dropped, ``--rounds`` are kept. For each transfer and side:
   median, p90 and worst time, MB/s at the median, and how many times
   ipyparallel's median time ours is. Before timing, one pull of each is
   checked to give back what was pushed.
2. Steadiness: ``--consecutive`` pushes of the numpy array in a row, then
   as many pulls, on each side in turn: median, p90 and worst, and p90 and
   worst over the median.
3. The ceiling of one hop: ``--mib`` MiB as 1 MiB binary websocket messages
   one way over loopback, no framing of ours.
4. A trivial cell (``1+1``, reply and idle both awaited) on each server,
   taking turns with the same cell sent to a local ipykernel through
   jupyter_client, ``--cells`` rounds.
5. The lease of a warm worker on each server, taking turns, each slot warm
   again (as ``/api/status`` says) before the next; against starting a
   kernel that imports torch.

``--neighbours N`` keeps N CPU-bound processes (a Python busy loop each)
running for the whole run: the busy neighbour of issue 21.

Targets, judged on a full run, never asserted: push and pull ≥ 3×
ipyparallel (≥ 2× beside one busy neighbour), the isolated server within
10 % of the other; over the consecutive transfers p90 ≤ 1.5× and worst ≤
3× the median; a trivial cell ≤ 1.5× a local ipykernel; a lease < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reporting import finish, parse_args, table
from rounds import Op, Quiet, Spread, consecutive, interleaved, lingering, timed
from warm_server import WarmServer

from remote_gpu_kernel.sync import Session

MIB = 1 << 20
SMOKE = {"rounds": 2, "warmup": 0, "mib": 4, "consecutive": 3, "cells": 5, "leases": 1, "cold": 1}
PEER = "ipyparallel"
LOCAL = "local ipykernel"


# -- the peers ---------------------------------------------------------------


@contextlib.contextmanager
def ipyparallel_engine() -> Iterator[Callable[[], Any]]:
    """A fresh one-engine ipyparallel cluster, started in a thread while the
    caller goes on; yields what waits for it and returns a blocking
    ``DirectView`` on its engine, with numpy and torch imported there."""
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=40)

    def start() -> Any:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(1, timeout=180)
        view = rc[0]
        view.block = True
        view.execute("import numpy, torch")
        return rc, view

    with concurrent.futures.ThreadPoolExecutor(1) as starter:
        started = starter.submit(start)
        try:
            yield lambda: started.result()[1]
        finally:
            try:
                started.result()[0].close()
            finally:
                cluster.stop_cluster_sync()


@contextlib.contextmanager
def local_kernel() -> Iterator[Op]:
    """A trivial cell on a local ipykernel started through jupyter_client."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)

        def cell() -> None:
            msg_id = kc.execute("1+1")
            reply = idle = False
            while not reply:
                reply = kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") == msg_id
            while not idle:
                msg = kc.get_iopub_msg(timeout=30)
                idle = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle")

        yield cell
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@contextlib.contextmanager
def busy_neighbours(count: int) -> Iterator[list[int]]:
    """``count`` processes that keep a core busy until the end (nothing else); yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def cold_torch_kernel() -> None:
    """Start a kernel, import torch in it, stop it: what a lease without a warm pool would cost."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        kc.execute_interactive("import torch", timeout=120, output_hook=lambda _: None)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def raw_websockets(payload: bytes, rounds: int, warmup: int) -> Spread:
    """``payload`` one way in 1 MiB binary messages over loopback, the reader answering at the end."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.sync.client import connect

    ready = threading.Event()
    port: list[int] = []
    loop = asyncio.new_event_loop()
    stop = loop.create_future()

    async def handler(ws: ServerConnection) -> None:
        received = 0
        async for message in ws:
            received += len(message)
            if received >= len(payload):
                received = 0
                await ws.send(b"ok")

    async def run() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=MIB) as server:
            port.append(server.sockets[0].getsockname()[1])
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the websockets server did not start")
        view = memoryview(payload)
        with connect(f"ws://127.0.0.1:{port[0]}", compression=None, max_size=MIB) as ws:
            def send() -> None:
                for i in range(0, len(payload), MIB):
                    ws.send(view[i : i + MIB])
                ws.recv()

            return consecutive(send, rounds, warmup)
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(30)
        loop.close()


# -- the measurements --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Side:
    """How one side pushes a value as ``v`` and pulls ``v`` back."""

    push: Callable[[Any], object]
    pull: Callable[[], Any]

    @classmethod
    def ours(cls, session: Session) -> Side:
        return cls(lambda v: session.push(v=v), lambda: session.pull("v")["v"])

    @classmethod
    def ipyparallel(cls, view: Any) -> Side:
        return cls(lambda v: view.push({"v": v}), lambda: view.pull("v"))


def transfer_kinds(sides: dict[str, Side], arrays: dict[str, Any]) -> dict[str, dict[str, Op]]:
    """``{"push numpy": {side: op}, "pull numpy": ..., "push torch": ..., "pull torch": ...}``."""
    kinds: dict[str, dict[str, Op]] = {}
    for name, value in arrays.items():
        kinds[f"push {name}"] = {side: functools.partial(s.push, value) for side, s in sides.items()}
        kinds[f"pull {name}"] = {side: s.pull for side, s in sides.items()}
    return kinds


def check_round_trip(sides: dict[str, Side], arrays: dict[str, Any]) -> None:
    """Every side gives back what it was given: a fast pull of the wrong bytes measures nothing."""
    for side, s in sides.items():
        for name, value in arrays.items():
            s.push(value)
            back = s.pull()
            same = np.array_equal(np.asarray(back), np.asarray(value))
            if not same or type(back) is not type(value):
                raise AssertionError(f"{side}: the {name} array pulled back is not the one pushed")


def lease_ms(servers: dict[str, WarmServer], leases: int, warmup: int = 1) -> dict[str, Spread]:
    """A session taken from each server in turn, each server warm again before its
    next lease; ``warmup`` rounds first (they warm the clients up) are dropped."""
    clients = {name: server.client() for name, server in servers.items()}
    times: dict[str, list[float]] = {name: [] for name in servers}
    for round_ in range(warmup + leases):
        for name, server in servers.items():
            server.wait_warm()
            session: list[Any] = []
            seconds = timed(lambda: session.append(clients[name].session()))
            session[0].release()
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: Spread.of(ts) for name, ts in times.items()}


def ms(spread: Spread) -> tuple[float, float, float]:
    return spread.median * 1000, spread.p90 * 1000, spread.worst * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved transfer rounds kept (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first and dropped (default 3)")
    parser.add_argument("--mib", type=int, default=100, help="size of the arrays in MiB (default 100)")
    parser.add_argument("--consecutive", type=int, default=30,
                        help="pushes, then pulls, in a row on each side (default 30; 0 skips)")
    parser.add_argument("--cells", type=int, default=300, help="trivial cells per side (default 300)")
    parser.add_argument("--leases", type=int, default=15, help="leases per server (default 15)")
    parser.add_argument("--cold", type=int, default=3, help="cold kernels started with torch (default 3; 0: none)")
    parser.add_argument("--neighbours", type=int, default=0,
                        help="CPU-bound processes kept busy beside the whole run (default 0)")
    args = parse_args(parser, SMOKE)

    with contextlib.ExitStack() as stack:
        # Before each timed op the run waits until its own processes are idle:
        # the neighbours are not its own (they are the load it is run beside).
        quiet = Quiet(exclude=stack.enter_context(busy_neighbours(args.neighbours)))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rgpu-bench-core-")))
        # The same arrays cross every round: with a session cache they would cross
        # once and be named after (bench_network.py's "push again" measures that).
        servers = {"isolated": WarmServer(folder / "isolated", "cpu:1", "--session-cache", "none"),
                   "--no-isolation": WarmServer(folder / "plain", "cpu:1", "--no-isolation",
                                                "--session-cache", "none")}
        peer_view = stack.enter_context(ipyparallel_engine())  # starts while the servers do
        for server in servers.values():
            stack.callback(server.stop)
            server.launch()
        local_cell = stack.enter_context(local_kernel())
        import torch

        nbytes = args.mib * MIB
        arrays = {"numpy": np.random.default_rng(0).random(nbytes // 4, dtype=np.float32),
                  "torch": torch.rand(nbytes // 4, dtype=torch.float32)}
        for server in servers.values():
            server.wait_warm()
        view = peer_view()
        modes = {name: server.isolation for name, server in servers.items()}
        label = {name: f"{name} ({modes[name]})" for name in servers} | {PEER: PEER, LOCAL: LOCAL}

        sessions = {name: stack.enter_context(server.client().session()) for name, server in servers.items()}
        sides = {name: Side.ours(session) for name, session in sessions.items()}
        sides[PEER] = Side.ipyparallel(view)
        check_round_trip(sides, arrays)
        left_running = {(kind, side): lingering(op, quiet)
                        for kind, by_side in transfer_kinds(sides, {"numpy": arrays["numpy"]}).items()
                        for side, op in by_side.items()}

        transfers = interleaved(transfer_kinds(sides, arrays), args.rounds, args.warmup, quiet=quiet)
        steady: dict[str, dict[str, Spread]] = {}
        if args.consecutive:
            for name, one in sides.items():
                quiet()
                steady[name] = {"push": consecutive(functools.partial(one.push, arrays["numpy"]),
                                                    args.consecutive, args.warmup),
                                "pull": consecutive(one.pull, args.consecutive, args.warmup)}
        ceiling = raw_websockets(arrays["numpy"].tobytes(), args.rounds, args.warmup)
        cell_ops: dict[str, Op] = {name: functools.partial(s.execute, "1+1", on_output=lambda _: None)
                                   for name, s in sessions.items()}
        cell_ops[LOCAL] = local_cell
        cells = interleaved({"cell": cell_ops}, args.cells, args.warmup, quiet=quiet)["cell"]
        for session in sessions.values():
            session.release()
        leases = lease_ms(servers, args.leases, min(1, args.warmup))
        cold = Spread.of([timed(cold_torch_kernel) for _ in range(args.cold)]) if args.cold else None

    beside = f", beside {args.neighbours} busy neighbour process(es)" if args.neighbours else ""
    print(f"\n## Transfers of {args.mib} MiB float32, taking turns: {args.rounds} rounds after {args.warmup} "
          f"dropped{beside}\n")
    rows: list[list[object]] = []
    for kind, by_side in transfers.items():
        peer = by_side[PEER]
        for side, spread in by_side.items():
            vs = f"{peer.median / spread.median:.2f}×" if side != PEER else ""
            rows.append([kind, label[side], *ms(spread), f"{spread.mb_s(nbytes):,.0f}", vs])
    print(table(["transfer", "side", "median ms", "p90 ms", "worst ms", "MB/s at median",
                 f"× {PEER}"], rows))
    print(f"\nWhat a side leaves running after its call returns (CPU of the run's processes in the "
          f"{len(next(iter(left_running.values()))) * 20} ms after, once each): "
          + "; ".join(f"{kind} {label[side]} {marks[-1] * 1000:.0f} ms" for (kind, side), marks in left_running.items())
          + f". Each timed op waited until the run was idle first ({quiet.waited:.1f} s in all"
          + (f"; gave up waiting {quiet.gave_up} times" if quiet.gave_up else "") + ").")
    if steady:
        print(f"\n## {args.consecutive} transfers of the numpy array in a row, each side alone\n")
        rows = [[f"{kind} numpy", label[side], *ms(spread), f"{spread.mb_s(nbytes):,.0f}",
                 f"{spread.p90_ratio:.2f}×", f"{spread.worst_ratio:.2f}×"]
                for side, by_kind in steady.items() for kind, spread in by_kind.items()]
        print(table(["transfer", "side", "median ms", "p90 ms", "worst ms", "MB/s at median",
                     "p90 / median", "worst / median"], rows))
    print(f"\nRaw websockets, {args.mib} × 1 MiB messages one way (the ceiling of one hop): "
          f"{ceiling.mb_s(nbytes):,.0f} MB/s at the median, {ceiling.median * 1000:.1f} ms "
          f"(p90 {ceiling.p90 * 1000:.1f}, worst {ceiling.worst * 1000:.1f})")

    print(f"\n## A trivial cell `1+1` (reply and idle), taking turns: {args.cells} rounds\n")
    local = cells[LOCAL]
    print(table(["side", "median ms", "p90 ms", "worst ms", f"× {LOCAL} (median)"],
                [[label[side], *ms(spread), f"{spread.median / local.median:.2f}×"]
                 for side, spread in cells.items()]))
    print(f"\n## The lease of a warm worker: {args.leases} per server, taking turns\n")
    rows = [[label[name], *ms(spread)] for name, spread in leases.items()]
    if cold is not None:
        rows.append([f"cold kernel + `import torch` ({args.cold})", *ms(cold)])
    print(table(["side", "median ms", "p90 ms", "worst ms"], rows))

    if not args.smoke:
        print("\n## Targets\n")
        for line in verdicts(transfers, steady, cells, leases, 3.0 if not args.neighbours else 2.0):
            print(f"- {line}")
    finish(args, ("websockets", "ipykernel", "jupyter_client", "ipyparallel", "numpy", "torch"))


def verdicts(transfers: dict[str, dict[str, Spread]], steady: dict[str, dict[str, Spread]],
             cells: dict[str, Spread], leases: dict[str, Spread], times_peer: float) -> list[str]:
    """One line per target: what was measured and whether it was met."""
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for kind, by_side in transfers.items():
        peer = by_side[PEER].median
        ratios = {side: peer / s.median for side, s in by_side.items() if side != PEER}
        iso, plain = by_side["isolated"].median, by_side["--no-isolation"].median
        lines.append(f"{kind} ≥ {times_peer:g}× {PEER}: "
                     + ", ".join(f"{side} {r:.2f}×" for side, r in ratios.items())
                     + f" — {met(min(ratios.values()) >= times_peer)}; isolated within 10 % of --no-isolation: "
                     f"{iso / plain:.2f}× the time — {met(iso <= 1.1 * plain)}")
    for side, by_kind in steady.items():
        if side == PEER:
            continue
        for kind, s in by_kind.items():
            lines.append(f"steady {kind}, {side}: p90 {s.p90_ratio:.2f}× the median (≤ 1.5×), worst "
                         f"{s.worst_ratio:.2f}× (≤ 3×) — {met(s.p90_ratio <= 1.5 and s.worst_ratio <= 3)}")
    local = cells[LOCAL].median
    for side, s in cells.items():
        if side != LOCAL:
            lines.append(f"trivial cell, {side}: {s.median / local:.2f}× a local ipykernel (≤ 1.5×) — "
                         f"{met(s.median <= 1.5 * local)}")
    for side, s in leases.items():
        lines.append(f"lease, {side}: median {s.median * 1000:.1f} ms (< 50 ms) — {met(s.median < 0.05)}")
    return lines


if __name__ == "__main__":
    main()
