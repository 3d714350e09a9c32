from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import ServerProcess


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is false here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server with two CPU slots, for tests that do not change it."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), "cpu:2").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def alice(server: ServerProcess) -> str:
    return server.token("alice")


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, not yet started: set ``slots``/``args`` then ``start()``."""
    proc = ServerProcess(tmp_path, "cpu:1")
    yield proc
    proc.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """One Ray cluster for the whole test session: a head and two nodes of two GPUs."""
    pytest.importorskip("ray", reason="pip install 'remote-gpu-kernel[ray]' (in the dev extra)")
    from ray_cluster import RayTestCluster

    cluster = RayTestCluster()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_server(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that is the head of the session's Ray cluster, for one test module."""
    from servers import ray_head

    server = ray_head(tmp_path_factory.mktemp("ray-head"), ray_cluster)
    yield server
    server.stop()
