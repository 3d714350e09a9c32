"""What the scheduler is asked and how it is configured: lease requests,
grants, quotas, pools and the ranking settings, and what it is told of
each slot's worker (:class:`Readiness`).

Frozen dataclasses with no behaviour beyond validation; the decisions are
in :mod:`.scheduler`, which re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from remote_gpu_core.ids import SlotId

from ..errors import QuotaExceeded
from ..isolation.user_sites import DEFAULT_ENVIRONMENT

__all__ = ["DEFAULT_POOL", "PRIORITIES", "Grant", "Holding", "LeaseRequestEntry", "PoolConfig",
           "Quota", "QuotaExceeded", "Readiness", "SchedulerConfig"]

#: Priorities from highest to lowest.
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
#: The pool of every slot that no configured pool names.
DEFAULT_POOL = "default"


class Readiness(enum.Enum):
    """What a slot's worker is doing, as the warm pool tells the scheduler:
    how long a lease of the slot would wait for its worker."""

    #: A started worker waits on it: a lease takes it at once.
    WARM = "warm"
    #: Its worker is being started: a lease waits for the rest of the start.
    STARTING = "starting"
    #: No worker: a lease waits for a whole start (a failed start, a slot
    #: just taken, or one nothing was said of).
    COLD = "cold"


@dataclasses.dataclass(frozen=True)
class LeaseRequestEntry:
    """A lease request; ``key`` is unique per server.

    ``submitted`` is informative only: waits are measured on the scheduler's
    own clock from the :meth:`Scheduler.submit` call.
    """

    key: int
    user: str
    gpus: int
    submitted: float
    priority: str = "normal"
    pool: str = DEFAULT_POOL
    #: The environment its worker runs (see :mod:`..environments`): a slot warm in it is taken first.
    environment: str = DEFAULT_ENVIRONMENT


@dataclasses.dataclass(frozen=True)
class Grant:
    """``request`` now holds ``slots``, all from its pool."""

    request: LeaseRequestEntry
    slots: tuple[SlotId, ...]


@dataclasses.dataclass(frozen=True)
class Holding:
    """A lease in force: who holds which slots since when (scheduler clock)."""

    request: LeaseRequestEntry
    slots: tuple[SlotId, ...]
    since: float


@dataclasses.dataclass(frozen=True)
class Quota:
    """Limits for one user; ``None`` means no limit.

    ``max_gpus`` bounds the slots held plus those asked for by waiting
    requests, so grants can never exceed it; ``max_waiting`` bounds the
    requests waiting, a new one included.
    """

    max_gpus: int | None = None
    max_waiting: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_gpus", "max_waiting"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, not {value}")


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """A named set of slots with its own idle timeout and quotas.

    A user's quota is ``user_quotas[user]`` if present (it replaces the
    default as a whole), else ``default_quota``. Pool quotas apply on top
    of the scheduler-wide ones, counting this pool only.
    """

    name: str
    slots: tuple[SlotId, ...]
    idle_timeout: float | None = None
    default_quota: Quota = Quota()
    user_quotas: Mapping[str, Quota] = dataclasses.field(default_factory=dict)
    #: Park a session of this pool idle for this many seconds (None: the server's ``--park-after``).
    park_after: float | None = None
    #: The environments its slots run (``:env=``), the first for a lease that names
    #: none; empty: every environment of the server.
    environments: tuple[str, ...] = ()

    def environment(self, asked: str) -> str:
        """The environment a lease in this pool that asked for ``asked`` runs:
        ``asked``, or the pool's first where the lease named none (``default``)
        and the pool does not run it; ValueError where the pool does not run it."""
        if not self.environments or asked in self.environments:
            return asked
        if asked == DEFAULT_ENVIRONMENT:
            return self.environments[0]
        raise ValueError(f"pool {self.name!r} runs environment(s) {', '.join(self.environments)}, "
                         f"not {asked!r}: ask for one of them, or another pool")

    def quota(self, user: str) -> Quota:
        return self.user_quotas.get(user, self.default_quota)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler ranks and limits requests.

    ``half_life`` (seconds, ``math.inf`` for no decay): how fast past usage
    stops counting for fair share; short half-lives equalise recent use, not
    a day's total. ``max_wait`` (seconds): the aging bound
    after which the first request of a user's queue outranks every request
    that has waited less; set it above the usual wait, since overdue
    requests go by age, not by fair share. Quotas as in :class:`PoolConfig`. ``pools``: a
    slot may be in one pool at most; slots named by none form the pool
    ``"default"`` (there is none if every slot is named).
    """

    half_life: float = 24 * 3600.0
    max_wait: float = 4 * 3600.0
    default_quota: Quota = Quota()
    user_quotas: Mapping[str, Quota] = dataclasses.field(default_factory=dict)
    pools: tuple[PoolConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError(f"half_life must be more than 0 s, not {self.half_life}")
        if not self.max_wait >= 0:
            raise ValueError(f"max_wait must be 0 s or more, not {self.max_wait}")

    def quota(self, user: str) -> Quota:
        return self.user_quotas.get(user, self.default_quota)
