"""Timed rounds, and what a set of times says: median, p90 and worst.

On a shared machine a single timing swings by 4× or more, and a change of
load lasts seconds: two things timed one after the other do not meet the
same machine. :func:`interleaved` therefore has the things it compares
take turns in every round (and rotates who goes first), and every result
is a :class:`Spread` (median, p90, worst), never one number. The first
``warmup`` rounds are run and dropped: a process's first allocations of
100 MiB cost up to ten times the later ones here.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["Measure", "Op", "Spread", "consecutive", "interleaved", "percentile", "timed"]

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


def interleaved(kinds: Mapping[str, Mapping[str, Op]], rounds: int,
                warmup: int = 3, measure: Measure | None = None) -> dict[str, dict[str, Spread]]:
    """``{kind: {side: Spread}}``: in every round each kind in order, and in
    each kind every side once, the sides' order rotating from round to round.

    Kinds run in the order given, so a kind may depend on the one before it
    (a pull after its push); sides must not depend on each other.
    ``measure(kind, side, op)`` runs and times each op (by default
    :func:`timed`): one that does more around an op (prepares it, counts
    what it sent) returns the seconds of the op alone.
    """
    times: dict[str, dict[str, list[float]]] = {k: {s: [] for s in sides} for k, sides in kinds.items()}
    for round_ in range(warmup + rounds):
        for kind, sides in kinds.items():
            names = list(sides)
            shift = round_ % len(names)
            for side in names[shift:] + names[:shift]:
                seconds = measure(kind, side, sides[side]) if measure is not None else timed(sides[side])
                if round_ >= warmup:
                    times[kind][side].append(seconds)
    return {kind: {side: Spread.of(ts) for side, ts in sides_.items()} for kind, sides_ in times.items()}


def consecutive(op: Op, runs: int, warmup: int = 3) -> Spread:
    """``op`` ``runs`` times in a row (after ``warmup`` dropped runs): how steady one thing is alone."""
    for _ in range(warmup):
        op()
    return Spread.of([timed(op) for _ in range(runs)])
