"""Prometheus metrics for one server, served at ``/metrics``.

Each server has its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide default), so several servers can run in one test
process. Events (a lease granted) are counted as they happen; the rest
(queue, leases, jobs, slot readings) is read from the server at scrape
time by a collector. No metric carries a user name: ``/metrics`` needs no
token.

Metrics::

    rgpu_queue_length{pool,priority}            requests waiting for a lease
    rgpu_lease_wait_seconds{pool,priority,kind} histogram of waits to a grant
    rgpu_leases_granted_total{pool,kind}        leases granted since start
    rgpu_lease_worker_wait_seconds{found}       histogram of a lease's wait for its worker, by what
                                                it found: warm, starting, cold (none; one was started)
    rgpu_leases_active{pool,kind}               leases in force
    rgpu_slots_free{pool}                       slots nobody holds
    rgpu_jobs{kind,state}                       jobs in the store by state
    rgpu_slot_healthy{slot,node}                1, or 0 while it must not be leased
    rgpu_slot_draining{slot,node}               1 while a stopped worker's processes still hold it
    rgpu_slot_draining_process_bytes{slot,node,pid}  memory each of those processes holds (on a GPU: GPU memory)
    rgpu_slot_utilization_percent{slot,node,kind}  GPU %, or a CPU slot's CPU %
    rgpu_slot_memory_used_bytes{slot,node,kind}
    rgpu_slot_memory_total_bytes{slot,node,kind}
    rgpu_slot_temperature_celsius{slot,node}    GPUs only
    rgpu_slot_power_watts{slot,node}            GPUs only
    rgpu_bulk_streams_opened_total              bulk streams opened beside client websockets
    rgpu_bulk_bytes_total{direction}            bytes they carried: received (pushes), sent (pulls)
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..connections.bulk import BulkTickets
from ..scheduling.scheduler import Grant, Readiness
from .status import ServerView

__all__ = ["Metrics"]

#: Lease waits, from instant to a working day.
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 8 * 3600, float("inf"))
#: Waits for a worker: nothing for a warm one, seconds to minutes for a start.
WORKER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    """Call :meth:`granted` for every grant; :meth:`render` for a scrape.

    ``view`` is set once the server's parts exist (:meth:`attach`); until
    then a scrape shows the event counters only.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.wait_seconds = Histogram(
            "rgpu_lease_wait_seconds", "Seconds from a lease request to its grant.",
            ["pool", "priority", "kind"], buckets=WAIT_BUCKETS, registry=self.registry,
        )
        self.leases_granted = Counter(
            "rgpu_leases_granted", "Leases granted since the server started.",
            ["pool", "kind"], registry=self.registry,
        )
        self.worker_wait_seconds = Histogram(
            "rgpu_lease_worker_wait_seconds",
            "Seconds a new lease waited for its worker, by what it found on its slots: warm (a "
            "started worker), starting (one still starting) or cold (none: one was started for it).",
            ["found"], buckets=WORKER_BUCKETS, registry=self.registry,
        )
        for found in Readiness:  # every series from the start, so that a rate of the cold ones exists
            self.worker_wait_seconds.labels(found.value)
        self._collector = _ServerCollector()
        self.registry.register(self._collector)

    def attach(self, view: ServerView, bulk: BulkTickets | None = None) -> None:
        self._collector.view = view
        self._collector.bulk = bulk

    def granted(self, grant: Grant, kind: str) -> None:
        """Count a grant; ``kind`` is ``interactive`` or ``batch``."""
        request = grant.request
        waited = max(0.0, time.time() - request.submitted)
        self.wait_seconds.labels(request.pool, request.priority, kind).observe(waited)
        self.leases_granted.labels(request.pool, kind).inc()

    def worker_taken(self, found: Readiness, waited: float) -> None:
        """A new lease has its worker: it found ``found`` and waited ``waited`` seconds for it."""
        self.worker_wait_seconds.labels(found.value).observe(waited)

    async def render(self) -> bytes:
        """The scrape's text; the job counts are read from the store first."""
        view = self._collector.view
        if view is not None:
            self._collector.job_counts = await view.store.job_counts()
        return generate_latest(self.registry)


class _ServerCollector(Collector):
    """Reads the server's state at scrape time (job counts: as :meth:`Metrics.render` read them)."""

    def __init__(self) -> None:
        self.view: ServerView | None = None
        self.bulk: BulkTickets | None = None
        self.job_counts: dict[tuple[str, str], int] = {}

    def describe(self) -> list[Metric]:
        return []  # collected per scrape; nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        if self.bulk is not None:
            opened = CounterMetricFamily("rgpu_bulk_streams_opened", "Bulk streams opened beside client websockets.")
            opened.add_metric([], self.bulk.opened)
            carried = CounterMetricFamily("rgpu_bulk_bytes", "Bytes bulk streams carried.", labels=["direction"])
            for direction, n in zip(("received", "sent"), self.bulk.carried()):
                carried.add_metric([direction], n)
            yield opened
            yield carried
        view = self.view
        if view is None:
            return
        scheduler = view.broker.scheduler
        queue = GaugeMetricFamily("rgpu_queue_length", "Lease requests waiting.",
                                  labels=["pool", "priority"])
        waiting = Tally((e.pool, e.priority) for e in scheduler.waiting)
        for (pool, priority), n in sorted(waiting.items()):
            queue.add_metric([pool, priority], n)
        yield queue

        active = GaugeMetricFamily("rgpu_leases_active", "Leases in force.", labels=["pool", "kind"])
        leases: Tally[tuple[str, str]] = Tally()
        parked: Tally[str] = Tally()
        parked_bytes: Tally[str] = Tally()
        for session in view.sessions:
            if session.parked is not None:  # holds no slot
                parked[session.parked.pool] += 1
                parked_bytes[session.parked.pool] += session.parked.nbytes
            elif not session.released and session.slots:
                leases[(view.pool(session.slots[0]), "interactive")] += 1
        for run in view.batch.running():
            leases[(view.pool(run.slots[0]), "batch")] += 1
        for (pool, kind), n in sorted(leases.items()):
            active.add_metric([pool, kind], n)
        yield active

        count = GaugeMetricFamily("rgpu_sessions_parked", "Parked sessions (they hold no slot).",
                                  labels=["pool"])
        size = GaugeMetricFamily("rgpu_parked_bytes", "Bytes parked sessions hold on disk.", labels=["pool"])
        for pool in sorted(parked):
            count.add_metric([pool], parked[pool])
            size.add_metric([pool], parked_bytes[pool])
        yield count
        yield size

        free = GaugeMetricFamily("rgpu_slots_free", "Slots nobody holds.", labels=["pool"])
        pools = Tally(view.pool(s.id) for s in view.slots)
        free_by_pool = Tally(view.pool(s) for s in scheduler.free)
        for pool in sorted(pools):
            free.add_metric([pool], free_by_pool.get(pool, 0))
        yield free

        jobs = GaugeMetricFamily("rgpu_jobs", "Jobs in the store by kind and state.",
                                 labels=["kind", "state"])
        for (kind, state), n in sorted(self.job_counts.items()):
            jobs.add_metric([kind, state], n)
        yield jobs

        yield from self._readings()

    def _readings(self) -> Iterator[Metric]:
        view = self.view
        assert view is not None
        healthy = GaugeMetricFamily("rgpu_slot_healthy", "1, or 0 while the slot must not be leased "
                                    "(unhealthy, draining, or its node is down).", labels=["slot", "node"])
        draining = GaugeMetricFamily("rgpu_slot_draining",
                                     "1 while processes of a stopped worker still hold the slot.",
                                     labels=["slot", "node"])
        holders = GaugeMetricFamily("rgpu_slot_draining_process_bytes",
                                    "Memory a stopped worker's process still holds on a draining slot.",
                                    labels=["slot", "node", "pid"])
        util = GaugeMetricFamily("rgpu_slot_utilization_percent",
                                 "GPU utilization, or a CPU slot's workers' CPU percent.",
                                 labels=["slot", "node", "kind"])
        used = GaugeMetricFamily("rgpu_slot_memory_used_bytes", "Memory in use.", labels=["slot", "node", "kind"])
        total = GaugeMetricFamily("rgpu_slot_memory_total_bytes", "Memory size.", labels=["slot", "node", "kind"])
        temp = GaugeMetricFamily("rgpu_slot_temperature_celsius", "GPU temperature.", labels=["slot", "node"])
        power = GaugeMetricFamily("rgpu_slot_power_watts", "GPU power draw.", labels=["slot", "node"])
        for slot in view.slots:
            r = view.readings.latest(slot.id)
            node = view.node_label(slot)
            drain = view.draining(slot.id)
            healthy.add_metric([slot.id, node],
                               1.0 if r.healthy and drain is None and not view.node_down(slot) else 0.0)
            draining.add_metric([slot.id, node], 0.0 if drain is None else 1.0)
            for proc in drain.processes if drain is not None else ():
                holders.add_metric([slot.id, node, str(proc.pid)], float(proc.memory))
            if r.utilization is not None:
                util.add_metric([slot.id, node, slot.kind], r.utilization)
            if r.memory_used is not None:
                used.add_metric([slot.id, node, slot.kind], r.memory_used)
            if r.memory_total is not None:
                total.add_metric([slot.id, node, slot.kind], r.memory_total)
            if r.temperature is not None:
                temp.add_metric([slot.id, node], r.temperature)
            if r.power is not None:
                power.add_metric([slot.id, node], r.power)
        yield from (healthy, draining, holders, util, used, total, temp, power)
