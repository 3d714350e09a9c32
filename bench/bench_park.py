"""Parking and resuming a session that holds 1 GiB of arrays.

    python bench/bench_park.py [--rounds 5] [--gib 1] [--smoke]

Starts a server with one CPU slot (as root: workers isolated, each user's
own uid), leases a session and fills it with numpy arrays and a torch
tensor, 1 GiB in all. Each round parks it (``session.park()``: the worker
saves its namespace into the session folder, is killed, the slot goes back)
and resumes it (``session.resume()``: a lease, the slot's warm worker
enters the session folder and loads the namespace, the files go), each
timed at the client from the request to its answer. Before each resume the
slot's warm worker is given time to start, as it would have while a user
is at lunch: the server's ``/api/status`` must show the slot warm
(``warm_server.py``). *restore*, the server's own time from the grant to
the namespace loaded, is read from the notice that the resume shows. For comparison, in the same run, what a user would do by hand
in one process: ``numpy.save`` and ``torch.save`` of the same arrays and
tensor into the same folder, and ``numpy.load`` and ``torch.load`` back.

Prints median, p90 and worst of each, and the target: park and resume
under 2 s each.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from reporting import finish, parse_args, table
from rounds import Spread
from warm_server import WarmServer

#: How the resume's notice says how long the restore took ("... in 1.3 s.").
_RESTORED = re.compile(r"in (\d+\.\d+) s\.")
SMOKE = {"rounds": 1, "gib": 0.02}


def fill(gib: float) -> str:
    """A cell that holds ``gib`` GiB: four numpy arrays and a torch tensor (a fifth each)."""
    part = int(gib * (1 << 30) / 5 / 8)
    return ("import numpy as np, torch\n"
            f"arrays = [np.full({part}, float(i)) for i in range(4)]\n"
            f"weights = torch.full(({part},), 7.0, dtype=torch.float64)\n"
            "check = sum(float(a[-1]) for a in arrays) + float(weights[-1])\n")


def by_hand(folder: Path, gib: float) -> tuple[float, float]:
    """Seconds to ``numpy.save``/``torch.save`` what :func:`fill` holds into ``folder``,
    and to load it back."""
    import torch

    ns: dict[str, object] = {}
    exec(fill(gib), ns)
    arrays: Any = ns["arrays"]
    weights = ns["weights"]
    started = time.perf_counter()
    for i, array in enumerate(arrays):
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
    parser.add_argument("--rounds", type=int, default=5, help="parks and resumes (default 5)")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB the session holds (default 1)")
    args = parse_args(parser, SMOKE)

    times: dict[str, list[float]] = {k: [] for k in ("park", "save (in the worker)", "resume",
                                                     "restore (grant to loaded)", "numpy.save + torch.save",
                                                     "numpy.load + torch.load")}
    sizes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="rgpu-bench-park-") as tmp, \
            WarmServer(Path(tmp) / "server", "cpu:1") as server:
        mode = server.isolation
        notices: list[str] = []
        session = server.client().session(on_notice=notices.append)
        result = session.execute(fill(args.gib), on_output=lambda _: None)
        assert result.ok, result.error
        for _ in range(args.rounds):
            started = time.perf_counter()
            parked = session.park()
            times["park"].append(time.perf_counter() - started)
            times["save (in the worker)"].append(parked.seconds)
            sizes.append(parked.nbytes)
            server.wait_warm()
            started = time.perf_counter()
            session.resume()
            times["resume"].append(time.perf_counter() - started)
            found = _RESTORED.search(notices[-1]) if notices else None
            if found is None:
                raise AssertionError("the resume's notice no longer says how long the restore took "
                                     f"(bench_park.py's _RESTORED): {notices[-1:]}")
            times["restore (grant to loaded)"].append(float(found.group(1)))
            check = session.execute("print(check)", on_output=lambda _: None).stdout
            assert float(check) == 6.0 + 7.0, check
            saved, loaded = by_hand(Path(tmp), args.gib)
            times["numpy.save + torch.save"].append(saved)
            times["numpy.load + torch.load"].append(loaded)
        session.release()
    print(f"{args.rounds} rounds, {statistics.median(sizes) / (1 << 30):.2f} GiB on disk, workers: {mode}\n")
    spreads = {name: Spread.of(values) for name, values in times.items()}
    print(table(["what", "median s", "p90 s", "worst s", "best s"],
                [[name, s.median, s.p90, s.worst, s.best] for name, s in spreads.items()]))
    if not args.smoke:
        park, resume = spreads["park"].median, spreads["resume"].median
        met = "met" if park < 2 and resume < 2 else "NOT met"
        print(f"\ntarget (park and resume of {args.gib:g} GiB under 2 s each): {met}")
    finish(args, ("numpy", "torch"))


if __name__ == "__main__":
    main()
