"""Every public module lists its public names in ``__all__``, and they exist."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "remote_gpu_kernel",
    "remote_gpu_kernel.errors",
    "remote_gpu_kernel.typing",
    "remote_gpu_kernel.protocol",
    "remote_gpu_kernel.protocol.messages",
    "remote_gpu_kernel.protocol.framing",
    "remote_gpu_kernel.protocol.serialization",
    "remote_gpu_kernel.protocol.limits",
    "remote_gpu_kernel.client",
    "remote_gpu_kernel.sync",
    "remote_gpu_kernel.config",
    "remote_gpu_kernel.iostreams",
    "remote_gpu_kernel.tls",
    "remote_gpu_kernel.files",
    "remote_gpu_kernel.cli_up",
    "remote_gpu_kernel.notices",
    "remote_gpu_kernel.magic_comms",
    "remote_gpu_kernel.kernel_app",
    "remote_gpu_kernel.kernel_output",
    "remote_gpu_server.app",
    "remote_gpu_server.errors",
    "remote_gpu_server.scheduler",
    "remote_gpu_server.leases",
    "remote_gpu_server.store",
    "remote_gpu_server.store.base",
    "remote_gpu_server.store.database",
    "remote_gpu_server.store.records",
    "remote_gpu_server.store.schema",
    "remote_gpu_server.store.postgres",
    "remote_gpu_server.retention",
    "remote_gpu_server.broker",
    "remote_gpu_server.sessions",
    "remote_gpu_server.journal",
    "remote_gpu_server.frontdoor",
    "remote_gpu_server.status",
    "remote_gpu_server.session",
    "remote_gpu_server.connection",
    "remote_gpu_server.datachannel",
    "remote_gpu_server.launcher",
    "remote_gpu_server.local_launcher",
    "remote_gpu_server.slots",
    "remote_gpu_server.queues",
    "remote_gpu_server.notes",
    "remote_gpu_server.ray_launcher",
    "remote_gpu_server.ray_host",
    "remote_gpu_server.pool",
    "remote_gpu_server.worker",
    "remote_gpu_server.transfer",
    "remote_gpu_server.gpus",
    "remote_gpu_server.devices",
    "remote_gpu_server.owners",
    "remote_gpu_server.gpu_fence",
    "remote_gpu_server.history",
    "remote_gpu_server.status",
    "remote_gpu_server.tls",
    "remote_gpu_server.origins",
    "remote_gpu_server.isolation",
    "remote_gpu_server.identities",
    "remote_gpu_server.memory_limits",
    "remote_gpu_server.cgroups",
    "remote_gpu_server.process_limits",
    "remote_gpu_server.sandbox",
    "remote_gpu_server.confinement",
    "remote_gpu_server.worker_output",
    "remote_gpu_server.limits",
    "remote_gpu_server.connection_memory",
    "remote_gpu_server.http_headers",
    "remote_gpu_server.ladder",
    "remote_gpu_server.drain",
    "remote_gpu_server.death",
    "remote_gpu_server.xid",
    "remote_gpu_server.stopping",
    "remote_gpu_server.worker_errors",
    "remote_gpu_server.parked_namespace",
    "remote_gpu_server.parking",
    "remote_gpu_server.parking_state",
    "remote_gpu_server.store.parked",
    "remote_gpu_server.comms",
    "remote_gpu_server.session_files",
    "remote_gpu_server.worker_files",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_the_package_exports_the_api_and_every_error() -> None:
    import remote_gpu_kernel
    from remote_gpu_kernel import errors

    for name in ("Client", "Session", "AsyncClient", "AsyncSession", "ExecuteResult",
                 "load_ipython_extension"):
        assert name in remote_gpu_kernel.__all__
    for name in errors.__all__:
        assert name in remote_gpu_kernel.__all__
        assert issubclass(getattr(errors, name), errors.RemoteGpuError)


def test_the_server_does_not_import_torch_or_initialise_cuda() -> None:
    import subprocess
    import sys

    code = ("import sys, remote_gpu_server.app, remote_gpu_server.worker; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
