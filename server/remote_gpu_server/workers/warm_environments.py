"""Which environment a slot's next warm worker runs.

Every environment gets one warm worker where slots allow (the server's own,
``default``, first, then by demand); the slots beyond that go to the busy
ones: each new warm worker goes to the environment whose recent leases are
most in excess of its warm workers. Demand is the count of leases asked in
each environment, decayed with a half-life (:data:`HALF_LIFE`), so a burst
in one environment shifts the pool towards it for a while and then lets go.

Also kept here: how long the last starts of each environment's workers took,
for a lease's notice ("starting a worker for environment np1, ~3 s").
No I/O, an injected clock: tested without workers.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["HALF_LIFE", "WarmEnvironments"]

#: Seconds after which a lease counts half as much in the demand.
HALF_LIFE = 600.0


class WarmEnvironments:
    """See the module docstring; ``names``: the environments, ``default`` first."""

    def __init__(self, names: Sequence[str], clock: Callable[[], float] = time.monotonic,
                 half_life: float = HALF_LIFE) -> None:
        if not names:
            raise ValueError("at least one environment")
        self.names = list(names)
        self._clock = clock
        self._rate = math.log(2) / half_life
        self._demand = {name: 0.0 for name in self.names}
        self._since = clock()
        self._starts: dict[str, collections.deque[float]] = {name: collections.deque(maxlen=5)
                                                             for name in self.names}

    def unknown(self, name: str) -> str | None:
        """Why a lease cannot ask for ``name`` here (no such environment), else None."""
        if name in self.names:
            return None
        return (f"there is no environment {name!r} on this server; it has: {', '.join(self.names)} "
                "(rgpu envs lists them)")

    def asked(self, environment: str) -> None:
        """A lease asked for ``environment``."""
        self._decay()
        if environment in self._demand:
            self._demand[environment] += 1.0

    def demand(self) -> dict[str, float]:
        self._decay()
        return dict(self._demand)

    def _decay(self) -> None:
        now = self._clock()
        factor = math.exp(-self._rate * max(0.0, now - self._since))
        self._since = now
        for name in self._demand:
            self._demand[name] *= factor

    def choose(self, warm: Iterable[str], allowed: Sequence[str] = ()) -> str:
        """The environment of the next warm worker, given those of the other
        slots' warm (or starting) workers; only among ``allowed`` where the
        slot runs only some (a pool's ``:env=``)."""
        counts = collections.Counter(warm)
        names = [name for name in self.names if name in allowed] or self.names if allowed else self.names
        missing = [name for name in names if counts[name] == 0]
        demand = self.demand()
        if missing:  # one each first: the most asked for, the default on a tie
            return max(missing, key=lambda name: (demand[name], -self.names.index(name)))
        # Then where the demand per warm worker is highest.
        return max(names, key=lambda name: ((demand[name] + 0.01) / (counts[name] + 1),
                                            -self.names.index(name)))

    def started(self, environment: str, seconds: float) -> None:
        """A worker of ``environment`` took ``seconds`` to start."""
        if environment in self._starts:
            self._starts[environment].append(seconds)

    def start_time(self, environment: str) -> float | None:
        """The median of its last starts, or None before the first."""
        starts = self._starts.get(environment)
        return statistics.median(starts) if starts else None

    def status_json(self, warm: Mapping[str, int]) -> dict[str, dict[str, float | int | None]]:
        demand = self.demand()
        return {name: {"warm": warm.get(name, 0), "demand": round(demand[name], 3),
                       "start_seconds": self.start_time(name)} for name in self.names}
