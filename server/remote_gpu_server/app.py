"""The GPU server's composition root: it builds the parts and wires them.

:class:`GpuServer` makes, in order: the store, the slots, the lease broker
(scheduler), the warm pool, the readings, the journal, the sessions, the
batch runner, the metrics, the HTTP API and the front door (the port).
Each part receives the narrow things it uses; none imports this module.
It also runs the one periodic task that is nobody's own: releasing idle
sessions, letting waiting requests age, and writing tokens' last uses.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import socket
from pathlib import Path
from typing import Any

from remote_gpu_core import __version__
from remote_gpu_core.tls import is_loopback
from remote_gpu_core.ids import SlotId

from websockets.asyncio.server import ServerConnection

from .sessions.batch import BatchRunner
from .scheduling.broker import LeaseBroker
from .scheduling.leases import DEFAULT_POOL
from .config import ServerConfig
from .connections.bulk import BulkTickets
from .connections.connection import Connection
from .frontdoor.door import FrontDoor
from .config import data_dir, named_paths
from .sessions.disk_watch import DiskWatch
from .workers.drain import Drainer
from .gpus.discovery import discover_slots
from .workers.gpu_fence import GpuFence
from .isolation.policy import Isolation
from .frontdoor.http_api import HttpApi
from .store.journal import Journal
from .workers.launcher import WorkerLauncher
from .workers.local_launcher import LocalLauncher
from .frontdoor.origins import OriginPolicy
from .sessions.parking import Parking
from .cluster.launcher import RayLauncher
from .cluster.nodes import RayCluster, RayReadings
from .frontdoor.metrics import Metrics
from .environments import Environments
from .workers.pool import Pool
from .gpus.readings import Readings
from .store.retention import prune_outputs_forever
from .sessions.session import SessionContext
from .sessions.manager import SessionManager
from .gpus.slots import Slot, SlotInventory
from .frontdoor.status import ServerView
from .store import Store, TokenInfo
from .certificates import server_ssl_context
from .gpus.xid import XidEvent, XidWatcher

__all__ = ["GpuServer", "__version__"]


log = logging.getLogger("remote_gpu_server")


def _is_url(db: Path | str) -> bool:
    return isinstance(db, str) and "://" in db


class GpuServer:
    """Call :meth:`start`, then :meth:`serve_forever` or :meth:`close`.

    ``nvml`` is the NVML module for GPU readings and health (default:
    ``pynvml``, imported only when there are GPU slots); tests pass a double.
    """

    version = __version__

    def __init__(self, config: ServerConfig, *, nvml: Any | None = None) -> None:
        self.config = config
        self._nvml = nvml
        self.port = config.port
        self.inventory = SlotInventory()
        self.cluster: RayCluster | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        #: What a client may send, with the session cache decided at start.
        self.limits = config.limits
        self.origins = OriginPolicy(config.allow_origins)  # raises ValueError for a bad entry
        store_file = Path(config.db) if not _is_url(config.db) else data_dir(config.db) / "store"
        self.isolation = Isolation(config.isolation, store_file, server_files=named_paths(config), nvml=nvml)
        self._parts_closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._disk_watcher: asyncio.Task[None] | None = None
        self.xids: XidWatcher | None = None
        self._checks: set[asyncio.Task[None]] = set()

    def _environments_status(self) -> list[dict[str, Any]]:
        """Each environment (name, python, version, key packages), its warm workers and demand."""
        warm = collections.Counter(env for slot in self.inventory if (env := self.pool.warm_environment(slot.id)))
        pool = self.pool.environments.status_json(warm)
        return [{**e.status_json(), **pool.get(e.name, {})} for e in self.environments]

    @property
    def server_id(self) -> str:
        return self.config.server_id or socket.gethostname()

    async def start(self) -> None:
        config = self.config
        # TLS first: a certificate that cannot be used stops the start before anything runs.
        tls = server_ssl_context(config.certfile, config.keyfile) if config.certfile else None
        self.store = await Store.open(config.db, self.server_id)
        stale = await self.store.fail_interrupted_jobs("the server stopped while this job was running")
        if stale:
            log.warning("marked %d job(s) left running by an earlier run of this server as failed", stale)
        if config.ray is not None and config.environments:
            raise ValueError("--env: named environments run on this host's slots; with --ray only the "
                             "default environment is offered so far")
        # Each named environment is checked now: one that cannot run workers stops the start.
        self.environments = await asyncio.to_thread(Environments.load, config.environments)
        for pool_config in config.scheduler.pools:
            for name in pool_config.environments:
                if name not in self.environments:
                    raise ValueError(f"--pool {pool_config.name}: there is no environment {name!r} (--env NAME=PYTHON "
                                     f"names one; this server has: {', '.join(self.environments.names)})")
        launcher: WorkerLauncher
        if config.ray is not None:
            # The head decides who each user runs as; nodes isolate their workers,
            # and a node that cannot isolate them as the head does is left out.
            self.isolation.start(0)
            self.cluster = RayCluster(config.ray, isolation=config.isolation, isolate=self.isolation.isolated)
            await self.cluster.connect()
            if self.cluster.unfenced is not None:  # no Ray token: any cell could use the cluster
                self.isolation.refuse_sharing(self.cluster.unfenced)
            self.inventory.add(await self.cluster.slots())
            launcher = RayLauncher(self.cluster, self.isolation)
        else:
            self.inventory.add(discover_slots(config.slots))
            self.isolation.start(len(self.inventory), disks=True)  # raises IsolationError
            launcher = LocalLauncher(self.isolation, environments=self.environments)
        unnamed = [s for s in self.inventory if s.pool is None]
        self.broker = LeaseBroker([s.id for s in unnamed], config.scheduler, on_grant=self.metrics.granted,
                                  nodes={s.id: s.node for s in unnamed})
        for slot in self.inventory:  # a Ray node names its pool with a resource
            if slot.pool is not None:
                self.broker.add_slots([slot.id], slot.pool, slot.node)
        self.scheduler = self.broker.scheduler
        self.pool = Pool(launcher, self.inventory, config.startup_timeout,
                         is_down=lambda slot: self.inventory.is_down(slot.node), term_grace=config.term_grace,
                         environments=self.environments.names,
                         slot_environments={slot: pool.environments for pool in config.scheduler.pools
                                            for slot in pool.slots if pool.environments})
        # Grants take slots whose worker is warm first; the pool says which are.
        self.pool.on_readiness = self.broker.set_readiness
        self.pool.on_take = self.metrics.worker_taken
        self._watch_xids()
        self.pool.start()
        self.readings = Readings(list(self.inventory), self.pool.worker_pids, nvml=self._nvml,
                                 on_health=lambda slot, healthy, _problem: self.broker.set_healthy(slot, healthy),
                                 remote=RayReadings(self.cluster) if self.cluster is not None else None,
                                 devices=self.pool.device, scopes=self.pool.scopes)
        # A worker NVML finds on a GPU it was not given is stopped, saying so.
        self.gpu_fence = GpuFence(lambda: self.inventory, self.readings.latest, self.pool.workers)
        self.readings.on_read = self.gpu_fence.check
        # Slots go back only when a killed worker's processes let go of them.
        self.drainer = Drainer(self.readings.holders, self._drain_changed, deadline=config.drain_deadline,
                               period=config.drain_period, check=self._check_gpu)
        self.pool.drain = self.drainer.settle
        self.inventory.on_added.append(self._slots_added)
        self.inventory.on_node.append(self._node_changed)
        await self.readings.refresh()  # a GPU already faulty is out before the first lease
        self.readings.start()
        self.journal = Journal(self.store.append_outputs)
        self.parking = Parking(config.parking, store=self.store, broker=self.broker, pool=self.pool,
                               isolation=self.isolation, sessions=lambda: iter(self.sessions),
                               unsupported=("its workers run on Ray nodes, where the files would stay on a node "
                                            "the next lease may not be on") if self.cluster is not None else None)
        # A session's cache of pushed buffers fits in its worker's memory limit.
        self.limits = config.limits.resolve(self.isolation.memory.per_slot)
        context = SessionContext(self.pool, self.store, self.journal, config.kill_grace,
                                 interrupt_notice=config.interrupt_notice, resume=self.parking.resume,
                                 max_output=config.max_output, session_cache=self.limits.session_cache or 0,
                                 environments={e.name: e.fingerprint for e in self.environments}
                                 if len(self.environments) > 1 else {})
        self.sessions = SessionManager(context, self.broker, grace=config.grace,
                                       idle_timeout=config.idle_timeout, parking=self.parking)
        await self.sessions.recover_parked()
        self.disk = DiskWatch(self.isolation, lambda: iter(self.sessions))
        self.batch = BatchRunner(self.store, self.journal, self.broker, self.pool,
                                 kill_grace=config.kill_grace, max_output=config.max_output)
        view = ServerView(self.version, self.inventory, self.readings, self.broker, self.sessions, self.batch,
                          self.store, config.price_per_gpu_hour, node_label=self._node_label,
                          node_down=lambda slot: self.inventory.is_down(slot.node),
                          isolation=self._isolation_status, draining=self.drainer.draining,
                          park_keep=config.parking.keep, disk=self.disk.status_json,
                          warm=self.pool.is_warm, warm_environment=self.pool.warm_environment,
                          environments=self._environments_status,
                          fingerprint=lambda env: (self.environments[env].fingerprint if env in self.environments
                                                   else None))
        self.bulk_tickets = BulkTickets() if self.limits.bulk_stream else None
        self.metrics.attach(view, self.bulk_tickets)
        self.http = HttpApi(view, self.metrics)
        await self.batch.recover()
        self.front = FrontDoor(verify=self.store.verify_token, http=self.http, clients=self._client,
                               server_header=f"remote-gpu-server/{self.version}", origins=self.origins,
                               admit=self.isolation.admit, max_connections=config.limits.max_connections,
                               bulk=self.bulk_tickets)
        await self.front.open(config.host, config.port, tls)
        self.port = self.front.port
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_idle())
        if self.cluster is not None:
            self._watcher = loop.create_task(self.cluster.watch(self.inventory))
        self._announcer = loop.create_task(self._announce_ready())
        if config.keep_output is not None:
            self._pruner = loop.create_task(prune_outputs_forever(self.store, config.keep_output))
        if self.disk.enforcing:
            self._disk_watcher = loop.create_task(self.disk.run())
        scheme = "wss" if tls is not None else "ws"
        log.info("listening on %s://%s:%d with %d slot(s): %s", scheme, config.host, self.port,
                 len(self.inventory), ", ".join(f"{s.id} ({s.name})" for s in self.inventory) or "none yet")
        if tls is None and not is_loopback(config.host):
            log.warning("serving plain ws:// on %s: tokens cross the network in clear; serve TLS "
                        "with --tls self-signed or --certfile/--keyfile", config.host)

    @property
    def slots(self) -> list[Slot]:
        return list(self.inventory)

    def _isolation_status(self) -> dict[str, Any]:
        """``/api/status``'s ``isolation``: the server's, and on a Ray cluster each node's."""
        status = self.isolation.status_json()
        if self.cluster is not None:
            status["ray"] = self.cluster.status_json()
        return status

    def _node_label(self, slot: Slot) -> str:
        if self.cluster is not None and slot.node:
            return self.cluster.label(slot.node)
        return slot.node or socket.gethostname()

    def _slots_added(self, slots: list[Slot]) -> None:
        """Slots that joined after the start (a cluster node came up)."""
        self.readings.add(slots)
        self.pool.add(slots)
        for slot in slots:
            self.broker.add_slots([slot.id], slot.pool or DEFAULT_POOL, slot.node)

    def _watch_xids(self) -> None:
        """Watch this host's GPUs for Xid errors, for causes of death (see :mod:`.xid`)."""
        gpus = [s for s in self.inventory if s.kind == "gpu" and not s.node]
        if not gpus:
            return
        try:
            nvml = self._nvml or importlib.import_module("pynvml")
        except ImportError:
            return
        watcher = XidWatcher(nvml, gpus, on_event=self._xid)
        if watcher.start():
            self.xids = watcher
            self.pool.gpu_errors = watcher.describe

    def _xid(self, event: XidEvent) -> None:
        """A GPU reported an Xid error: it is read again before anyone leases it next."""
        free = event.slot in self.scheduler.free
        self.broker.set_healthy(event.slot, False, source="xid")
        if free:  # no lease holds it: check it now (else at its worker's end, see drain.py)
            task = asyncio.get_running_loop().create_task(self._check_gpu(event.slot))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _check_gpu(self, slot: SlotId) -> None:
        """Read the slot's GPU again; the Xid hold goes (its readings decide from now on)."""
        await self.readings.refresh()
        log.info("slot %s was checked after an Xid error: %s", slot,
                 "healthy" if self.readings.healthy(slot) else "unhealthy, held out")
        self.broker.set_healthy(slot, True, source="xid")

    def _drain_changed(self, slot: SlotId, draining: bool) -> None:
        """A slot began draining (held out), or is drained (back, with a warm worker)."""
        self.broker.set_healthy(slot, not draining, source="draining")
        if not draining:
            self.pool.add([self.inventory[slot]])

    def _node_changed(self, node: str, up: bool) -> None:
        """A node went away (its slots are not leased, its sessions end) or came back."""
        slots = self.inventory.on(node)
        for slot in slots:
            self.broker.set_healthy(slot.id, up, source="node")
        if up:
            self.pool.add(slots)
            return
        reason = f"node {self._node_label(slots[0])} went away" if slots else "its node went away"
        for worker in self.pool.workers_on(s.id for s in slots):
            mark_lost = getattr(worker.process, "mark_lost", None)
            if mark_lost is not None:
                mark_lost(reason)  # its session ends at once, its cell fails naming the node

    async def _client(self, ws: ServerConnection, info: TokenInfo) -> None:
        log.info("%s connected from %s", info.user, ws.remote_address)
        await Connection(ws, info, broker=self.broker, sessions=self.sessions,
                         server_version=self.version, limits=self.limits, bulk=self.bulk_tickets).run()
        log.info("%s disconnected", info.user)

    async def serve_forever(self) -> None:
        await self.front.serve_forever()

    async def close(self) -> None:
        for task in (self._reaper, self._announcer, self._watcher, self._pruner, self._disk_watcher):
            if task is not None:
                task.cancel()
        if hasattr(self, "front"):
            await self.front.close()
        if hasattr(self, "batch"):
            await self.batch.close()
        if hasattr(self, "sessions"):
            await self.sessions.close("the server shut down")
        if hasattr(self, "drainer"):
            await self.drainer.close()
        if hasattr(self, "gpu_fence"):
            await self.gpu_fence.close()
        for task in list(self._checks):
            task.cancel()
        if self.xids is not None:
            await asyncio.to_thread(self.xids.close)
        if hasattr(self, "readings"):
            await self.readings.close()
        if hasattr(self, "pool"):
            await self.pool.close()
        await asyncio.to_thread(self.isolation.close)  # waits for folders being deleted, unmounts
        if hasattr(self, "journal"):
            await self.journal.close()
        if hasattr(self, "store"):
            await self.store.close()
        if self.cluster is not None:
            await self.cluster.close()

    async def _announce_ready(self) -> None:
        await self.pool.wait_ready()
        log.info("warm pool ready: %d/%d slot(s) have a started worker",
                 sum(self.pool.is_warm(s.id) for s in self.inventory), len(self.inventory))

    async def _reap_idle(self) -> None:
        """Release idle sessions, let waiting requests age (scheduler tick), and
        write the tokens' last uses that are due."""
        timeouts = [self.config.idle_timeout] + [
            p.idle_timeout for p in self.broker.pools if p.idle_timeout is not None] + [
            p.park_after for p in self.broker.pools if p.park_after is not None]
        if self.config.parking.park_after is not None:
            timeouts.append(self.config.parking.park_after)
        period = max(0.2, min(5.0, min(timeouts) / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.sessions.release_idle()
                self.broker.tick()
                await self.store.write_last_used()
            except Exception:
                log.exception("the idle reaper failed; it tries again")

    # -- for tests and benchmarks ------------------------------------------

    async def wait_ready(self) -> None:
        await self.pool.wait_ready()
