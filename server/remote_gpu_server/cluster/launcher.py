"""Workers on the nodes of a Ray cluster: the server is the cluster's head.

``rgpu serve --ray ADDRESS`` joins a running cluster as a Ray driver
(``ray.init(address=...)``, never Ray Client), having first asked whether
the cluster requires Ray's token authentication (see :mod:`.ray_fence`).
:class:`RayCluster` reads the GPUs that Ray reports on every alive node
into the server's :class:`~.slots.SlotInventory` (a node's ``pool:NAME``
resource puts its GPUs in our pool ``NAME``) once the node has reported
how it isolates workers, and leaves out a node that cannot isolate them
as the head does; it watches the nodes: a node that dies takes its slots
out of the pool until it is back; a node that joins adds its GPUs.

:class:`RayLauncher` starts each worker as a Ray actor
(:class:`~.ray_host.WorkerHost`) with ``num_gpus`` equal to its lease,
pinned to the node the scheduler chose (``NodeAffinitySchedulingStrategy``,
not soft): Ray only places processes and reports their deaths; who gets the
next GPU is always our scheduler's decision, and an actor is created only
for slots it granted. Ray does not forward ports: the actor returns its
node's address, the worker's ports and keys, and the head connects over
TCP: the Jupyter channels encrypted with CurveZMQ, the data channel opened
with mutual TLS and sealed (:mod:`.notes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from remote_gpu_core.ids import SlotId

from ..worker_process.confinement import EnterSpec
from ..workers.datachannel import DataChannel
from ..worker_process.sealed import pinned_context
from ..workers.carriers import make_identity
from ..isolation.policy import Isolation, IsolationConfig
from ..isolation.tenant import Tenant
from ..workers.launcher import WorkerSpec
from .fence import AUTH_MODE_VAR, ClusterAuth, NodeReport, NodeReports, probe_cluster, uses_token
from ..gpus.slots import Slot, SlotInventory
from ..worker_process.transfer import Inline

__all__ = ["RayCluster", "RayLauncher", "RayReadings", "RayWorker", "node_slots"]

log = logging.getLogger("remote_gpu_server")

#: How long one call to an actor may take.
POLL_TIMEOUT = 10.0
#: How long an actor may stay unavailable or silent before its worker counts as dead.
UNAVAILABLE_GRACE = 20.0
#: Seconds between two looks at the cluster's nodes.
WATCH_PERIOD = 1.0
#: How long one look at the cluster's nodes may take.
NODES_TIMEOUT = 5.0
#: How long a node may take to say how it isolates workers (its agent's start included).
REPORT_TIMEOUT = 60.0
#: How many more times a GCS that did not answer the token probe is asked once joined.
PROBE_TRIES = 2
#: The Ray resource prefix that names a node's pool: ``--resources '{"pool:batch": 2}'``.
POOL_RESOURCE = "pool:"


def _short(node_id: str) -> str:
    return node_id[:8]


def _gpus(node: dict[str, Any]) -> int:
    return int((node.get("Resources") or {}).get("GPU", 0))


def node_slots(node: dict[str, Any], label: str) -> list[Slot]:
    """The slots of one node as ``ray.nodes()`` describes it (one per GPU it reports)."""
    resources = node.get("Resources") or {}
    gpus = _gpus(node)
    pools = [name[len(POOL_RESOURCE):] for name in resources if name.startswith(POOL_RESOURCE)]
    node_id = str(node["NodeID"])
    return [Slot(SlotId(f"{_short(node_id)}/gpu{i}"), "gpu", i, f"GPU {i} of {label}", node=node_id,
                 pool=pools[0] if pools else None)
            for i in range(gpus)]


class RayCluster:
    """The server's hold on a Ray cluster: call :meth:`connect`, then :meth:`watch`.

    ``isolation`` is how the head isolates workers, which each node is asked
    about; with ``isolate`` (the head isolates them) a node that cannot is
    left out.
    """

    def __init__(self, address: str, namespace: str = "remote-gpu", *,
                 isolation: IsolationConfig | None = None, isolate: bool = False) -> None:
        self.address = address
        self.namespace = namespace
        self.isolation = isolation or IsolationConfig()
        #: How each node isolates workers, and which the head uses.
        self.reports = NodeReports(isolate)
        #: A node's name as shown to people: its name in Ray, with its id where two share one.
        self.labels: dict[str, str] = {}
        #: Whether the cluster refuses callers without its token (set by :meth:`connect`).
        self.auth = ClusterAuth(False, "not joined yet")
        self._inventory: SlotInventory | None = None
        self._agents: dict[str, Any] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}

    @property
    def unfenced(self) -> str | None:
        """Why this cluster does not keep users apart (it lets callers in without
        the token), or None."""
        return self.auth.problem

    async def connect(self) -> None:
        """Join the cluster as a driver; raises RuntimeError saying why it could not."""
        try:
            import ray
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:
            raise RuntimeError("--ray needs Ray: pip install 'remote-gpu-kernel[ray]'") from None

        def init() -> None:
            ray.init(address=self.address, namespace=self.namespace, log_to_driver=False,
                     configure_logging=False, include_dashboard=False)

        try:
            gcs = await asyncio.to_thread(canonicalize_bootstrap_address_or_die, self.address)
            auth, token = await asyncio.gather(probe_cluster(gcs), asyncio.to_thread(uses_token, self.address))
        except Exception as exc:
            raise RuntimeError(f"cannot join the Ray cluster at {self.address}: {exc}") from exc
        if auth.required and not token:  # ray.init would try for a while, then fail
            raise RuntimeError(f"the Ray cluster at {gcs} requires Ray's token authentication: start rgpu serve "
                               f"with {AUTH_MODE_VAR}=token and the cluster's token in ~/.ray/auth_token (or in "
                               "the file RAY_AUTH_TOKEN_PATH names, or in RAY_AUTH_TOKEN)")
        try:
            await asyncio.to_thread(init)
        except Exception as exc:
            raise RuntimeError(f"cannot join the Ray cluster at {self.address}: {exc}") from exc
        log.info("joined the Ray cluster at %s as its head", self.address)
        if not auth.answered:  # it answers ray.init: ask again
            auth = await probe_cluster(gcs, tries=PROBE_TRIES)
        self.auth = auth
        if self.unfenced is not None:
            log.warning("%s", self.unfenced)

    async def nodes(self) -> list[dict[str, Any]]:
        import ray

        nodes: list[dict[str, Any]] = await asyncio.to_thread(ray.nodes)
        names = [str(n.get("NodeName") or n.get("NodeManagerAddress") or "") for n in nodes]
        for node, name in zip(nodes, names):
            node_id = str(node["NodeID"])
            label = name if names.count(name) == 1 else f"{name} ({_short(node_id)})"
            self.labels.setdefault(node_id, label)
        return nodes

    async def alive(self, node_id: str) -> bool:
        """Whether Ray counts ``node_id`` alive now (a dead one leaves the pool at once)."""
        try:
            nodes = await asyncio.wait_for(self.nodes(), NODES_TIMEOUT)
        except Exception:
            return True  # cannot tell: do not give up on the node
        if any(str(n["NodeID"]) == node_id and n.get("Alive") for n in nodes):
            return True
        if self._inventory is not None:
            self.update(self._inventory, nodes)
        return False

    def agent(self, node_id: str) -> Any:
        """The node's agent actor (readings, session folders), made on first use, pinned there."""
        agent = self._agents.get(node_id)
        if agent is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from .host import NodeAgent

            agent = self._agents[node_id] = ray.remote(NodeAgent).options(
                num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
        return agent

    def forget_agent(self, node_id: str) -> None:
        self._agents.pop(node_id, None)

    def gpus_on(self, node_id: str) -> int:
        return len(self._inventory.on(node_id)) if self._inventory is not None else 1

    def down(self, node_id: str) -> bool:
        return self._inventory is not None and self._inventory.is_down(node_id)

    def label(self, node_id: str) -> str:
        return self.labels.get(node_id, _short(node_id))

    async def slots(self) -> list[Slot]:
        """The GPUs of every alive node now that the head may use (new nodes are asked first)."""
        nodes = [node for node in await self.nodes() if node.get("Alive")]
        await asyncio.gather(*(self._ask(node) for node in nodes if self._unasked(node)))
        return [slot for node in nodes if self.reports.uses(str(node["NodeID"]))
                for slot in node_slots(node, self.label(str(node["NodeID"])))]

    def _unasked(self, node: dict[str, Any]) -> bool:
        node_id = str(node["NodeID"])
        return bool(_gpus(node)) and node_id not in self.reports and node_id not in self._asking

    async def _ask(self, node: dict[str, Any], inventory: SlotInventory | None = None) -> None:
        """Ask the node how it isolates workers; where the head may use it, its
        GPUs join ``inventory`` (if given). A node that does not answer is
        asked again at the next look."""
        node_id = str(node["NodeID"])
        label = self.label(node_id)
        try:
            # The first call waits for the agent's process to start: on a busy node, a while.
            report: NodeReport = await asyncio.wait_for(self.agent(node_id).report.remote(self.isolation),
                                                        REPORT_TIMEOUT)
        except TimeoutError:
            log.info("node %s did not say in %.0f s how it isolates workers; asking again", label, REPORT_TIMEOUT)
            return
        except Exception as exc:
            log.info("node %s did not say how it isolates workers: %s", label, _first_line(exc))
            self.forget_agent(node_id)
            return
        refused = self.reports.add(node_id, report)
        if refused is not None:
            log.error("node %s is left out, its GPUs are not leased: %s", label, refused)
        elif inventory is not None:
            new = inventory.add(node_slots(node, label))
            if new:
                log.info("node %s joined with %d GPU(s)", label, len(new))

    def _ask_later(self, node: dict[str, Any], inventory: SlotInventory) -> None:
        node_id = str(node["NodeID"])
        task = asyncio.get_running_loop().create_task(self._ask(node, inventory))
        self._asking[node_id] = task
        task.add_done_callback(lambda _: self._asking.pop(node_id, None))

    def status_json(self) -> dict[str, Any]:
        """The ``ray`` part of ``/api/status``'s ``isolation``: whether the cluster
        requires Ray's token, and how each node isolates workers."""
        return {"token_auth": self.auth.required, "problem": self.auth.problem,
                "nodes": self.reports.as_json(self.label)}

    async def watch(self, inventory: SlotInventory, period: float = WATCH_PERIOD) -> None:
        """Keep ``inventory`` in step with the cluster: nodes that die, come back or join."""
        self._inventory = inventory
        while True:
            try:
                nodes = await asyncio.wait_for(self.nodes(), NODES_TIMEOUT)
            except Exception:
                log.exception("reading the Ray cluster's nodes failed; trying again")
            else:
                self.update(inventory, nodes)
            await asyncio.sleep(period)

    def update(self, inventory: SlotInventory, nodes: Iterable[dict[str, Any]]) -> None:
        """Nodes alive now add their GPUs (or come back); known nodes not alive (dead, or
        gone from Ray's list) take theirs out of the pool."""
        alive: set[str] = set()
        for node in nodes:
            if not node.get("Alive"):
                continue
            node_id = str(node["NodeID"])
            alive.add(node_id)
            if self._unasked(node):
                self._ask_later(node, inventory)  # its GPUs join once it has reported
            if not self.reports.uses(node_id):
                continue
            new = inventory.add(node_slots(node, self.label(node_id)))
            if new:
                log.info("node %s joined with %d GPU(s)", self.label(node_id), len(new))
            if inventory.is_down(node_id):
                log.warning("node %s is back", self.label(node_id))
                inventory.node_up(node_id)
        for node_id in {slot.node for slot in inventory} - alive:
            if not inventory.is_down(node_id):
                log.error("node %s is gone: its GPUs leave the pool until it is back", self.label(node_id))
                inventory.node_down(node_id)
        self.reports.keep(alive | {slot.node for slot in inventory})  # not a node left out that went away

    async def close(self) -> None:
        import ray

        for task in list(self._asking.values()):
            task.cancel()
        await asyncio.to_thread(ray.shutdown)


class RayReadings:
    """Reads the slots of Ray nodes on their nodes, through each node's agent;
    a node that does not answer gives no reading."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster

    async def __call__(self, slots: list[Slot], pids: dict[SlotId, list[int]],
                       devices: dict[SlotId, int]) -> dict[SlotId, Any]:
        by_node: dict[str, list[Slot]] = {}
        for slot in slots:
            if not self.cluster.down(slot.node):
                by_node.setdefault(slot.node, []).append(slot)

        async def read(node_id: str, node_slots: list[Slot]) -> dict[SlotId, Any]:
            requests = [(s.id, devices.get(s.id, s.index), pids.get(s.id, [])) for s in node_slots]
            try:
                found: dict[SlotId, Any] = await asyncio.wait_for(
                    self.cluster.agent(node_id).read.remote(requests, len(node_slots)), POLL_TIMEOUT)
                return found
            except Exception as exc:
                log.info("reading node %s failed: %s", self.cluster.label(node_id), _first_line(exc))
                self.cluster.forget_agent(node_id)
                return {}

        results = await asyncio.gather(*(read(n, s) for n, s in by_node.items()))
        return {slot_id: reading for found in results for slot_id, reading in found.items()}

    async def holders(self, slot: Slot, pids: frozenset[int], device: int | None) -> tuple[Any, ...]:
        """Which of ``pids`` still hold ``slot`` on its node (see :mod:`.drain`); a node
        that does not answer, or is down, holds nothing we can wait for."""
        if self.cluster.down(slot.node):
            return ()
        request = [(slot.id, slot.index if device is None else device, sorted(pids))]
        try:
            found = await asyncio.wait_for(self.cluster.agent(slot.node).holders.remote(request), POLL_TIMEOUT)
        except Exception as exc:
            log.info("asking node %s about slot %s failed: %s", self.cluster.label(slot.node), slot.id,
                     _first_line(exc))
            return ()
        return tuple(found.get(slot.id, ()))


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
                                f"its host on node {self.node} stopped answering: {_first_line(exc)}")
            return -9
        except Exception as exc:  # ActorDiedError: the actor or its node died
            self.node_lost = not await self._cluster.alive(self.node_id)
            self.death_cause = (f"node {self.node} went away" if self.node_lost
                                else f"its host actor died: {_first_line(exc)}")
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
            log.info("worker %s: could not signal it on %s: %s", self.name, self.node, _first_line(exc))

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
                     _first_line(exc))
        ray.kill(self._actor, no_restart=True)  # the actor goes, and Ray frees its GPUs
        return self._pids

    async def kill(self) -> None:
        await self.terminate(0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
