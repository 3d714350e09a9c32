"""The benchmarks' turn-taking is fair: no side always goes after the same other,
and no op starts while what the one before left running still runs."""

from __future__ import annotations

import collections
import contextlib
import itertools
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from rounds import Quiet, interleaved, orders

#: A child that keeps a core busy for as many seconds as its argument says, then idles until killed.
BUSY_FOR = ("import sys, time\nend = time.monotonic() + float(sys.argv[1])\n"
            "while time.monotonic() < end: pass\nprint('idle', flush=True)\ntime.sleep(600)")


def test_every_side_goes_right_after_every_other_equally_often() -> None:
    sides = ["isolated", "plain", "peer"]
    rounds = [order for order, _ in zip(orders(sides), range(12))]
    assert all(sorted(order) == sorted(sides) for order in rounds)
    after = collections.Counter((a, b) for order in rounds for a, b in itertools.pairwise(order))
    assert set(after) == {(a, b) for a in sides for b in sides if a != b}
    assert len(set(after.values())) == 1, after  # a rotation gave ("peer", "isolated") every round
    assert len({order[0] for order in rounds}) == 3


def test_interleaved_waits_for_quiet_before_every_op_and_times_only_the_op() -> None:
    log: list[str] = []
    spreads = interleaved({"k": {"a": lambda: log.append("a"), "b": lambda: log.append("b")}}, rounds=2,
                          warmup=1, quiet=lambda: log.append("quiet"))
    assert log == ["quiet", "a", "quiet", "b", "quiet", "b", "quiet", "a", "quiet", "a", "quiet", "b"]
    assert spreads["k"]["a"].n == spreads["k"]["b"].n == 2


def test_one_side_alone_is_not_waited_for() -> None:
    with busy_child(600) as child:
        started = time.monotonic()
        interleaved({"k": {"alone": lambda: None}}, rounds=3, warmup=0)
        assert time.monotonic() - started < 1.0, "a run of one side waited for its busy child"
        assert child.poll() is None


@contextlib.contextmanager
def busy_child(seconds: float) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen([sys.executable, "-c", BUSY_FOR, str(seconds)], stdout=subprocess.PIPE, text=True) as child:
        try:
            yield child
        finally:
            child.kill()


def test_quiet_waits_until_a_child_stops_working() -> None:
    with busy_child(0.6) as child:
        started = time.monotonic()
        Quiet(window=0.05, busy=0.001, patience=30, watch=lambda: [child.pid])()  # loose: a loaded machine
        assert child.stdout is not None and child.poll() is None
        # The child says "idle" as it stops working: Quiet returned after it had.
        assert select.select([child.stdout], [], [], 0)[0], "Quiet returned while the child still worked"
        assert child.stdout.readline() == "idle\n"
        assert time.monotonic() - started >= 0.5


def test_quiet_gives_up_after_its_patience_and_ignores_what_it_was_told_to() -> None:
    with busy_child(600) as child:
        quiet = Quiet(window=0.1, busy=0.001, patience=0.3, watch=lambda: [child.pid])
        quiet()
        assert quiet.gave_up == 1
        excluded = Quiet(exclude=[child.pid], patience=30, watch=lambda: [child.pid])
        excluded()
        assert excluded.gave_up == 0 and excluded.waited < 5
