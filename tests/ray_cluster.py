"""A real Ray cluster on this machine for tests: a head and two nodes of two (fake) GPUs.

``ray.cluster_utils.Cluster`` starts real Ray processes (GCS, raylets) for
each node; the GPUs are counts Ray hands out, with nothing behind them,
which is all the server needs to place workers. The test process never
joins the cluster as a driver: the server under test does (``rgpu serve
--ray ADDRESS``). One cluster serves the whole test session (it takes
seconds to start); a test that kills a node adds one back before it ends.

The cluster runs with Ray's token authentication, as the README tells
admins to run it: ``RAY_AUTH_MODE=token`` and the token in a file of mode
0600 that ``RAY_AUTH_TOKEN_PATH`` names, in a folder every uid may enter
(under ``/run``, not ``/tmp``, which workers do not share), so that only
the file's permissions keep workers from it. This process and every
process it starts (the Ray nodes, the server) inherit both variables until
:meth:`RayTestCluster.shutdown`.

The nodes keep their files (session folders, users' sites) in a data folder
of the cluster's own (``XDG_DATA_HOME`` of their processes), removed with
it, not in this user's: nothing crosses from one test run to the next.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from waiting import wait_for

__all__ = ["RayTestCluster"]

NODE_GPUS = 2


class RayTestCluster:
    def __init__(self, nodes: int = 2) -> None:
        from ray._private.authentication_test_utils import (AuthenticationEnvSnapshot, reset_auth_token_state,
                                                            set_auth_mode, set_auth_token_path)
        from ray.cluster_utils import Cluster

        self._auth_env = AuthenticationEnvSnapshot.capture()
        self.folder = Path(tempfile.mkdtemp(prefix="rgpu-test-ray-", dir="/run" if os.access("/run", os.W_OK)
                                            else None))
        self.folder.chmod(0o755)
        self.token = secrets.token_hex(32)
        self.token_path = self.folder / "auth_token"
        self.token_path.touch(mode=0o600)
        set_auth_token_path(self.token, self.token_path)
        set_auth_mode("token")
        reset_auth_token_state()
        try:
            # Nodes are checked every half second, so a killed one is known dead
            # within seconds (Ray's default takes tens of seconds).
            with self._node_data():
                self.cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                                       "health_check_initial_delay_ms": 1000}})
            self.nodes: list[Any] = [self.add_node() for _ in range(nodes)]
        except BaseException:
            if hasattr(self, "cluster"):
                self.cluster.shutdown()
            self._restore()
            raise

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def _node_data(self) -> contextlib.AbstractContextManager[Any]:
        """Ray processes started meanwhile keep their data in the cluster's folder."""
        return mock.patch.dict(os.environ, {"XDG_DATA_HOME": str(self.folder / "data")})

    def add_node(self) -> Any:
        with self._node_data():
            node = self.cluster.add_node(num_cpus=2, num_gpus=NODE_GPUS)
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node: Any) -> None:
        """Kill the node's Ray processes at once (its actors and their workers die)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def node_of(self, node_id: str) -> Any:
        return next(n for n in self.nodes if n.node_id.startswith(node_id))

    @contextlib.contextmanager
    def node_as(self, prefix: list[str], folder: Path, gpus: int = 1) -> Iterator[str]:
        """A node whose Ray runs through ``prefix`` (an argv prefix that runs a command
        as another uid, which owns ``folder``: see ``unprivileged.py``), with only this
        Python's folder on its PATH (no bubblewrap) and its own copy of the token.
        Yields its node id once it has joined; its Ray stops at the end.

        Ray gives a starting node 30 s to register (not configurable); on a busy
        machine that may not be enough, and the start is tried again, three times in all.
        """
        token = folder / "auth_token"
        token.write_text(self.token)
        token.chmod(0o600)
        bin_dir = os.path.dirname(sys.executable)
        env = {"PATH": bin_dir, "LANG": "C.UTF-8", "USER": "rgpu-test-node", "RAY_AUTH_MODE": "token",
               "XDG_DATA_HOME": str(folder / "data"),
               "RAY_AUTH_TOKEN_PATH": str(token),
               # SIGTERM stops it at once, instead of draining its actors for 30 s.
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        argv = [*prefix, os.path.join(bin_dir, "ray"), "start", "--address", self.address, "--num-cpus", "1",
                "--num-gpus", str(gpus), "--temp-dir", str(folder / "ray"), "--disable-usage-stats", "--block"]
        known = set(self.cluster.global_state._live_node_ids())
        log = folder / "ray-start.log"  # what `ray start` says, for a failure's message
        for attempt in range(3):
            with open(log, "wb") as out:
                process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            try:
                joined = wait_for(lambda: process.poll() is not None or set(
                    self.cluster.global_state._live_node_ids()) - known, 180, "the node to join")
                if joined is not True:
                    break
                said = log.read_text()
                if "timed out during startup" not in said or attempt == 2:
                    raise AssertionError(f"the node's Ray did not start:\n{said[-3000:]}")
            except BaseException:
                self._stop(process)
                raise
        try:
            yield str(next(iter(joined)))
        finally:
            self._stop(process)

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        """``ray start --block`` stops the node's processes and exits on SIGTERM."""
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            self._restore()

    def _restore(self) -> None:
        """This process's Ray environment as it was; the token's folder goes."""
        from ray._private.authentication_test_utils import reset_auth_token_state

        self._auth_env.restore()
        reset_auth_token_state()
        shutil.rmtree(self.folder, ignore_errors=True)
