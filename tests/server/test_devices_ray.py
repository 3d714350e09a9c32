"""The GPUs fenced on Ray nodes: a worker there sees the files of the GPUs Ray gave it, no others.

A real Ray cluster with fake GPU counts (``ray_cluster.py``); the head tells
its nodes where the stand-in host's files are (``$RGPU_TEST_DEVICE_ROOT``
travels in the isolation settings), and each node maps the GPU indices Ray
assigned to their minor numbers through the driver's ``/proc`` files, as a
node without NVML would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_gpu_host import FakeGpuFiles, make_host
from remote_gpu_kernel import Client
from remote_gpu_server.isolation.devices import TEST_ROOT_VAR
from servers import ServerProcess
from test_gpu_fence import devices_of
from test_isolation import run

# A head on the session's Ray cluster starts in well over pytest's default two
# minutes on a busy machine, as in test_ray.py.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="nodes isolate with uids; mknod: run as root"),
              pytest.mark.timeout(300)]

#: One per GPU a test node has (ray_cluster.NODE_GPUS), minors in another order than the indices.
GPUS = [FakeGpuFiles("0000:17:00.0", 1, "GPU-1111"), FakeGpuFiles("0000:3b:00.0", 0, "GPU-2222")]
SPARE_MINOR = 2


@pytest.fixture(scope="module")
def ray_head_with_gpu_files(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    host = make_host(Path(tempfile.mkdtemp(prefix="rgpu-test-gpus-", dir="/srv")), GPUS, spare_minors=[SPARE_MINOR])
    server = ServerProcess(tmp_path_factory.mktemp("ray-head-gpus"), "auto", "--ray", getattr(ray_cluster, "address"),
                           "--grace", "2", env={TEST_ROOT_VAR: str(host)})
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.stop()
        shutil.rmtree(host)


def test_a_worker_on_a_node_sees_the_files_of_the_gpus_ray_gave_it(ray_head_with_gpu_files: ServerProcess) -> None:
    server = ray_head_with_gpu_files
    client = Client(server.url, server.token("alice"))
    for gpus in (1, 2):
        with client.session(gpus=gpus) as session:
            # Ray's indices became UUIDs: CUDA numbers only the GPUs the worker can open.
            given = run(session, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])").strip().split(",")
            assert len(given) == gpus and set(given) <= {g.uuid for g in GPUS}
            expected = {"nvidiactl": [195, 255], "nvidia-uvm": [508, 0], "nvidia-uvm-tools": [508, 1]}
            for uuid in given:
                minor = next(g.minor for g in GPUS if g.uuid == uuid)
                expected[f"nvidia{minor}"] = [195, minor]
            assert devices_of(session)["nvidia"] == expected
            out = run(session, f"""
for minor in (0, 1, {SPARE_MINOR}):
    try:
        open(f'/dev/nvidia{{minor}}')
    except OSError as exc:
        print(exc.errno)
""")
            assert out.split().count("2") == 3 - gpus  # ENOENT for each GPU not given; ENXIO for those given
