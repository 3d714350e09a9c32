"""CPU time of each process for one push and one pull of a large array.

    python bench/transfer_cpu.py [--mib 100] [--runs 10]

Starts ``rgpu serve --slots cpu:1``, leases its worker with the blocking
``Client`` and, after three warm-up rounds, times ``runs`` pushes and then
``runs`` pulls of one float32 numpy array, reading the CPU time (user and
system) of this process (the client), the server and the worker from
``/proc`` before and after. Prints the wall time and the CPU milliseconds
of each per transfer: where the copies of a transfer go.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client  # noqa: E402


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=100, help="size of the array")
    parser.add_argument("--runs", type=int, default=10, help="transfers of each kind")
    args = parser.parse_args()

    array = np.random.default_rng(0).random(args.mib * (1 << 18), dtype=np.float32)
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="rgpu-bench-")), "cpu:1").start()
    try:
        with Client(server.url, server.token("bench")).session() as session:
            session.execute("import os; worker_pid = os.getpid()", on_output=lambda _: None)
            pids = {"client": os.getpid(), "server": server.proc.pid,
                    "worker": session.pull("worker_pid")["worker_pid"]}
            ops = {"push": lambda: session.push(v=array), "pull": lambda: session.pull("v")}
            for _ in range(3):
                for op in ops.values():
                    op()
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
    finally:
        server.stop()


if __name__ == "__main__":
    main()
