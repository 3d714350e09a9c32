"""A trivial cell on the Remote GPU kernel against a local ipykernel, in one run.

    python bench/bench_kernel.py [--runs 300] [--code "1+1"]

Both kernels are started by kernel name through jupyter_client, as
JupyterLab starts them: ``remote-gpu`` from a kernelspec installed into a
throw-away prefix and pointed at a server this script starts
(``rgpu serve --slots cpu:1``), ``python3`` from the environment. A run is
``execute`` until both the shell reply and the IOPub ``idle`` status of the
request have arrived. The two kernels take turns in blocks so that drift of
the machine's load hits both; the first cells (the lease) are warm-up. It
prints the medians and their ratio; the target is ≤ 1.2×.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from remote_kernels import install_kernelspec, kernel_env  # noqa: E402
from servers import ServerProcess  # noqa: E402


def start(kernel_name: str, env: dict[str, str] | None = None) -> tuple[Any, Any]:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(env=env) if env is not None else km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def cell_seconds(kc: Any, code: str) -> float:
    """One cell: execute, then wait for its reply and its idle status."""
    t = time.perf_counter()
    msg_id = kc.execute(code)
    reply = idle = False
    while not reply:
        reply = kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") == msg_id
    while not idle:
        msg = kc.get_iopub_msg(timeout=30)
        idle = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="cells per kernel (at least 200)")
    parser.add_argument("--block", type=int, default=50, help="cells per turn")
    parser.add_argument("--code", default="1+1", help="the trivial cell")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rgpu-bench-kernel-"))
    server = ServerProcess(tmp, "cpu:1").start()
    os.environ["JUPYTER_PATH"] = str(install_kernelspec(tmp / "prefix"))
    kernels = {
        "Remote GPU kernel": start("remote-gpu", kernel_env(tmp, server.url, server.token("bench"))),
        "local ipykernel": start("python3"),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    try:
        for _, kc in kernels.values():
            for _ in range(10):
                cell_seconds(kc, args.code)
        while min(len(t) for t in times.values()) < args.runs:
            for name, (_, kc) in kernels.items():
                times[name] += [cell_seconds(kc, args.code) for _ in range(args.block)]
    finally:
        for km, kc in kernels.values():
            kc.stop_channels()
            km.shutdown_kernel(now=False)
        server.stop()

    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    ratio = medians["Remote GPU kernel"] / medians["local ipykernel"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    for name, ms in medians.items():
        p90 = statistics.quantiles(times[name], n=10)[-1] * 1000
        print(f"{name:>18}: median {ms:.2f} ms, p90 {p90:.2f} ms over {len(times[name])} cells")
    print(f"{'ratio':>18}: {ratio:.2f}× (target ≤ 1.2×)")


if __name__ == "__main__":
    main()
