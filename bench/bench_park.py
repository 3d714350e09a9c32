"""Parking and resuming a session that holds 1 GiB of arrays.

    python bench/bench_park.py [--rounds 5] [--gib 1]

Starts a server with one CPU slot (as root: workers isolated, each user's
own uid), leases a session and fills it with numpy arrays and a torch
tensor, 1 GiB in all. Each round parks it (``session.park()``: the worker
saves its namespace into the session folder, is killed, the slot goes back)
and resumes it (``session.resume()``: a lease, the slot's warm worker
enters the session folder and loads the namespace, the files go), each
timed at the client from the request to its answer. Before each resume the
slot's warm worker is given time to start, as it would have while a user
is at lunch. For comparison, in the same run, what a user would do by hand
in one process: ``numpy.save`` and ``torch.save`` of the same arrays and
tensor into the same folder, and ``numpy.load`` and ``torch.load`` back.

Prints the medians and the target: park and resume under 2 s each.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess  # noqa: E402

from remote_gpu_kernel import Client  # noqa: E402

_RESTORED = re.compile(r"in (\d+\.\d+) s\.")


def fill(gib: float) -> str:
    """A cell that holds ``gib`` GiB: four numpy arrays and a torch tensor (a fifth each)."""
    part = int(gib * (1 << 30) / 5 / 8)
    return ("import numpy as np, torch\n"
            f"arrays = [np.full({part}, float(i)) for i in range(4)]\n"
            f"weights = torch.full(({part},), 7.0, dtype=torch.float64)\n"
            "check = sum(float(a[-1]) for a in arrays) + float(weights[-1])\n")


def warm_workers(server: ServerProcess) -> int:
    return sum(" ready on " in line for line in server.log)


def wait_for_warm(server: ServerProcess, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while warm_workers(server) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the slot's warm worker did not start:\n" + "".join(server.log[-30:]))
        time.sleep(0.05)


def by_hand(folder: Path, gib: float) -> tuple[float, float]:
    """Seconds to ``numpy.save``/``torch.save`` what :func:`fill` holds into ``folder``,
    and to load it back."""
    import torch

    ns: dict[str, object] = {}
    exec(fill(gib), ns)
    arrays, weights = ns["arrays"], ns["weights"]
    started = time.perf_counter()
    for i, array in enumerate(arrays):  # type: ignore[arg-type]
        np.save(folder / f"a{i}.npy", array)
    torch.save(weights, folder / "w.pt")
    saved = time.perf_counter() - started
    del arrays, weights, ns
    started = time.perf_counter()
    back = [np.load(folder / f"a{i}.npy") for i in range(4)]
    weights = torch.load(folder / "w.pt")
    loaded = time.perf_counter() - started
    del back, weights
    for path in folder.glob("*.np[y]"):
        path.unlink()
    (folder / "w.pt").unlink()
    return saved, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB the session holds")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rgpu-bench-park-"))
    server = ServerProcess(tmp, "cpu:1")
    times: dict[str, list[float]] = {k: [] for k in ("park", "save", "resume", "restore",
                                                     "numpy.save + torch.save", "numpy.load + torch.load")}
    sizes: list[int] = []
    try:
        server.start()
        notices: list[str] = []
        session = Client(server.url, server.token("bench")).session(on_notice=notices.append)
        result = session.execute(fill(args.gib), on_output=lambda _: None)
        assert result.ok, result.error
        for _ in range(args.rounds):
            ready = warm_workers(server)
            started = time.perf_counter()
            parked = session.park()
            times["park"].append(time.perf_counter() - started)
            times["save"].append(parked.seconds)
            sizes.append(parked.nbytes)
            wait_for_warm(server, ready + 1)
            started = time.perf_counter()
            session.resume()
            times["resume"].append(time.perf_counter() - started)
            found = _RESTORED.search(notices[-1])
            assert found, notices[-1]
            times["restore"].append(float(found.group(1)))
            check = session.execute("print(check)", on_output=lambda _: None).stdout
            assert float(check) == 6.0 + 7.0, check
            saved, loaded = by_hand(tmp, args.gib)
            times["numpy.save + torch.save"].append(saved)
            times["numpy.load + torch.load"].append(loaded)
        session.release()
    finally:
        server.stop()
    load = os.getloadavg()[0]
    print(f"{args.rounds} rounds, {statistics.median(sizes) / (1 << 30):.2f} GiB on disk, "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print("| what | median s | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    park, resume = statistics.median(times["park"]), statistics.median(times["resume"])
    met = "met" if park < 2 and resume < 2 else "NOT met"
    print(f"target (park and resume of {args.gib:g} GiB under 2 s each): {met}")


if __name__ == "__main__":
    main()
