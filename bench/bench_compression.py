"""Push and pull over a slow emulated link, compressed and not, by payload.

    python bench/bench_compression.py [--link 80/100] [--mib 100] [--rounds 2] [--smoke]

One server (``rgpu serve --slots cpu:2``) behind an emulated link
(``link.py``; ``RTT_MS/MBIT_S``, default 80 ms and 100 Mbit/s) and two
sessions on it, one with ``RGPU_COMPRESS=never`` and one with ``always``
(the link is emulated on loopback, where ``auto`` never compresses). For
each payload of ``--mib`` MiB, taking turns, each session pushes a fresh
array (nothing cached helps) and pulls a fresh one made remotely:

* small integers: int32 values 0–15;
* mostly zeros: float32, 1 % of them random;
* random float32: what does not compress, and must cost no more.

Reported per payload and direction: the medians, and how many times faster
the compressed session is. Target (issue 19), judged on a full run, never
asserted: over (80 ms, 100 Mbit/s) small integers and mostly zeros ≥ 3×,
random float32 no slower (≥ 0.95× here, for noise).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from link import Link, LinkProcess
from reporting import finish, parse_args, table
from rounds import interleaved, timed
from warm_server import WarmServer

import numpy as np

SMOKE = {"link": "2/1000", "mib": 2, "rounds": 1}

#: Payloads: how to make one here, and the same recipe as code for the worker, from a seed and a count.
PAYLOADS: dict[str, tuple[Callable[[int, int], np.ndarray], str]] = {
    "small integers": (lambda seed, n: np.random.default_rng(seed).integers(0, 16, n).astype(np.int32),
                       "np.random.default_rng({seed}).integers(0, 16, {n}).astype(np.int32)"),
    "mostly zeros": (lambda seed, n: np.where(np.random.default_rng(seed).random(n) < 0.01,
                                              np.random.default_rng(seed + 1).random(n), 0).astype(np.float32),
                     "np.where(np.random.default_rng({seed}).random({n}) < 0.01, "
                     "np.random.default_rng({seed} + 1).random({n}), 0).astype(np.float32)"),
    "random float32": (lambda seed, n: np.random.default_rng(seed).random(n, dtype=np.float32),
                       "np.random.default_rng({seed}).random({n}, dtype=np.float32)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--link", default="80/100", help="RTT_MS/MBIT_S of the emulated link (default 80/100)")
    parser.add_argument("--mib", type=int, default=100, help="MiB of each array (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per payload and direction (default 2)")
    args = parse_args(parser, SMOKE)
    rtt_ms, _, mbit = args.link.partition("/")
    link = Link(float(rtt_ms) / 1000, float(mbit) * 1e6 if float(mbit) else None)
    n = args.mib * (1 << 20) // 4
    with tempfile.TemporaryDirectory(prefix="rgpu-bench-compression-") as tmp, \
            WarmServer(Path(tmp), "cpu:2") as server, LinkProcess(link) as net:
        port = int(server.url.rsplit(":", 1)[1])
        url = f"ws://127.0.0.1:{net.proxy('127.0.0.1', port)}"
        sessions: dict[str, Any] = {}
        for mode in ("never", "always"):
            os.environ["RGPU_COMPRESS"] = mode
            sessions[mode] = server.client(url).session()
            sessions[mode].execute("import numpy as np", on_output=lambda _: None).raise_for_error()
        os.environ.pop("RGPU_COMPRESS")
        seeds = iter(range(10, 1 << 30, 2))
        rows = []
        try:
            for name, (make, code) in PAYLOADS.items():
                # Each op makes its payload, untimed, and returns the transfer to time.
                def push(mode: str, make: Callable[[int, int], np.ndarray] = make) -> Callable[[], None]:
                    value = make(next(seeds), n)
                    return lambda: sessions[mode].push(a=value)

                def pull(mode: str, code: str = code) -> Callable[[], None]:
                    made = sessions[mode].execute("b = " + code.format(seed=next(seeds), n=n),
                                                  on_output=lambda _: None)
                    made.raise_for_error()
                    return lambda: sessions[mode].pull("b")

                spreads = interleaved({
                    "push": {m: (lambda m=m: push(m)) for m in sessions},
                    "pull": {m: (lambda m=m: pull(m)) for m in sessions},
                }, args.rounds, warmup=0, measure=lambda _kind, _side, op: timed(op()))
                for direction, sides in spreads.items():
                    plain, packed = sides["never"].median, sides["always"].median
                    rows.append([name, direction, plain, packed, f"{plain / packed:.2f}×",
                                 f"{link.transfer_time(n * 4):.2f}"])
        finally:
            for session in sessions.values():
                session.release()
    print(f"\n## {args.mib} MiB over {link.label}, compressed (RGPU_COMPRESS=always) and not (never)\n")
    print(table(["payload", "direction", "not compressed, s", "compressed, s", "faster",
                 "the link's transfer time, s"], rows))
    finish(args, ["numpy", "zstandard"])


if __name__ == "__main__":
    main()
