"""The scheduler's bookkeeping: one pool's queues and heaps, users' counts, quotas.

No decisions about time or grants here (those are in :mod:`.scheduler`):
:class:`PoolQueues` keeps one FIFO per (priority, user) and a heap per
priority ordered by fair share, answers which request ranks first and
which free slots a grant takes; :func:`check_quotas` refuses a request
over a quota.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Container, Mapping

from remote_gpu_core.ids import SlotId

from ..isolation.user_sites import DEFAULT_ENVIRONMENT
from .leases import PRIORITIES, LeaseRequestEntry, PoolConfig, Quota, QuotaExceeded, Readiness

__all__ = ["Counts", "Lease", "PoolQueues", "RANK", "Ready", "User", "Waiting", "check_quotas"]

RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

#: A slot's readiness and since when (the scheduler's clock).
Ready = tuple[Readiness, float]
#: How soon each kind of slot has a worker, soonest first.
_SOONEST = {Readiness.WARM: 0, Readiness.STARTING: 1, Readiness.COLD: 2}
#: A slot whose worker runs another environment: a lease would throw it away, and start one.
_OTHER_ENVIRONMENT = 3
_UNKNOWN: Ready = (Readiness.COLD, 0.0)


class Waiting:
    """A request in a queue; ``aging_since``: when it became its queue's first."""

    __slots__ = ("aging_since", "entry", "seq")

    def __init__(self, entry: LeaseRequestEntry, seq: int) -> None:
        self.entry, self.seq, self.aging_since = entry, seq, 0.0


class Lease:
    __slots__ = ("entry", "since", "slots")

    def __init__(self, entry: LeaseRequestEntry, slots: list[SlotId], since: float) -> None:
        self.entry, self.slots, self.since = entry, slots, since


class Counts:
    """One user's slots held, requests waiting and slots they ask for."""

    __slots__ = ("held", "pending", "waiting")

    def __init__(self) -> None:
        self.held = self.waiting = self.pending = 0


class User:
    """A user's counts (overall and per pool) and usage (inflated, see the scheduler)."""

    __slots__ = ("counts", "inflated", "name", "per_pool")

    def __init__(self, name: str) -> None:
        self.name = name
        self.inflated = 0.0
        self.counts = Counts()
        self.per_pool: dict[str, Counts] = {}

    def in_pool(self, pool: str) -> Counts:
        counts = self.per_pool.get(pool)
        if counts is None:
            counts = self.per_pool[pool] = Counts()
        return counts


class PoolQueues:
    """One pool's free slots and its queues: one FIFO per (priority, user).

    ``heaps[rank]`` holds ``(slots held, inflated usage, seq of the user's
    first request, user)`` for every user waiting at that rank;
    ``pushed[rank][user]`` is the current entry, older ones are dropped when
    they reach the top. ``heads`` holds each queue's first request, in the
    order they started to age.
    """

    def __init__(self, config: PoolConfig, node_of: Mapping[SlotId, str],
                 readiness: Mapping[SlotId, Ready] | None = None,
                 environments: Mapping[SlotId, str] | None = None) -> None:
        self.config = config
        self.node_of = node_of  # the scheduler's, shared
        self.readiness: Mapping[SlotId, Ready] = readiness if readiness is not None else {}  # shared too
        #: The environment of each slot's worker (the scheduler's, shared); unsaid: the default.
        self.environments: Mapping[SlotId, str] = environments if environments is not None else {}
        self.order = {slot: i for i, slot in enumerate(config.slots)}
        self.free: list[SlotId] = list(config.slots)
        self.heads: OrderedDict[int, Waiting] = OrderedDict()  # by aging_since
        self.queues: list[dict[str, OrderedDict[int, Waiting]]] = [{} for _ in PRIORITIES]
        self.heaps: list[list[tuple[int, float, int, str]]] = [[] for _ in PRIORITIES]
        self.pushed: list[dict[str, tuple[int, float, int]]] = [{} for _ in PRIORITIES]

    @property
    def name(self) -> str:
        return self.config.name

    def add_slots(self, slots: list[SlotId]) -> None:
        """Slots that joined the pool; they are free."""
        self.config = dataclasses.replace(self.config, slots=self.config.slots + tuple(slots))
        for slot in slots:
            self.order[slot] = len(self.order)
        self.free += slots
        self.free.sort(key=self.order.__getitem__)

    def nodes(self) -> dict[str, list[SlotId]]:
        """The pool's slots by node, in the pool's order."""
        by_node: dict[str, list[SlotId]] = {}
        for slot in self.config.slots:
            by_node.setdefault(self.node_of.get(slot, ""), []).append(slot)
        return by_node

    def largest_node(self, leaving_out: Container[SlotId] = ()) -> int:
        """The most slots of this pool on one node, not counting ``leaving_out``."""
        return max((len([s for s in slots if s not in leaving_out]) for slots in self.nodes().values()),
                   default=0)

    def soonest(self, slot: SlotId, environment: str = DEFAULT_ENVIRONMENT) -> tuple[int, float]:
        """Sorts slots by how soon a lease in ``environment`` would have their
        worker: warm first, then those whose worker began to start earliest,
        then those with none, then those whose worker runs another environment
        (taking one throws a warm worker away)."""
        readiness, since = self.readiness.get(slot, _UNKNOWN)
        if readiness is not Readiness.COLD and self.environments.get(slot, DEFAULT_ENVIRONMENT) != environment:
            return _OTHER_ENVIRONMENT, 0.0
        return _SOONEST[readiness], since if readiness is Readiness.STARTING else 0.0

    def take(self, n: int, environment: str = DEFAULT_ENVIRONMENT) -> list[SlotId] | None:
        """Take ``n`` free slots, all on one node, in the pool's order; None,
        taking nothing, where no node has ``n`` free.

        One slot: the one whose worker in ``environment`` is ready soonest (:meth:`soonest`),
        the first in the pool's order among equals. Several: such a lease
        starts a worker of its own on all of them and the slots' own workers
        are thrown away, so it takes those ready last, on the node where
        that throws away fewest warm workers, then fewest starting ones, then
        whose ``n``-th free slot comes first in the pool's order (with no
        readiness known, the order alone decides, as for one slot).
        """
        if n == 1:
            if not self.free:
                return None
            slot = min(self.free, key=lambda s: (self.soonest(s, environment), self.order[s]))
            self.free.remove(slot)
            return [slot]
        by_node: dict[str, list[SlotId]] = {}
        nth: dict[str, int] = {}  # where each node's n-th free slot is in the pool's order
        for index, slot in enumerate(self.free):
            group = by_node.setdefault(self.node_of.get(slot, ""), [])
            group.append(slot)
            if len(group) == n:
                nth[self.node_of.get(slot, "")] = index

        def colder(slot: SlotId) -> tuple[int, float, int]:
            rank, since = self.soonest(slot)
            return -rank, -since, self.order[slot]

        best: tuple[tuple[int, int, int], list[SlotId]] | None = None
        for node, index in nth.items():
            chosen = sorted(by_node[node], key=colder)[:n]
            ranks = [self.soonest(slot)[0] for slot in chosen]
            cost = (ranks.count(_SOONEST[Readiness.WARM]), ranks.count(_SOONEST[Readiness.STARTING]), index)
            if best is None or cost < best[0]:
                best = (cost, chosen)
        if best is None:
            return None
        taken = set(best[1])
        self.free[:] = [s for s in self.free if s not in taken]
        return sorted(taken, key=self.order.__getitem__)

    def push(self, rank: int, user: User) -> None:
        """Make ``user``'s heap entry at ``rank`` current."""
        queue = self.queues[rank].get(user.name)
        pushed = self.pushed[rank]
        if not queue:
            pushed.pop(user.name, None)
            return
        key = (user.counts.held, user.inflated, next(iter(queue.values())).seq)
        if pushed.get(user.name) == key:
            return
        pushed[user.name] = key
        heap = self.heaps[rank]
        heapq.heappush(heap, (*key, user.name))
        if len(heap) > 4 * len(pushed) + 64:
            heap[:] = [(*k, name) for name, k in pushed.items()]
            heapq.heapify(heap)

    def start_aging(self, waiting: Waiting, now: float) -> None:
        """``waiting`` became the first of its user's queue: its wait counts from now."""
        waiting.aging_since = now
        self.heads[waiting.entry.key] = waiting

    def best(self, now: float, max_wait: float) -> Waiting | None:
        """The request ranked first: the longest overdue, else by priority then fair share."""
        if not self.heads:
            return None
        oldest = next(iter(self.heads.values()))
        if now - oldest.aging_since >= max_wait:
            return oldest
        for rank in range(len(PRIORITIES)):
            heap, pushed = self.heaps[rank], self.pushed[rank]
            while heap:
                held, inflated, seq, name = heap[0]
                if pushed.get(name) == (held, inflated, seq):
                    return next(iter(self.queues[rank][name].values()))
                heapq.heappop(heap)
        raise AssertionError("a waiting request is in no queue")

    def ranked(self, now: float, max_wait: float, users: Mapping[str, User]) -> list[int]:
        """Keys of the waiting requests in order of service (see ``Scheduler.positions``)."""
        overdue: list[int] = []
        for key, waiting in self.heads.items():
            if now - waiting.aging_since < max_wait:
                break
            overdue.append(key)
        ranked = list(overdue)
        for rank in range(len(PRIORITIES)):
            # Sort on one int: (slots held by then) * users + the user's order.
            by_usage = sorted(self.pushed[rank].items(), key=lambda item: item[1][1:])
            n = len(by_usage)
            order: list[int] = []
            keys: list[int] = []
            for index, (name, _) in enumerate(by_usage):
                value = users[name].counts.held * n + index
                for waiting in self.queues[rank][name].values():
                    order.append(value)
                    keys.append(waiting.entry.key)
                    value += waiting.entry.gpus * n
            ranked += [keys[i] for i in sorted(range(len(keys)), key=order.__getitem__)]
        if overdue:
            skip = set(overdue)
            ranked = overdue + [key for key in ranked[len(overdue):] if key not in skip]
        return ranked


def check_quotas(request: LeaseRequestEntry, user: User, overall: Quota, pool: PoolConfig) -> None:
    """Raise :class:`QuotaExceeded`, naming the quota and its value, if ``request`` breaks one."""
    levels = ((overall, "", user.counts),
              (pool.quota(user.name), f" in pool {pool.name!r}", user.in_pool(pool.name)))
    for quota, where, counts in levels:
        if quota.max_gpus is not None and counts.held + counts.pending + request.gpus > quota.max_gpus:
            raise QuotaExceeded(
                f"quota: {user.name} may hold at most {quota.max_gpus} GPU(s) at once{where} "
                f"(max_gpus={quota.max_gpus}); {counts.held} held, {counts.pending} asked for "
                f"by waiting requests, {request.gpus} by this one: release a lease, "
                "cancel a waiting request or ask for fewer")
        if quota.max_waiting is not None and counts.waiting + 1 > quota.max_waiting:
            raise QuotaExceeded(
                f"quota: {user.name} may have at most {quota.max_waiting} request(s) waiting{where} "
                f"(max_waiting={quota.max_waiting}); {counts.waiting} already waiting: "
                "cancel one or wait for a grant")
