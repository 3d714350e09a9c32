"""Workers on the nodes of a Ray cluster: the server is the cluster's head.

:class:`RayLauncher` starts each worker as a Ray actor
(:class:`~.host.WorkerHost`) with ``num_gpus`` equal to its lease, pinned
to the node the scheduler chose (``NodeAffinitySchedulingStrategy``, not
soft): Ray only places processes and reports their deaths; who gets the
next GPU is always our scheduler's decision, and an actor is created only
for slots it granted (the cluster's nodes and slots: :mod:`.nodes`). Ray
does not forward ports: the actor returns its node's address, the worker's
ports and keys, and the head connects over TCP: the Jupyter channels
encrypted with CurveZMQ, the data channel opened with mutual TLS and sealed
(:mod:`..worker_process.sealed`).
"""


from __future__ import annotations

import asyncio
import logging
from typing import Any


from ..worker_process.confinement import EnterSpec
from ..workers.datachannel import DataChannel
from ..worker_process.sealed import pinned_context
from ..workers.carriers import make_identity
from ..isolation.policy import Isolation, IsolationConfig
from ..isolation.tenant import Tenant
from ..environments import DEFAULT_ENVIRONMENT
from ..workers.launcher import WorkerSpec
from .nodes import POLL_TIMEOUT, RayCluster, first_line
from ..worker_process.transfer import Inline

__all__ = ["RayLauncher", "RayWorker"]

log = logging.getLogger("remote_gpu_server")

#: How long an actor may stay unavailable or silent before its worker counts as dead.
UNAVAILABLE_GRACE = 20.0


class RayWorker:
    """A :class:`~.launcher.WorkerProcess` in a Ray actor on some node."""

    remote = True

    def __init__(self, name: str, node: str, actor: Any, info: dict[str, Any], cluster: RayCluster,
                 node_id: str, client: tuple[bytes, bytes], isolation: Isolation | None = None,
                 tenant: Tenant | None = None, tenants: dict[Tenant, str] | None = None) -> None:
        self.name = name
        self._tenants = tenants if tenants is not None else {}  # the launcher's: where each lease's folder is
        self._isolation = isolation  # the head's: it decides who a user runs as
        self._tenant = tenant
        self.node = node
        self.node_id = node_id
        self.node_lost = False
        self._cluster = cluster
        self._unanswered = 0.0  # since when its actor has not answered (loop time), 0: it answers
        self.info = info
        self.connection_info: dict[str, Any] = dict(info["connection_info"])
        self.data = DataChannel.connect(info["data_address"], Inline(),
                                        pinned_context(False, *client, info["data_cert"]))
        self.death_cause: str | None = None
        self.fault_report: str | None = None
        self._actor = actor
        self._killed = False
        self._pids: frozenset[int] = frozenset()

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return int(pid) if pid is not None else None

    @property
    def devices(self) -> list[int]:
        """The GPUs (indices on its node) that Ray gave it, in its slots' order."""
        return [int(g) for g in self.info.get("gpu_ids") or [] if str(g).isdigit()]

    def mark_lost(self, reason: str) -> None:
        """Its node went away (the cluster says so): the next :meth:`poll` reports the death."""
        self.node_lost = True
        self.death_cause = reason

    async def poll(self) -> int | None:
        from ray.exceptions import ActorUnavailableError

        if self.death_cause is not None:
            return -9
        try:
            code: int | None = await asyncio.wait_for(self._actor.poll.remote(), POLL_TIMEOUT)
        except (TimeoutError, ActorUnavailableError) as exc:
            # Ray says an actor may come back from "unavailable": give it a while.
            now = asyncio.get_running_loop().time()
            self._unanswered = self._unanswered or now
            if now - self._unanswered < UNAVAILABLE_GRACE:
                return None
            self.node_lost = not await self._cluster.alive(self.node_id)
            self.death_cause = (f"node {self.node} went away" if self.node_lost else
                                f"its host on node {self.node} stopped answering: {first_line(exc)}")
            return -9
        except Exception as exc:  # ActorDiedError: the actor or its node died
            self.node_lost = not await self._cluster.alive(self.node_id)
            self.death_cause = (f"node {self.node} went away" if self.node_lost
                                else f"its host actor died: {first_line(exc)}")
            return -9
        self._unanswered = 0.0
        if code is not None:
            try:  # its node may know better (out of host memory, a fatal signal's report)
                explained = await asyncio.wait_for(self._actor.death_cause.remote(), POLL_TIMEOUT)
                self.fault_report = await asyncio.wait_for(self._actor.fault_report.remote(), POLL_TIMEOUT)
            except Exception:
                explained = None
            self.death_cause = explained  # else the code and the report say it (see death.describe)
        return code

    async def signal(self, signum: int) -> None:
        if self._killed or self.death_cause is not None:
            return
        try:
            await asyncio.wait_for(self._actor.signal.remote(signum), POLL_TIMEOUT)
        except Exception as exc:
            log.info("worker %s: could not signal it on %s: %s", self.name, self.node, first_line(exc))

    async def halt(self, cause: str) -> None:
        """Stop it at once on its node for ``cause``, which its death then gives (see :mod:`.gpu_fence`)."""
        if self._killed or self.death_cause is not None:
            return
        await asyncio.wait_for(self._actor.halt.remote(cause), POLL_TIMEOUT + 5)

    @property
    def tenant(self) -> Tenant | None:
        return self._tenant

    async def enter_spec(self, user: str) -> EnterSpec | None:
        """Asks the host actor: the session folder is made on its node, for the
        identity the head gives the user (the same uid on every node)."""
        identity = self._isolation.identity(user) if self._isolation is not None and user else None
        spec, self._tenant = await asyncio.wait_for(self._actor.enter_spec.remote(user, identity), POLL_TIMEOUT)
        if self._tenant is not None:
            self._tenants[self._tenant] = self.node_id
        return spec  # type: ignore[no-any-return]

    async def terminate(self, grace: float) -> frozenset[int]:
        """The stop ladder, run by its host actor on its node; then the actor goes."""
        if self._killed:
            return self._pids
        self._killed = True
        self.data.close()
        import ray

        try:
            pids = await asyncio.wait_for(self._actor.terminate.remote(grace), grace + POLL_TIMEOUT)
            self._pids = frozenset(int(p) for p in pids)
        except Exception as exc:
            log.info("worker %s: its host on %s did not stop it cleanly: %s", self.name, self.node,
                     first_line(exc))
        ray.kill(self._actor, no_restart=True)  # the actor goes, and Ray frees its GPUs
        return self._pids

    async def kill(self) -> None:
        await self.terminate(0.0)


class RayLauncher:
    """Starts workers as Ray actors on the node of their slots, isolated there as
    ``isolation`` (the head's) is configured, each user as the head's identity."""

    def __init__(self, cluster: RayCluster, isolation: Isolation | None = None) -> None:
        self.cluster = cluster
        self.isolation = isolation
        self._tenants: dict[Tenant, str] = {}  # a lease's session folder: on which node
        # The head's data-channel key and certificate: every worker pins the
        # certificate, and the key never leaves this process.
        self._client = make_identity("client")

    async def launch(self, spec: WorkerSpec) -> RayWorker:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .host import WorkerHost

        if spec.environment != DEFAULT_ENVIRONMENT:
            # Each node would need the interpreter and its check: not yet.
            raise ValueError(f"environment {spec.environment}: named environments run on this host's "
                             "slots only, not on Ray nodes")
        nodes = {slot.node for slot in spec.slots}
        if len(nodes) != 1:
            raise ValueError("a lease spans one node")
        node_id = nodes.pop()
        label = self.cluster.label(node_id)
        host = ray.remote(WorkerHost).options(
            num_gpus=len(spec.slots), num_cpus=0, max_restarts=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        # Ray types a new actor as ActorHandle[T] | type[T], whose methods have
        # .remote() only when decorated with @ray.method; WorkerHost's are not
        # (host.py imports Ray only inside the actor), so the handle is kept
        # untyped, as RayWorker keeps it.
        actor: Any = host.remote()
        config = self.isolation.config if self.isolation is not None else IsolationConfig()
        isolate = self.isolation is not None and self.isolation.isolated
        try:
            info = await asyncio.wait_for(actor.start.remote(spec, config, self.cluster.gpus_on(node_id),
                                                             self._client[1], isolate), spec.startup_timeout)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        log.debug("worker %s runs on %s with CUDA_VISIBLE_DEVICES=%s", spec.name, label,
                  info.get("cuda_visible_devices"))
        return RayWorker(spec.name, label, actor, info, self.cluster, node_id, self._client, self.isolation,
                         spec.tenant, self._tenants)

    def release(self, tenant: Tenant | None) -> None:
        """A lease ended: its node's agent removes its session folder."""
        node_id = self._tenants.pop(tenant, None) if tenant is not None else None
        if node_id is None or tenant is None or self.cluster.down(node_id):
            return
        self.cluster.agent(node_id).release.remote(str(tenant.folder))  # the answer is not awaited

    async def close(self) -> None:
        pass
