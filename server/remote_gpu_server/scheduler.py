"""Who gets the next free slots: priorities, fair share, quotas, aging, pools.

Pure logic: no I/O, and time comes from an injected ``clock`` (default
:func:`time.monotonic`), so every rule is tested with a fake clock.

Calling contract (what :class:`~remote_gpu_server.app.GpuServer` does):

* :meth:`Scheduler.submit` when a lease is asked for; it raises
  :class:`QuotaExceeded` (a ``ValueError``) or ``ValueError`` at once when
  the request can never be queued, else returns the grants now possible.
* :meth:`Scheduler.release` when slots come back (a session ended, or a grant
  could not be delivered); :meth:`Scheduler.cancel` when a waiting client
  goes away; :meth:`Scheduler.tick` now and then (e.g. from the idle reaper),
  since ranks move with time even when no event happens.
* Every call returns the grants that became possible; a grant is the start
  of a lease and a release its end, which is how the scheduler accounts
  GPU-seconds itself (slots held × time on its clock).
* :meth:`Scheduler.set_healthy` when a slot's health changes (GPU readings):
  an unhealthy slot is never granted; a lease holding it keeps it until
  released, and it is free again only once it is healthy.
* :meth:`Scheduler.positions` after each call, to tell clients their place.

The server builds ``Scheduler([s.id for s in slots], SchedulerConfig(...))``,
puts ``priority`` and ``pool`` into each :class:`LeaseRequestEntry`, and takes
a session's idle timeout from ``scheduler.pool_of(slot).idle_timeout``
(``None``: the server's default). The request and configuration types live
in :mod:`.leases`.

Ranking inside one pool, best first:

1. *Overdue* requests, longest wait first: those that have waited
   ``max_wait`` seconds or more at the front of their user's queue (one
   queue per user, pool and priority; a request starts to age when the
   requests before it in that queue are served or cancelled). They rank
   above every request that has waited less, whatever its priority, so the
   first request of each queue is served within ``max_wait`` plus the time
   for enough slots to come free for it and for the overdue ones ahead.
   Aging only the front of each queue keeps a user from buying precedence
   by queueing many requests.
2. Then by priority, ``high`` > ``normal`` > ``low``.
3. Within one priority, fair share: the user holding the fewest slots now,
   then the user with the least decayed usage (GPU-seconds, each weighted
   by ``0.5 ** (age / half_life)``), then the user whose oldest waiting
   request is older; a user's own requests go in order. Slots held come
   first because a lease's GPU time counts only as it passes: a user just
   granted a slot would otherwise still look cheap and collect the next
   slots too (in the day-long simulation of ``bench/bench_scheduler.py``
   this kept long-job users 20-30 % above an equal share).

Multi-slot leases: the best-ranked request of a pool is granted only when
enough slots are free, and while it waits nothing ranked below it in that
pool is granted (no overtaking). Slots may stay idle for it, but a large
request is never starved by a stream of small ones: if others come to rank
above it while it waits, aging puts it first after ``max_wait`` at most.

Unhealthy slots: a request that asks for more slots than its pool has
healthy ones cannot be granted until enough recover, so it holds nothing up
meanwhile: the best-ranked request that could be granted blocks the pool
instead. It keeps its rank and position, and goes first once it fits.

Positions are per pool: position 1 is the request its pool would serve next.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from remote_gpu_kernel.typing import SlotId

from .leases import (
    DEFAULT_POOL,
    PRIORITIES,
    Grant,
    Holding,
    LeaseRequestEntry,
    PoolConfig,
    Quota,
    QuotaExceeded,
    SchedulerConfig,
)

__all__ = ["DEFAULT_POOL", "PRIORITIES", "Grant", "Holding", "LeaseRequestEntry",
           "PoolConfig", "Quota", "QuotaExceeded", "Scheduler", "SchedulerConfig"]

_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
#: Usage is kept inflated by 2**((t - epoch) / half_life); re-based after this
#: many half-lives, long before a float could overflow (2**1024).
_REBASE_HALF_LIVES = 256.0


class _Waiting:
    __slots__ = ("aging_since", "entry", "seq")

    def __init__(self, entry: LeaseRequestEntry, seq: int) -> None:
        self.entry, self.seq, self.aging_since = entry, seq, 0.0


class _Lease:
    __slots__ = ("entry", "since", "slots")

    def __init__(self, entry: LeaseRequestEntry, slots: list[SlotId], since: float) -> None:
        self.entry, self.slots, self.since = entry, slots, since


class _Counts:
    """One user's slots held, requests waiting and slots they ask for."""

    __slots__ = ("held", "pending", "waiting")

    def __init__(self) -> None:
        self.held = self.waiting = self.pending = 0


class _User:
    __slots__ = ("counts", "inflated", "name", "per_pool")

    def __init__(self, name: str) -> None:
        self.name = name
        self.inflated = 0.0
        self.counts = _Counts()
        self.per_pool: dict[str, _Counts] = {}

    def in_pool(self, pool: str) -> _Counts:
        counts = self.per_pool.get(pool)
        if counts is None:
            counts = self.per_pool[pool] = _Counts()
        return counts


class _Pool:
    """One pool's free slots and its queues: one FIFO per (priority, user).

    ``heaps[rank]`` holds ``(slots held, inflated usage, seq of the user's
    first request, user)`` for every user waiting at that rank;
    ``pushed[rank][user]`` is the current entry, older ones are dropped when
    they reach the top. ``heads`` holds each queue's first request, in the
    order they started to age.
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.order = {slot: i for i, slot in enumerate(config.slots)}
        self.free: list[SlotId] = list(config.slots)
        self.unhealthy = 0  # slots of this pool marked unhealthy
        self.heads: OrderedDict[int, _Waiting] = OrderedDict()  # by aging_since
        self.queues: list[dict[str, OrderedDict[int, _Waiting]]] = [{} for _ in PRIORITIES]
        self.heaps: list[list[tuple[int, float, int, str]]] = [[] for _ in PRIORITIES]
        self.pushed: list[dict[str, tuple[int, float, int]]] = [{} for _ in PRIORITIES]


class Scheduler:
    """Priorities, decayed fair share, quotas, aging and pools over ``slots``.

    ``slots`` are all the slots of this machine; ``config`` defaults to
    :class:`SchedulerConfig()` (one pool ``"default"``, no quotas).
    """

    def __init__(self, slots: Iterable[SlotId], config: SchedulerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config if config is not None else SchedulerConfig()
        self._clock = clock
        self._epoch = self._settled = clock()
        all_slots = list(slots)
        if len(set(all_slots)) != len(all_slots):
            raise ValueError("a slot is listed twice")
        pools = list(self.config.pools)
        named = [slot for pool in pools for slot in pool.slots]
        for slot in named:
            if slot not in all_slots:
                raise ValueError(f"a pool names slot {slot}, which this machine does not have")
            if named.count(slot) > 1:
                raise ValueError(f"slot {slot} is in more than one pool")
        if len({pool.name for pool in pools}) != len(pools):
            raise ValueError("two pools have the same name")
        rest = tuple(slot for slot in all_slots if slot not in named)
        if rest or not pools:
            default = next((p for p in pools if p.name == DEFAULT_POOL), None)
            if default is None:
                pools.append(PoolConfig(DEFAULT_POOL, rest))
            else:
                pools[pools.index(default)] = dataclasses.replace(default, slots=default.slots + rest)
        self._pools = {config.name: _Pool(config) for config in pools}
        self._pool_of = {slot: pool for pool in self._pools.values() for slot in pool.config.slots}
        self._all = all_slots
        self._users: dict[str, _User] = {}
        self._holders: dict[str, _User] = {}
        self._waiting: dict[int, _Waiting] = {}
        self._leases: dict[SlotId, _Lease] = {}
        self._unhealthy: set[SlotId] = set()
        self._seq = itertools.count()

    # -- reading ------------------------------------------------------------

    @property
    def free(self) -> list[SlotId]:
        """Free (unleased, healthy) slots of every pool, in the machine's order."""
        return [slot for slot in self._all if slot not in self._leases and slot not in self._unhealthy]

    @property
    def unhealthy(self) -> list[SlotId]:
        """Slots marked unhealthy by :meth:`set_healthy`, leased or not, in the machine's order."""
        return [slot for slot in self._all if slot in self._unhealthy]

    @property
    def waiting(self) -> list[LeaseRequestEntry]:
        """Waiting requests in the order they arrived (not their rank)."""
        return [w.entry for w in self._waiting.values()]

    @property
    def pools(self) -> tuple[PoolConfig, ...]:
        return tuple(pool.config for pool in self._pools.values())

    def pool_of(self, slot: SlotId) -> PoolConfig:
        """The pool that ``slot`` belongs to (for its ``idle_timeout``)."""
        return self._pool_of[slot].config

    def holders(self) -> list[Holding]:
        """Leases in force, oldest first; a partly released lease lists what is left."""
        seen: dict[int, Holding] = {}
        for lease in self._leases.values():
            if id(lease) not in seen:
                seen[id(lease)] = Holding(lease.entry, tuple(lease.slots), lease.since)
        return sorted(seen.values(), key=lambda h: h.since)

    def usage(self, user: str) -> float:
        """``user``'s decayed GPU-seconds now (what fair share compares)."""
        now = self._advance()
        known = self._users.get(user)
        return 0.0 if known is None else known.inflated * self._deflation(now)

    def positions(self) -> dict[int, int]:
        """Position in its pool (1 = served next) of every waiting request, by key.

        It is the order of service if slots came free now, one after another
        (each grant adds to its user's slots held); it changes as usage and
        waits grow. It sorts every waiting request: about 10 ms at 10,000.
        """
        now = self._advance()
        result: dict[int, int] = {}
        for pool in self._pools.values():
            result.update(zip(self._ranked(pool, now), itertools.count(1)))
        return result

    # -- events -------------------------------------------------------------

    def submit(self, request: LeaseRequestEntry) -> list[Grant]:
        """Queue ``request``; returns the grants now possible (maybe its own).

        Raises ``ValueError`` for a request that can never be granted (unknown
        pool or priority, more slots than its pool has, a key already in use)
        and :class:`QuotaExceeded` for one over a quota; nothing changes then.
        """
        pool = self._pools.get(request.pool)
        if pool is None:
            raise ValueError(f"there is no pool {request.pool!r}; pools: {', '.join(self._pools)}")
        rank = _RANK.get(request.priority)
        if rank is None:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {request.priority!r}")
        if request.gpus < 1:
            raise ValueError("a lease needs at least one slot")
        size = len(pool.config.slots)
        if request.gpus > size:
            raise ValueError(f"pool {pool.config.name!r} has {size} slot(s); "
                             f"a lease of {request.gpus} can never be granted")
        if request.key in self._waiting or any(lease.entry.key == request.key for lease in self._leases.values()):
            raise ValueError(f"request key {request.key} is already in use")
        user = self._users.get(request.user) or _User(request.user)
        self._check_quotas(request, user)
        self._users[user.name] = user
        now = self._advance()
        waiting = _Waiting(request, next(self._seq))
        self._waiting[request.key] = waiting
        queue = pool.queues[rank].setdefault(user.name, OrderedDict())
        queue[request.key] = waiting
        if len(queue) == 1:
            self._start_aging(pool, waiting, now)
        for counts in (user.counts, user.in_pool(pool.config.name)):
            counts.waiting += 1
            counts.pending += request.gpus
        self._push(pool, rank, user)
        return self._grant(pool, now)

    def release(self, slots: Iterable[SlotId]) -> list[Grant]:
        """Free leased ``slots`` (all or part of a lease); returns new grants.

        Raises ``ValueError``, changing nothing, if one of them is not leased.
        """
        slots = list(slots)
        for slot in slots:
            if slot not in self._leases or slots.count(slot) > 1:
                raise ValueError(f"slot {slot} is not leased")
        now = self._advance()
        touched: dict[str, _Pool] = {}
        for slot in slots:
            lease = self._leases.pop(slot)
            lease.slots.remove(slot)
            pool = self._pool_of[slot]
            touched[pool.config.name] = pool
            if slot not in self._unhealthy:
                pool.free.append(slot)
            user = self._users[lease.entry.user]
            user.counts.held -= 1
            user.in_pool(pool.config.name).held -= 1
            if not user.counts.held:
                del self._holders[user.name]
            self._push_all(user)
        grants: list[Grant] = []
        for pool in touched.values():
            pool.free.sort(key=pool.order.__getitem__)
            grants += self._grant(pool, now)
        return grants

    def cancel(self, key: int) -> list[Grant]:
        """Withdraw waiting request ``key`` (no-op if it is not waiting); returns new grants."""
        waiting = self._waiting.get(key)
        if waiting is None:
            return []
        now = self._advance()
        pool = self._pools[waiting.entry.pool]
        self._unqueue(pool, waiting, now)
        return self._grant(pool, now)

    def set_healthy(self, slot: SlotId, healthy: bool) -> list[Grant]:
        """Mark ``slot`` healthy or not; returns the grants now possible.

        An unhealthy slot is neither free nor granted. A lease that holds it
        keeps it until :meth:`release`, after which it stays out of the free
        slots until it is marked healthy again; recovering frees it (if not
        leased) and may grant. Marking a slot as it already is changes
        nothing. Raises ``ValueError`` for a slot this machine does not have.
        """
        pool = self._pool_of.get(slot)
        if pool is None:
            raise ValueError(f"there is no slot {slot!r}")
        now = self._advance()
        if not healthy:
            if slot in self._unhealthy:
                return []
            self._unhealthy.add(slot)
            pool.unhealthy += 1
            if slot in pool.free:
                pool.free.remove(slot)
            # A request that needed this slot may no longer fit: others may go.
            return self._grant(pool, now)
        if slot not in self._unhealthy:
            return []
        self._unhealthy.discard(slot)
        pool.unhealthy -= 1
        if slot not in self._leases:
            pool.free.append(slot)
            pool.free.sort(key=pool.order.__getitem__)
        return self._grant(pool, now)

    def tick(self) -> list[Grant]:
        """Re-rank with the current time; returns grants that waiting made possible."""
        now = self._advance()
        grants: list[Grant] = []
        for pool in self._pools.values():
            grants += self._grant(pool, now)
        return grants

    # -- internals ----------------------------------------------------------

    def _ranked(self, pool: _Pool, now: float) -> list[int]:
        """Keys of ``pool``'s waiting requests in order of service (see :meth:`positions`)."""
        overdue: list[int] = []
        for key, waiting in pool.heads.items():
            if now - waiting.aging_since < self.config.max_wait:
                break
            overdue.append(key)
        ranked = list(overdue)
        for rank in range(len(PRIORITIES)):
            # Sort on one int: (slots held by then) * users + the user's order.
            by_usage = sorted(pool.pushed[rank].items(), key=lambda item: item[1][1:])
            n = len(by_usage)
            order: list[int] = []
            keys: list[int] = []
            for index, (name, _) in enumerate(by_usage):
                value = self._users[name].counts.held * n + index
                for waiting in pool.queues[rank][name].values():
                    order.append(value)
                    keys.append(waiting.entry.key)
                    value += waiting.entry.gpus * n
            ranked += [keys[i] for i in sorted(range(len(keys)), key=order.__getitem__)]
        if overdue:
            skip = set(overdue)
            ranked = overdue + [key for key in ranked[len(overdue):] if key not in skip]
        return ranked

    def _check_quotas(self, request: LeaseRequestEntry, user: _User) -> None:
        pool = self._pools[request.pool].config
        levels = ((self.config.quota(user.name), "", user.counts),
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

    def _deflation(self, now: float) -> float:
        """Factor from inflated usage to decayed GPU-seconds at ``now``."""
        return math.exp2(-(now - self._epoch) / self.config.half_life)

    def _advance(self) -> float:
        """Account holders' GPU-seconds up to now; returns now.

        Usage is stored multiplied by ``2 ** ((t - epoch) / half_life)``, so
        decay changes no stored value and the heaps only move for holders.
        """
        now = max(self._clock(), self._settled)
        half_life = self.config.half_life
        if (now - self._epoch) / half_life > _REBASE_HALF_LIVES:
            self._rebase(now)
        if now > self._settled and self._holders:
            if math.isinf(half_life):
                growth = now - self._settled
            else:
                decayed = half_life / math.log(2) * -math.expm1(-(now - self._settled) / half_life * math.log(2))
                growth = decayed / self._deflation(now)
            for user in self._holders.values():
                user.inflated += user.counts.held * growth
                self._push_all(user)
        self._settled = now
        return now

    def _rebase(self, now: float) -> None:
        factor = self._deflation(now)
        self._epoch = now
        for user in self._users.values():
            user.inflated *= factor
        for pool in self._pools.values():
            for rank in range(len(PRIORITIES)):
                pool.heaps[rank].clear()
                pool.pushed[rank].clear()
                for name in pool.queues[rank]:
                    self._push(pool, rank, self._users[name])

    def _push_all(self, user: _User) -> None:
        for name, counts in user.per_pool.items():
            if counts.waiting:
                pool = self._pools[name]
                for rank in range(len(PRIORITIES)):
                    self._push(pool, rank, user)

    def _push(self, pool: _Pool, rank: int, user: _User) -> None:
        """Make ``user``'s heap entry at ``rank`` in ``pool`` current."""
        queue = pool.queues[rank].get(user.name)
        pushed = pool.pushed[rank]
        if not queue:
            pushed.pop(user.name, None)
            return
        key = (user.counts.held, user.inflated, next(iter(queue.values())).seq)
        if pushed.get(user.name) == key:
            return
        pushed[user.name] = key
        heap = pool.heaps[rank]
        heapq.heappush(heap, (*key, user.name))
        if len(heap) > 4 * len(pushed) + 64:
            heap[:] = [(*k, name) for name, k in pushed.items()]
            heapq.heapify(heap)

    def _best(self, pool: _Pool, now: float) -> _Waiting | None:
        if not pool.heads:
            return None
        oldest = next(iter(pool.heads.values()))
        if now - oldest.aging_since >= self.config.max_wait:
            return oldest
        for rank in range(len(PRIORITIES)):
            heap, pushed = pool.heaps[rank], pool.pushed[rank]
            while heap:
                held, inflated, seq, name = heap[0]
                if pushed.get(name) == (held, inflated, seq):
                    return next(iter(pool.queues[rank][name].values()))
                heapq.heappop(heap)
        raise AssertionError("a waiting request is in no queue")

    def _next(self, pool: _Pool, now: float) -> _Waiting | None:
        """The request ``pool`` serves next: the best-ranked one that its healthy slots can hold."""
        best = self._best(pool, now)
        if best is None:
            return None
        healthy = len(pool.config.slots) - pool.unhealthy
        if best.entry.gpus <= healthy:
            return best
        # Rare (a pool with an unhealthy slot and a request too big for the
        # rest): rank the whole pool and skip what cannot fit.
        for key in self._ranked(pool, now):
            waiting = self._waiting[key]
            if waiting.entry.gpus <= healthy:
                return waiting
        return None

    def _grant(self, pool: _Pool, now: float) -> list[Grant]:
        grants: list[Grant] = []
        while (best := self._next(pool, now)) is not None and best.entry.gpus <= len(pool.free):
            entry = best.entry
            taken, pool.free[:] = pool.free[: entry.gpus], pool.free[entry.gpus:]
            self._unqueue(pool, best, now)
            lease = _Lease(entry, list(taken), now)
            for slot in taken:
                self._leases[slot] = lease
            user = self._users[entry.user]
            user.counts.held += entry.gpus
            user.in_pool(pool.config.name).held += entry.gpus
            self._holders[user.name] = user
            self._push_all(user)
            grants.append(Grant(entry, tuple(taken)))
        return grants

    def _start_aging(self, pool: _Pool, waiting: _Waiting, now: float) -> None:
        """``waiting`` became the first of its user's queue: its wait counts from now."""
        waiting.aging_since = now
        pool.heads[waiting.entry.key] = waiting

    def _unqueue(self, pool: _Pool, waiting: _Waiting, now: float) -> None:
        entry = waiting.entry
        rank = _RANK[entry.priority]
        del self._waiting[entry.key]
        queue = pool.queues[rank][entry.user]
        del queue[entry.key]
        if pool.heads.pop(entry.key, None) is not None and queue:
            self._start_aging(pool, next(iter(queue.values())), now)
        if not queue:
            del pool.queues[rank][entry.user]
        user = self._users[entry.user]
        for counts in (user.counts, user.in_pool(pool.config.name)):
            counts.waiting -= 1
            counts.pending -= entry.gpus
        self._push(pool, rank, user)
