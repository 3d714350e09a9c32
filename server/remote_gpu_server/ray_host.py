"""What runs on a Ray node for one worker: the host actor.

:class:`WorkerHost` is the body of a Ray actor that the head creates with
``num_gpus`` equal to the lease, pinned to one node. Its :meth:`start`
starts the same worker kernel as a single-machine server does, through
:class:`~.local_launcher.LocalLauncher` over TCP on the node's address,
pinned by the ``CUDA_VISIBLE_DEVICES`` that Ray assigned, with every
channel encrypted by CurveZMQ keys made for this worker; it returns what
the head needs to connect. The head polls, signals and kills the worker
through the actor. The actor holds the worker's GPUs in Ray's accounting
for as long as it lives, so Ray never gives them to anyone else.

This module imports Ray only inside the methods that need it: a node needs
the package and Ray, nothing else.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from .launcher import WorkerSpec
from .local_launcher import LocalLauncher, Spawned, shutdown

__all__ = ["WorkerHost"]


class WorkerHost:
    """One worker process on this node; see the module docstring."""

    def __init__(self) -> None:
        self._launcher: LocalLauncher | None = None
        self._spawned: Spawned | None = None
        self._name = ""

    async def start(self, spec: WorkerSpec) -> dict[str, Any]:
        """Start the worker; returns its connection info, data channel and where it runs."""
        import ray

        ip = ray.util.get_node_ip_address()
        self._launcher = LocalLauncher(transport="tcp", ip=ip)
        self._name = spec.name
        cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # as Ray assigned them
        self._spawned = await self._launcher.spawn(spec, cuda_devices=cuda)
        km = self._spawned.km
        process = getattr(km.provisioner, "process", None)
        return {
            "connection_info": dict(km.get_connection_info()),
            "data_address": self._spawned.data_address,
            "data_public": self._spawned.data_public,
            "pid": process.pid if process is not None else None,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": cuda,
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
        }

    async def poll(self) -> int | None:
        if self._spawned is None or self._spawned.km.provisioner is None:
            return 0
        code: int | None = await self._spawned.km.provisioner.poll()
        return code

    async def signal(self, signum: int) -> None:
        if self._spawned is not None and self._spawned.km.provisioner is not None:
            await self._spawned.km.signal_kernel(signum)

    async def kill(self) -> None:
        if self._spawned is not None:
            spawned, self._spawned = self._spawned, None
            await shutdown(spawned.km, self._name)
        if self._launcher is not None:
            await self._launcher.close()

