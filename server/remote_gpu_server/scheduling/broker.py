"""The lease broker: the asyncio side of the scheduler.

:class:`LeaseBroker` owns the :class:`~.scheduler.Scheduler` and turns its
decisions into events: a request waits (:meth:`LeaseBroker.wait_for_lease`)
until a grant resolves it, and every waiting requester hears its queue
position whenever it changes. It knows nothing of sessions, connections or
workers: whoever asked for a lease gives its slots back with
:meth:`LeaseBroker.free`.

Positions are handed to each requester's :class:`PositionListener`
without waiting: a client that reads slowly delays nobody's grant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from remote_gpu_core.ids import SlotId

from .scheduler import Grant, LeaseRequestEntry, PoolConfig, Quota, Readiness, Scheduler, SchedulerConfig
from ..store import TokenInfo

__all__ = ["LeaseBroker", "PositionListener", "POSITIONS_EVERY_EVENT"]

log = logging.getLogger("remote_gpu_server")

#: Up to this many waiting requests, positions are sent after every event;
#: past it, once a :meth:`LeaseBroker.tick`.
POSITIONS_EVERY_EVENT = 2000


class PositionListener(Protocol):
    def queue_position(self, key: int, position: int) -> None:
        """Request ``key`` is now ``position`` in its pool's queue; must not block."""


@dataclasses.dataclass
class _Waiter:
    future: asyncio.Future[tuple[SlotId, ...]]
    listener: PositionListener
    kind: str


class LeaseBroker:
    """See the module docstring. ``on_grant(grant, kind)`` is told of every grant."""

    def __init__(self, slots: Sequence[SlotId], config: SchedulerConfig,
                 on_grant: Callable[[Grant, str], None] | None = None,
                 nodes: Mapping[SlotId, str] | None = None) -> None:
        self.config = config
        # Quotas set on tokens, by user; the scheduler reads this mapping.
        self._token_quotas: dict[str, Quota] = dict(config.user_quotas)
        self.scheduler = Scheduler(slots, dataclasses.replace(config, user_quotas=self._token_quotas),
                                   nodes=nodes)
        self._on_grant = on_grant
        self._keys = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._positions: dict[int, int] = {}
        self._problems: dict[SlotId, set[str]] = {}

    # -- reading ------------------------------------------------------------

    @property
    def pools(self) -> tuple[PoolConfig, ...]:
        return self.scheduler.pools

    def pool_of(self, slot: SlotId) -> PoolConfig:
        return self.scheduler.pool_of(slot)

    def pool_sizes(self) -> Mapping[str, int]:
        return {pool.name: len(pool.slots) for pool in self.scheduler.pools}

    def kind_of(self, key: int) -> str | None:
        """``interactive`` or ``batch`` for a waiting request, else None."""
        waiter = self._waiters.get(key)
        return waiter.kind if waiter is not None else None

    # -- asking -------------------------------------------------------------

    def new_key(self) -> int:
        """A lease request key, unique in this server."""
        return next(self._keys)

    def environment(self, pool: str, asked: str, unknown: Callable[[str], str | None]) -> str:
        """The environment a lease in ``pool`` that asked for ``asked`` runs (see
        :meth:`.PoolConfig.environment`); ValueError saying why where it cannot
        run there, or where ``unknown`` says the server has no such environment."""
        config = next((p for p in self.scheduler.pools if p.name == pool), None)
        environment = config.environment(asked) if config is not None else asked
        why = unknown(environment)
        if why:
            raise ValueError(why)
        return environment

    def apply_token_quota(self, token: TokenInfo) -> None:
        """``token``'s quotas become its user's; the latest token used wins.

        Each limit the token leaves unset is the server's for this user
        (``--max-gpus``, ``--max-waiting``), so a token that raises one limit
        does not lift the other, and a token with neither brings the
        server's back.
        """
        base = self.config.user_quotas.get(token.user, self.config.default_quota)
        quota = Quota(base.max_gpus if token.max_gpus is None else token.max_gpus,
                      base.max_waiting if token.max_waiting is None else token.max_waiting)
        if token.user in self.config.user_quotas or quota != self.config.default_quota:
            self._token_quotas[token.user] = quota
        else:
            self._token_quotas.pop(token.user, None)

    async def wait_for_lease(self, entry: LeaseRequestEntry, listener: PositionListener,
                             kind: str = "interactive") -> tuple[SlotId, ...]:
        """Queue ``entry`` and wait for its slots; raises ValueError if impossible.

        Cancelling the wait withdraws the request. The caller owns the
        slots it gets and gives them back with :meth:`free`.
        """
        future: asyncio.Future[tuple[SlotId, ...]] = asyncio.get_running_loop().create_future()
        self._waiters[entry.key] = _Waiter(future, listener, kind)
        try:
            grants = self.scheduler.submit(entry)
        except ValueError:
            del self._waiters[entry.key]
            raise
        self._apply(grants)
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel(entry.key)
            raise

    def cancel(self, key: int) -> None:
        """Withdraw waiting request ``key`` (nothing if it is not waiting)."""
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.future.done():
            waiter.future.cancel()
        self._apply(self.scheduler.cancel(key))

    def free(self, slots: Sequence[SlotId]) -> None:
        """Give back slots that a lease held; waiting requests may be granted."""
        self._apply(self.scheduler.release(list(slots)))

    def set_healthy(self, slot: SlotId, healthy: bool, source: str = "readings") -> None:
        """A slot's health as ``source`` sees it changed (its GPU's readings, its
        node): it is leased only while no source holds it out."""
        problems = self._problems.setdefault(slot, set())
        if healthy:
            problems.discard(source)
        else:
            problems.add(source)
        # Positions may move either way: a request too big for the healthy
        # slots stops holding up its pool.
        self._apply(self.scheduler.set_healthy(slot, not problems))

    def set_readiness(self, slot: SlotId, readiness: Readiness, environment: str | None = None) -> None:
        """What ``slot``'s worker is doing, in which environment (the warm pool tells):
        later grants take slots warm in their environment first (see
        :meth:`.Scheduler.set_readiness`); nobody is granted now."""
        self.scheduler.set_readiness(slot, readiness, environment)

    def add_slots(self, slots: Sequence[SlotId], pool: str, node: str = "") -> None:
        """Slots of ``node`` that joined go into ``pool``; waiting requests may be granted."""
        self._apply(self.scheduler.add_slots(slots, pool, node))

    def tick(self) -> None:
        """Let waiting requests age, and send positions even past the per-event bound."""
        self._apply(self.scheduler.tick(), force_positions=True)

    # -- internals ----------------------------------------------------------

    def _apply(self, grants: list[Grant], force_positions: bool = False) -> None:
        for grant in grants:
            waiter = self._waiters.pop(grant.request.key, None)
            if self._on_grant is not None:
                self._on_grant(grant, waiter.kind if waiter else "interactive")
            if waiter is None or waiter.future.done():
                # Its requester left between grant and delivery: give the slots back.
                self._apply(self.scheduler.release(list(grant.slots)))
                continue
            waiter.future.set_result(grant.slots)
        self._send_positions(force_positions)

    def _send_positions(self, force: bool) -> None:
        """Tell waiting requesters whose position changed.

        Positions cost a sort of the whole queue; past a few thousand waiting
        requests they are sent once a tick instead of per event.
        """
        if len(self._waiters) > POSITIONS_EVERY_EVENT and not force:
            return
        positions = self.scheduler.positions()
        for key, position in positions.items():
            waiter = self._waiters.get(key)
            if waiter is not None and self._positions.get(key) != position:
                self._positions[key] = position
                waiter.listener.queue_position(key, position)
        for key in list(self._positions):
            if key not in positions:
                del self._positions[key]
