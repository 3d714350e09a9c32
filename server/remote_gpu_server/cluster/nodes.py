"""The head's view of a Ray cluster: its nodes, their GPUs as slots, their readings.

``rgpu serve --ray ADDRESS`` joins a running cluster as a Ray driver
(``ray.init(address=...)``, never Ray Client), having first asked whether
the cluster requires Ray's token authentication (see :mod:`.fence`).
:class:`RayCluster` reads the GPUs that Ray reports on every alive node
into the server's :class:`~..gpus.slots.SlotInventory` (a node's
``pool:NAME`` resource puts its GPUs in our pool ``NAME``) once the node
has reported how it isolates workers, and leaves out a node that cannot
isolate them as the head does; it watches the nodes: a node that dies takes
its slots out of the pool until it is back; a node that joins adds its GPUs.
:class:`RayReadings` reads each node's GPUs through its agent.
"""


from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from remote_gpu_core.ids import SlotId

from ..isolation.policy import IsolationConfig
from .fence import AUTH_MODE_VAR, ClusterAuth, NodeReport, NodeReports, probe_cluster, uses_token
from ..gpus.slots import Slot, SlotInventory

__all__ = ["POLL_TIMEOUT", "RayCluster", "RayReadings", "first_line", "gpus_of", "node_slots"]

log = logging.getLogger("remote_gpu_server")

#: How long one call to an actor may take.
POLL_TIMEOUT = 10.0
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


def gpus_of(node: dict[str, Any]) -> int:
    return int((node.get("Resources") or {}).get("GPU", 0))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def node_slots(node: dict[str, Any], label: str) -> list[Slot]:
    """The slots of one node as ``ray.nodes()`` describes it (one per GPU it reports)."""
    resources = node.get("Resources") or {}
    gpus = gpus_of(node)
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
        return bool(gpus_of(node)) and node_id not in self.reports and node_id not in self._asking

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
            log.info("node %s did not say how it isolates workers: %s", label, first_line(exc))
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
                log.info("reading node %s failed: %s", self.cluster.label(node_id), first_line(exc))
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
                     first_line(exc))
            return ()
        return tuple(found.get(slot.id, ()))


