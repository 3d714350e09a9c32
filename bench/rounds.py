"""Timed rounds, and what a set of times says: median, p90 and worst.

On a shared machine a single timing swings by 4× or more, and a change of
load lasts seconds: two things timed one after the other do not meet the
same machine. :func:`interleaved` therefore has the things it compares
take turns in every round, and every result is a :class:`Spread` (median,
p90, worst), never one number. The first ``warmup`` rounds are run and
dropped: a process's first allocations of 100 MiB cost up to ten times the
later ones here.

Taking turns is fair only if no side pays for the one before it. Two
things make sure of that:

* The order of the sides goes through every permutation, round by round
  (:func:`orders`), so each side follows each other side equally often. A
  rotation would not do: it keeps the sides' cyclic order, so one side
  always follows the same other (in ``bench_core.py`` the isolated server
  always followed ipyparallel).
* Before each op, :class:`Quiet` waits until the processes of the run are
  idle. A side's work does not end when its call returns: measured here,
  ipyparallel's processes go on for 60–200 ms after a push or pull of 100
  MiB returns and use 40–120 ms of CPU meanwhile (:func:`lingering`
  measures it; ``bench_core.py`` prints it for each side), which fell on
  whoever went next.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import psutil

__all__ = ["Measure", "Op", "Quiet", "Spread", "consecutive", "interleaved", "lingering", "orders", "percentile",
           "timed"]

#: Something to time; what it returns is dropped.
Op = Callable[[], object]


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (``0 < q <= 1``) of ``samples``: a value that was measured."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclasses.dataclass(frozen=True)
class Spread:
    """Seconds: the median, the 90th percentile, the worst and the best of ``n`` timings."""

    n: int
    median: float
    p90: float
    worst: float
    best: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Spread:
        return cls(len(seconds), statistics.median(seconds), percentile(seconds, 0.9), max(seconds),
                   min(seconds))

    def mb_s(self, nbytes: int) -> float:
        """MB/s (10⁶ bytes) of moving ``nbytes`` in the median time."""
        return nbytes / self.median / 1e6

    @property
    def p90_ratio(self) -> float:
        """p90 / median: 1.0 is perfectly steady."""
        return self.p90 / self.median

    @property
    def worst_ratio(self) -> float:
        return self.worst / self.median


def timed(op: Op) -> float:
    started = time.perf_counter()
    op()
    return time.perf_counter() - started


#: How :func:`interleaved` runs one op of a kind and side: its seconds.
Measure = Callable[[str, str, Op], float]


def orders(names: Sequence[str]) -> Iterator[list[str]]:
    """The sides' order for each round, endlessly: every permutation in turn,
    so that over ``len(names)!`` rounds each side comes right after each
    other side equally often (and first equally often)."""
    return (list(order) for order in itertools.cycle(itertools.permutations(names)))


def _cpu_ns(pids: Collection[int], skip: int) -> int:
    """Nanoseconds on a CPU of every thread of ``pids``, but thread ``skip``."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if int(tid) == skip:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
    return total


class Quiet:
    """Waits until this process and every process it started (servers, workers,
    ipyparallel's controller and engine, link emulators) are idle: less than
    ``busy`` seconds of CPU among them over ``window`` seconds, the waiting
    thread not counted. Gives up after ``patience`` seconds (counted in
    :attr:`gave_up`): a benchmark on a busy machine still ends.

    ``exclude``: pids never watched (busy neighbours that are the point of
    the run); ``watch``, where given, says which pids to watch instead of
    this process and its descendants.
    """

    def __init__(self, exclude: Collection[int] = (), window: float = 0.025, busy: float = 0.003,
                 patience: float = 2.0, watch: Callable[[], list[int]] | None = None) -> None:
        self.exclude = set(exclude)
        self.watch = watch
        self.window, self.busy, self.patience = window, busy, patience
        self.gave_up = 0
        #: Seconds spent waiting, in all.
        self.waited = 0.0

    def _pids(self) -> list[int]:
        if self.watch is not None:
            return [p for p in self.watch() if p not in self.exclude]
        me = psutil.Process()
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            children = []
        return [p for p in [me.pid, *(c.pid for c in children)] if p not in self.exclude]

    def __call__(self) -> None:
        started = time.monotonic()
        skip = threading.get_native_id()
        pids = self._pids()
        before = _cpu_ns(pids, skip)
        while True:
            time.sleep(self.window)
            after = _cpu_ns(pids, skip)
            if after - before < self.busy * 1e9:
                break
            if time.monotonic() - started > self.patience:
                self.gave_up += 1
                break
            before = after
        self.waited += time.monotonic() - started


def lingering(op: Op, quiet: Quiet | None = None, seconds: float = 0.3, step: float = 0.02) -> list[float]:
    """Run ``op`` once the run is quiet, then say how much CPU (seconds,
    cumulative, every ``step``) the processes ``quiet`` watches used in the
    ``seconds`` after it returned."""
    quiet = quiet or Quiet()
    skip = threading.get_native_id()
    quiet()
    op()
    pids = quiet._pids()
    start = _cpu_ns(pids, skip)
    marks = []
    for _ in range(round(seconds / step)):
        time.sleep(step)
        marks.append((_cpu_ns(pids, skip) - start) / 1e9)
    return marks


def _nothing() -> None:
    pass


def interleaved(kinds: Mapping[str, Mapping[str, Op]], rounds: int,
                warmup: int = 3, measure: Measure | None = None,
                quiet: Callable[[], None] | None = None) -> dict[str, dict[str, Spread]]:
    """``{kind: {side: Spread}}``: in every round each kind in order, and in
    each kind every side once, in the round's order (:func:`orders`).

    Kinds run in the order given, so a kind may depend on the one before it
    (a pull after its push); sides must not depend on each other.
    ``measure(kind, side, op)`` runs and times each op (by default
    :func:`timed`): one that does more around an op (prepares it, counts
    what it sent) returns the seconds of the op alone. ``quiet`` is called
    before each op, untimed: by default a :class:`Quiet` where a kind has
    two sides or more (so that no side pays for what the one before left
    running), nothing where each has one.
    """
    times: dict[str, dict[str, list[float]]] = {k: {s: [] for s in sides} for k, sides in kinds.items()}
    settle = quiet or (Quiet() if any(len(sides) > 1 for sides in kinds.values()) else _nothing)
    sequence = {kind: orders(list(sides)) for kind, sides in kinds.items()}
    for round_ in range(warmup + rounds):
        for kind, sides in kinds.items():
            for side in next(sequence[kind]):
                settle()
                seconds = measure(kind, side, sides[side]) if measure is not None else timed(sides[side])
                if round_ >= warmup:
                    times[kind][side].append(seconds)
    return {kind: {side: Spread.of(ts) for side, ts in sides_.items()} for kind, sides_ in times.items()}


def consecutive(op: Op, runs: int, warmup: int = 3) -> Spread:
    """``op`` ``runs`` times in a row (after ``warmup`` dropped runs): how steady one thing is alone."""
    for _ in range(warmup):
        op()
    return Spread.of([timed(op) for _ in range(runs)])
