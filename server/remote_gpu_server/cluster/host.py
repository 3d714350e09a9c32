"""What runs on a Ray node for one worker: the host actor.

:class:`WorkerHost` is the body of a Ray actor that the head creates with
``num_gpus`` equal to the lease, pinned to one node. Its :meth:`start`
starts the same worker kernel as a single-machine server does, through
:class:`~.local_launcher.LocalLauncher` over TCP on the node's address,
pinned by the ``CUDA_VISIBLE_DEVICES`` that Ray assigned, its Jupyter
channels encrypted by CurveZMQ keys made for this worker and its data
channel over mutual TLS; it returns what the head needs to connect. The head polls, signals and kills the worker
through the actor. The actor holds the worker's GPUs in Ray's accounting
for as long as it lives, so Ray never gives them to anyone else. Where the
head isolates workers and this node cannot, it starts none (the head
leaves such a node out: see :mod:`.ray_fence`).

This module imports Ray only inside the methods that need it: a node needs
the package and Ray, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from ..worker_process.confinement import EnterSpec
from ..errors import IsolationError
from ..isolation.identities import Identity
from ..isolation.modes import IsolationMode
from ..isolation.policy import Isolation, IsolationConfig
from ..isolation.tenant import Tenant
from ..workers.launcher import WorkerSpec
from ..workers.local_launcher import LocalLauncher, Spawned
from .fence import NodeReport, token_exposure, token_files

__all__ = ["NodeAgent", "WorkerHost", "node_data_dir"]


class WorkerHost:
    """One worker process on this node; see the module docstring."""

    def __init__(self) -> None:
        self._launcher: LocalLauncher | None = None
        self._spawned: Spawned | None = None
        self._name = ""

    async def start(self, spec: WorkerSpec, isolation: IsolationConfig, node_slots: int,
                    server_cert: bytes, isolate: bool = False) -> dict[str, Any]:
        """Start the worker, isolated on this node as the head's ``isolation`` says
        (``node_slots``: the GPUs this node offers, for memory shares; ``server_cert``:
        the head's data-channel certificate, the only one the worker accepts;
        ``isolate``: the head isolates workers, so one this node cannot isolate
        is refused with IsolationError); returns its connection info, data
        channel and where it runs."""
        import ray

        ip = ray.util.get_node_ip_address()
        # Ray's token stays Ray's: a sandbox hides its file like the server's own.
        confined = Isolation(isolation, node_data_dir() / "node", token_files())
        confined.start(node_slots)
        if isolate and not confined.isolated:
            raise IsolationError(f"node {socket.gethostname()} cannot isolate workers ({confined.reason})")
        self._launcher = LocalLauncher(confined, transport="tcp", ip=ip)
        self._name = spec.name
        cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # as Ray assigned them
        self._spawned = await self._launcher.spawn(spec, cuda_devices=cuda, server_cert=server_cert)
        km = self._spawned.km
        process = getattr(km.provisioner, "process", None)
        return {
            "connection_info": dict(km.get_connection_info()),
            "data_address": self._spawned.data_address,
            "data_cert": self._spawned.data_cert,
            "pid": process.pid if process is not None else None,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": cuda,
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
        }

    def enter_spec(self, user: str, identity: Identity | None) -> tuple[EnterSpec | None, Tenant | None]:
        """What the worker takes on for ``user``'s lease, as the head decided who
        they run as; and the lease's tenancy (its session folder on this node)."""
        assert self._spawned is not None
        self._spawned.note_namespaces()
        spec = self._spawned.isolation.enter_spec(user, identity)
        if self._spawned.isolation.binds_site:
            self._spawned.isolation.bind_site(self._spawned.pid)
        return spec, self._spawned.isolation.tenant

    async def poll(self) -> int | None:
        if self._spawned is None:
            return 0
        return await self._spawned.poll()

    def death_cause(self) -> str | None:
        return self._spawned.death_cause if self._spawned is not None else None

    def fault_report(self) -> str | None:
        return self._spawned.fault_report if self._spawned is not None else None

    async def halt(self, cause: str) -> None:
        """Stop the worker at once for ``cause``, which its death then gives (see :mod:`.gpu_fence`)."""
        if self._spawned is not None:
            await self._spawned.halt(self._name, cause)

    async def signal(self, signum: int) -> None:
        if self._spawned is not None and self._spawned.km.provisioner is not None:
            await self._spawned.km.signal_kernel(signum)

    async def terminate(self, grace: float) -> list[int]:
        """The stop ladder on this node (see :mod:`.ladder`); the pids it found."""
        pids: frozenset[int] = frozenset()
        if self._spawned is not None:
            spawned, self._spawned = self._spawned, None
            pids = await spawned.terminate(self._name, grace)
        if self._launcher is not None:
            await self._launcher.close()
            # This actor's cgroups held its one worker; the lease's folder stays (a restart reuses it).
            await asyncio.to_thread(self._launcher.isolation.cgroups.close)
        return sorted(pids)

    async def kill(self) -> None:
        await self.terminate(0.0)


class NodeAgent:
    """The body of one small actor per node (no CPU, no GPU of its own): it
    reports how the node isolates workers, reads the node's GPUs (NVML) or
    its workers' processes for the head, and removes a lease's session
    folder when the lease ends."""

    def __init__(self) -> None:
        from ..gpus.readings import NodeReader

        self._reader = NodeReader()

    def report(self, config: IsolationConfig) -> NodeReport:
        """How this node would isolate workers for a head isolating as ``config``
        says, and whether those workers could read Ray's token (see :mod:`.ray_fence`)."""
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        isolation = Isolation(config, node_data_dir() / "node")
        mode = isolation.choose_mode()
        exposed = None
        if mode is IsolationMode.UIDS:  # other uids meet the file's permissions (a sandbox hides it)
            exposed = next(filter(None, map(token_exposure, token_files())), None)
        return NodeReport(mode.value, isolation.reason, os.geteuid(),
                          is_token_auth_enabled(), exposed)

    def read(self, requests: list[tuple[str, int, list[int]]], shares: int) -> dict[str, Any]:
        return self._reader.read(requests, shares)

    def holders(self, requests: list[tuple[str, int, list[int]]]) -> dict[str, Any]:
        """Which of a stopped worker's pids still hold each slot (see :mod:`.drain`)."""
        return self._reader.holders(requests)

    def release(self, folder: str) -> None:
        """Remove a session folder of this node's (nothing outside the session root)."""
        root = (node_data_dir() / "sessions").resolve()
        path = Path(folder)
        if path.parent.resolve() == root and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def node_data_dir() -> Path:
    """Where a node keeps its files (session folders, the memory cgroups' notes)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("remote-gpu-kernel"))
