"""A Ray cluster without Ray's token authentication cannot keep users apart:
any cell could join it and run code on every node as Ray's user. A head
that joins one serves its first user only, as a server that cannot isolate
does, and says why in its log and ``/api/status``.

The cluster is this module's own (the session's runs with token
authentication): a head node with one (fake) GPU, started in a process of
its own with ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel import AuthenticationError, Client
from remote_gpu_kernel.api import ApiClient
from servers import ServerProcess
from test_isolation import run

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="a root head isolates with uids: run as root")]

OPEN_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def open_cluster() -> Iterator[str]:
    """The address of a one-node cluster without token authentication; it stops at the end."""
    pytest.importorskip("ray", reason="pip install 'remote-gpu-kernel[ray]' (in the dev extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env["RAY_AUTH_MODE"] = "disabled"
    process = subprocess.Popen([sys.executable, "-c", OPEN_CLUSTER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None
    try:
        address = process.stdout.readline().strip()
        assert address, "the cluster did not start"
        yield address
    finally:
        process.stdin.close()  # it shuts the cluster down
        process.wait(120)
        process.stdout.close()


def test_a_cluster_without_token_authentication_serves_its_first_user_only(
        open_cluster: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "auto", "--ray", open_cluster, "--grace", "2",
                           env={"RAY_AUTH_MODE": "disabled"})
    alice, bob = server.token("alice"), server.token("bob")
    server.start(timeout=180)
    try:
        server.wait_for_log(f"the Ray cluster at {open_cluster} does not require Ray's token authentication")
        with Client(server.url, alice).session() as a:
            assert run(a, "print('first come')") == "first come\n"
            with pytest.raises(AuthenticationError, match=r"cannot keep users apart \(the Ray cluster .* does not "
                                                          r"require Ray's token authentication.*serves one user only "
                                                          r"\(alice\).*--no-isolation"):
                Client(server.url, bob).session()
        isolation = ApiClient(server.url, alice).status()["isolation"]
        assert isolation["isolated"] is False and isolation["mode"] == "uids"
        assert "token authentication" in isolation["detail"] and "serves one user only" in isolation["detail"]
        assert isolation["ray"]["token_auth"] is False and "RAY_AUTH_MODE=token" in isolation["ray"]["problem"]
    finally:
        server.stop()
