"""A trivial cell on the Remote GPU kernel against a local ipykernel, in one run.

    python bench/bench_kernel.py [--runs 300] [--code "1+1"] [--smoke]

Both kernels are started by kernel name through jupyter_client, as
JupyterLab starts them: ``remote-gpu`` from a kernelspec installed into a
throw-away prefix and pointed at a server this script starts
(``rgpu serve --slots cpu:1``, ready when ``/api/status`` shows its slot
warm: ``warm_server.py``), ``python3`` from the environment. A run is
``execute`` until both the shell reply and the IOPub ``idle`` status of the
request have arrived. The two kernels take turns in blocks so that drift of
the machine's load hits both; the first ``--warmup`` cells of each (the
Remote GPU kernel's first takes its lease) are dropped. It prints median,
p90 and worst of each, and the ratio of the medians; the target is ≤ 1.2×.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from reporting import finish, parse_args, table
from rounds import Spread
from warm_server import WarmServer

from remote_kernels import install_kernelspec, kernel_env  # noqa: E402  (tests/, put on the path by warm_server)

SMOKE = {"runs": 5, "block": 5, "warmup": 2}


@contextlib.contextmanager
def started(kernel_name: str, env: dict[str, str] | None = None) -> Any:
    """A client of kernel ``kernel_name``, started by a KernelManager; stopped at the end."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(env=env) if env is not None else km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


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
    parser.add_argument("--runs", type=int, default=300, help="cells per kernel (at least 200; default 300)")
    parser.add_argument("--block", type=int, default=50, help="cells per turn (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="cells per kernel run first and dropped")
    parser.add_argument("--code", default="1+1", help="the trivial cell")
    args = parse_args(parser, SMOKE)

    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rgpu-bench-kernel-")))
        server = stack.enter_context(WarmServer(tmp / "server", "cpu:1"))
        os.environ["JUPYTER_PATH"] = str(install_kernelspec(tmp / "prefix"))
        kernels = {
            "Remote GPU kernel": stack.enter_context(started("remote-gpu", kernel_env(tmp, server.url,
                                                                                      server.token))),
            "local ipykernel": stack.enter_context(started("python3")),
        }
        times = {name: [] for name in kernels}
        for kc in kernels.values():
            for _ in range(args.warmup):
                cell_seconds(kc, args.code)
        while min(len(t) for t in times.values()) < args.runs:
            for name, kc in kernels.items():
                times[name] += [cell_seconds(kc, args.code) for _ in range(args.block)]

    spreads = {name: Spread.of(t) for name, t in times.items()}
    print(table(["kernel", "median ms", "p90 ms", "worst ms", "cells"],
                [[name, s.median * 1000, s.p90 * 1000, s.worst * 1000, s.n] for name, s in spreads.items()]))
    ratio = spreads["Remote GPU kernel"].median / spreads["local ipykernel"].median
    print(f"\nratio of the medians: {ratio:.2f}×" + ("" if args.smoke else " (target ≤ 1.2×)"))
    finish(args, ("ipykernel", "jupyter_client"))


if __name__ == "__main__":
    main()
