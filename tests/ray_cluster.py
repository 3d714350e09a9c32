"""A real Ray cluster on this machine for tests: a head and two nodes of two (fake) GPUs.

``ray.cluster_utils.Cluster`` starts real Ray processes (GCS, raylets) for
each node; the GPUs are counts Ray hands out, with nothing behind them,
which is all the server needs to place workers. The test process never
joins the cluster as a driver: the server under test does (``rgpu serve
--ray ADDRESS``). One cluster serves the whole test session (it takes
seconds to start); a test that kills a node adds one back before it ends.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayTestCluster"]

NODE_GPUS = 2


class RayTestCluster:
    def __init__(self, nodes: int = 2) -> None:
        from ray.cluster_utils import Cluster

        # Nodes are checked every half second, so a killed one is known dead
        # within seconds (Ray's default takes tens of seconds).
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                               "health_check_initial_delay_ms": 1000}})
        self.nodes: list[Any] = [self.add_node() for _ in range(nodes)]

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_node(self) -> Any:
        node = self.cluster.add_node(num_cpus=2, num_gpus=NODE_GPUS)
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node: Any) -> None:
        """Kill the node's Ray processes at once (its actors and their workers die)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def node_of(self, node_id: str) -> Any:
        return next(n for n in self.nodes if n.node_id.startswith(node_id))

    def shutdown(self) -> None:
        self.cluster.shutdown()
