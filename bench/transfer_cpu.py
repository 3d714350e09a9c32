"""CPU time of each process for one push and one pull of a large array.

    python bench/transfer_cpu.py [--mib 100] [--runs 10] [--smoke]

Starts ``rgpu serve --slots cpu:1 --session-cache none`` (ready when ``/api/status`` shows its
slot warm: ``warm_server.py``), leases its worker with the blocking
``Client`` and, after three warm-up rounds, times ``runs`` pushes and then
``runs`` pulls of one float32 numpy array, reading the CPU time (user and
system) of this process (the client), the server and the worker from
``/proc`` before and after. Prints the wall time and the CPU milliseconds
of each per transfer: where the copies of a transfer go.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from reporting import finish, parse_args
from warm_server import WarmServer

SMOKE = {"mib": 4, "runs": 2, "warmup": 1}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=100, help="size of the array (default 100)")
    parser.add_argument("--runs", type=int, default=10, help="transfers of each kind (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds of both first, not measured")
    args = parse_args(parser, SMOKE)

    array = np.random.default_rng(0).random(args.mib * (1 << 18), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="rgpu-bench-cpu-") as tmp, \
            WarmServer(Path(tmp) / "server", "cpu:1", "--session-cache", "none") as server, \
            server.client().session() as session:  # the same array every time: no cache, or it crosses once
        session.execute("import os; worker_pid = os.getpid()", on_output=lambda _: None)
        pids = {"client": os.getpid(), "server": server.pid, "worker": session.pull("worker_pid")["worker_pid"]}
        ops = {"push": lambda: session.push(v=array), "pull": lambda: session.pull("v")}
        for _ in range(args.warmup):
            for op in ops.values():
                op()
        print(f"workers: {server.isolation}\n")
        print(f"{'':6} {'wall ms':>8} {'MB/s':>7} " + " ".join(f"{name + ' ms':>10}" for name in pids))
        for name, op in ops.items():
            before = {who: cpu_seconds(pid) for who, pid in pids.items()}
            started = time.perf_counter()
            for _ in range(args.runs):
                op()
            wall = (time.perf_counter() - started) / args.runs
            used = {who: (cpu_seconds(pid) - before[who]) / args.runs * 1000 for who, pid in pids.items()}
            print(f"{name:6} {wall * 1000:8.1f} {args.mib * 1.048576 / wall:7.0f} "
                  + " ".join(f"{used[who]:10.1f}" for who in pids))
    finish(args, ("numpy",))


if __name__ == "__main__":
    main()
