from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import postgres as pg
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
def torch() -> ModuleType:
    """The torch module, for the tests that need it: they alone skip where it is not installed."""
    return pytest.importorskip("torch", reason="pip install torch (scripts/setup.sh installs the CPU wheel)")


@pytest.fixture(scope="session", autouse=True)
def uid_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry of dynamic uids of the test session's own, for servers started in
    this process (a subprocess server gets one of its test's: :mod:`servers`), so
    that no test claims uids in the host's ``/var/lib`` nor meets an earlier run's."""
    path = tmp_path_factory.mktemp("uid-registry") / "uids.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RGPU_UID_REGISTRY", str(path))
        yield path


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
def fresh_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, not yet started: set ``slots``/``args`` then ``start()``.

    Its store is a SQLite file, or a PostgreSQL database of its own for a test
    parametrized with ``@pytest.mark.parametrize("fresh_server", postgres.BACKENDS, indirect=True)``.
    """
    with contextlib.ExitStack() as stack:
        db: str | None = None
        if getattr(request, "param", "sqlite") == "postgres":
            cluster: pg.PostgresCluster = request.getfixturevalue("postgres")
            db = stack.enter_context(cluster.database())
        proc = ServerProcess(tmp_path, "cpu:1", db=db)
        try:
            yield proc
        finally:
            proc.kill()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresCluster]:
    """One PostgreSQL server for the whole test session (see :mod:`postgres`).

    Skips where PostgreSQL cannot run (a failure in CI: :func:`postgres.require`).
    """
    pg.require()
    cluster = pg.PostgresCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=pg.BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a test's store lives, once per backend: a SQLite file, or a new PostgreSQL
    database's URL (and then a data folder of its own: :meth:`postgres.PostgresCluster.database`)."""
    if request.param == "sqlite":
        yield str(tmp_path / "rgpu.sqlite3")
        return
    cluster: pg.PostgresCluster = request.getfixturevalue("postgres")
    with cluster.database() as url:
        yield url


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


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared ``rgpu serve --tls self-signed`` with one CPU slot (see tls_certs.py)."""
    proc = self_signed_server(tmp_path_factory.mktemp("tls-server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tls_alice(tls_server: ServerProcess) -> str:
    return tls_server.token("alice")


@pytest.fixture(scope="session")
def test_environments() -> dict[str, Path]:
    """Two real virtual environments, np1 (numpy 1.26.4) and np2 (numpy 2.x), each
    with the worker's requirements: their interpreters by name (see :mod:`environments`)."""
    import environments

    return environments.make_environments()
