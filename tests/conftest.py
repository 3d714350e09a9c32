from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import ServerProcess
from tls_certs import self_signed_server


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
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared ``rgpu serve --tls self-signed`` with one CPU slot (see tls_certs.py)."""
    proc = self_signed_server(tmp_path_factory.mktemp("tls-server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tls_alice(tls_server: ServerProcess) -> str:
    return tls_server.token("alice")
