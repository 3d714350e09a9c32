"""Who gets the next free slots: priorities, fair share, quotas, aging, pools.

Pure logic: no I/O, and time comes from an injected ``clock`` (default
:func:`time.monotonic`), so every rule is tested with a fake clock.

Calling contract (what :class:`~remote_gpu_server.scheduling.broker.LeaseBroker` does):

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
* :meth:`Scheduler.set_readiness` when a slot's worker changes (the warm
  pool says: warm, starting, none): it picks which free slots a grant
  takes, never whether or to whom, so it returns no grants.
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

Which free slots a grant takes (the ranking above decides who, this only
where): a lease of one slot takes a free slot of its pool whose worker is
warm, where there is one, so that it waits for no worker to start; with
none, the slot whose worker began to start first (the one likely warm
soonest; starts take about as long as each other), and a slot with no
worker last. A lease of several slots starts a worker of its own on all
of them, so it takes the slots ready last, where that discards fewest
warm workers (see :meth:`.queues.PoolQueues.take`). The scheduler learns
this from :meth:`Scheduler.set_readiness`, an input like health: it never
asks anyone.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from remote_gpu_core.ids import SlotId

from .leases import (
    DEFAULT_POOL, PRIORITIES, Grant, Holding, LeaseRequestEntry, PoolConfig, Quota, QuotaExceeded,
    Readiness, SchedulerConfig
)
from .queues import RANK, Lease, PoolQueues, Ready, User, Waiting, check_quotas

__all__ = ["DEFAULT_POOL", "PRIORITIES", "Grant", "Holding", "LeaseRequestEntry",
           "PoolConfig", "Quota", "QuotaExceeded", "Readiness", "Scheduler", "SchedulerConfig"]

#: Usage is kept inflated by 2**((t - epoch) / half_life); re-based after this
#: many half-lives, long before a float could overflow (2**1024).
_REBASE_HALF_LIVES = 256.0


class Scheduler:
    """Priorities, decayed fair share, quotas, aging and pools over ``slots``.

    ``slots`` are all the slots of this machine; ``config`` defaults to
    :class:`SchedulerConfig()` (one pool ``"default"``, no quotas).
    """

    def __init__(self, slots: Iterable[SlotId], config: SchedulerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 nodes: Mapping[SlotId, str] | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        # The node of each slot: a lease's slots are all on one node.
        self._node_of: dict[SlotId, str] = dict(nodes or {})
        # What each slot's worker is doing, and since when (see set_readiness).
        self._readiness: dict[SlotId, Ready] = {}
        # The environment each slot's worker runs (see set_readiness).
        self._environments: dict[SlotId, str] = {}
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
        self._pools = {config.name: PoolQueues(config, self._node_of, self._readiness, self._environments)
                       for config in pools}
        self._pool_of = {slot: pool for pool in self._pools.values() for slot in pool.config.slots}
        self._all = all_slots
        self._users: dict[str, User] = {}
        self._holders: dict[str, User] = {}
        self._waiting: dict[int, Waiting] = {}
        self._leases: dict[SlotId, Lease] = {}
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
            result.update(zip(pool.ranked(now, self.config.max_wait, self._users), itertools.count(1)))
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
        rank = RANK.get(request.priority)
        if rank is None:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {request.priority!r}")
        if request.gpus < 1:
            raise ValueError("a lease needs at least one slot")
        size, nodes = pool.largest_node(), len(pool.nodes())
        if request.gpus > size:
            where = (f"has {size} slot(s)" if nodes <= 1
                     else f"has at most {size} slot(s) on one node, and a lease spans one node")
            raise ValueError(f"pool {pool.config.name!r} {where}; "
                             f"a lease of {request.gpus} can never be granted")
        if request.key in self._waiting or any(lease.entry.key == request.key for lease in self._leases.values()):
            raise ValueError(f"request key {request.key} is already in use")
        user = self._users.get(request.user) or User(request.user)
        check_quotas(request, user, self.config.quota(user.name), pool.config)
        self._users[user.name] = user
        now = self._advance()
        waiting = Waiting(request, next(self._seq))
        self._waiting[request.key] = waiting
        queue = pool.queues[rank].setdefault(user.name, OrderedDict())
        queue[request.key] = waiting
        if len(queue) == 1:
            pool.start_aging(waiting, now)
        for counts in (user.counts, user.in_pool(pool.config.name)):
            counts.waiting += 1
            counts.pending += request.gpus
        pool.push(rank, user)
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
        touched: dict[str, PoolQueues] = {}
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
            if slot in pool.free:
                pool.free.remove(slot)
            # A request that needed this slot may no longer fit: others may go.
            return self._grant(pool, now)
        if slot not in self._unhealthy:
            return []
        self._unhealthy.discard(slot)
        if slot not in self._leases:
            pool.free.append(slot)
            pool.free.sort(key=pool.order.__getitem__)
        return self._grant(pool, now)

    def set_readiness(self, slot: SlotId, readiness: Readiness, environment: str | None = None) -> None:
        """What ``slot``'s worker is doing from now on (the warm pool tells).

        It decides which free slots later grants take (see the module
        docstring), never whether a request is granted or which one, so
        nothing is granted here. A slot nothing was said of counts as
        :attr:`Readiness.COLD`. A slot not known yet is remembered for when
        it joins (:meth:`add_slots`): a node's slots reach the warm pool
        first. ``environment``: the one its worker runs (None: unchanged); a
        lease in another environment takes such a slot last.
        """
        self._readiness[slot] = (readiness, self._clock())
        if environment is not None:
            self._environments[slot] = environment

    def tick(self) -> list[Grant]:
        """Re-rank with the current time; returns grants that waiting made possible."""
        now = self._advance()
        grants: list[Grant] = []
        for pool in self._pools.values():
            grants += self._grant(pool, now)
        return grants

    def add_slots(self, slots: Iterable[SlotId], pool: str = DEFAULT_POOL, node: str = "") -> list[Grant]:
        """Slots that joined (a cluster node came up) go into ``pool`` (made if new).

        Raises ``ValueError``, changing nothing, for a slot already known.
        """
        slots = list(slots)
        for slot in slots:
            if slot in self._pool_of or slots.count(slot) > 1:
                raise ValueError(f"slot {slot} is already known")
        target = self._pools.get(pool)
        if target is None:
            target = self._pools[pool] = PoolQueues(PoolConfig(pool, ()), self._node_of, self._readiness,
                                                         self._environments)
        now = self._advance()
        for slot in slots:
            self._node_of[slot] = node
        target.add_slots(slots)
        self._all += slots
        for slot in slots:
            self._pool_of[slot] = target
        return self._grant(target, now)

    # -- internals ----------------------------------------------------------

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
                    pool.push(rank, self._users[name])

    def _push_all(self, user: User) -> None:
        for name, counts in user.per_pool.items():
            if counts.waiting:
                pool = self._pools[name]
                for rank in range(len(PRIORITIES)):
                    pool.push(rank, user)

    def _next(self, pool: PoolQueues, now: float) -> Waiting | None:
        """The request ``pool`` serves next: the best-ranked one that its healthy slots can hold."""
        best = pool.best(now, self.config.max_wait)
        if best is None:
            return None
        healthy = pool.largest_node(self._unhealthy)
        if best.entry.gpus <= healthy:
            return best
        # Rare (a pool with an unhealthy slot and a request too big for the
        # rest): rank the whole pool and skip what cannot fit.
        for key in pool.ranked(now, self.config.max_wait, self._users):
            waiting = self._waiting[key]
            if waiting.entry.gpus <= healthy:
                return waiting
        return None

    def _grant(self, pool: PoolQueues, now: float) -> list[Grant]:
        grants: list[Grant] = []
        while (best := self._next(pool, now)) is not None:
            entry = best.entry
            taken = pool.take(entry.gpus, entry.environment)
            if taken is None:  # not enough free on one node: it waits, and nobody overtakes it
                break
            self._unqueue(pool, best, now)
            lease = Lease(entry, list(taken), now)
            for slot in taken:
                self._leases[slot] = lease
            user = self._users[entry.user]
            user.counts.held += entry.gpus
            user.in_pool(pool.config.name).held += entry.gpus
            self._holders[user.name] = user
            self._push_all(user)
            grants.append(Grant(entry, tuple(taken)))
        return grants

    def _unqueue(self, pool: PoolQueues, waiting: Waiting, now: float) -> None:
        entry = waiting.entry
        rank = RANK[entry.priority]
        del self._waiting[entry.key]
        queue = pool.queues[rank][entry.user]
        del queue[entry.key]
        if pool.heads.pop(entry.key, None) is not None and queue:
            pool.start_aging(next(iter(queue.values())), now)
        if not queue:
            del pool.queues[rank][entry.user]
        user = self._users[entry.user]
        for counts in (user.counts, user.in_pool(pool.config.name)):
            counts.waiting -= 1
            counts.pending -= entry.gpus
        pool.push(rank, user)
