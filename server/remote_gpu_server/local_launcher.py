"""Workers on this host: real ipykernel processes started through jupyter_client.

Each worker is started by jupyter_client's ``AsyncKernelManager`` (its
local provisioner: own process group, connection file), pinned with
``CUDA_VISIBLE_DEVICES``. Two transports:

* ``ipc`` (the default, for a server and its workers on one host): ``ipc://``
  sockets in the launcher's private runtime folder (mode 0700), and a
  sealed shared-memory ring passed by file descriptor for the data channel
  (:mod:`.transfer`);
* ``tcp`` (for a worker that a server on another host talks to, as a Ray
  node's host actor starts it): TCP sockets on ``ip``, every Jupyter
  channel and the data channel encrypted with CurveZMQ under key pairs
  made for this worker; pieces travel inside the data channel's notes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from . import transfer
from .datachannel import DataChannel
from .launcher import WorkerSpec
from .slots import cuda_visible_devices

__all__ = ["LocalLauncher", "LocalWorker", "Spawned"]

log = logging.getLogger("remote_gpu_server")


class _SpecManager(KernelSpecManager):  # type: ignore[misc]
    """Hands jupyter_client the worker's command line."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "remote_gpu_server.worker_kernel", "-f", "{connection_file}"],
            display_name="remote-gpu worker",
            language="python",
            interrupt_mode="signal",
        )


@dataclasses.dataclass
class Spawned:
    """A started worker process and where its data channel is."""

    km: AsyncKernelManager
    data_address: str
    #: The shared ring (ipc), or None: pieces travel inside the notes (tcp).
    ring: transfer.Ring | None
    #: The data channel's CurveZMQ public key (tcp).
    data_public: bytes | None

    def channel(self) -> DataChannel:
        """The server's end of the data channel, connected."""
        slots: transfer.Slots = self.ring if self.ring is not None else transfer.Inline()
        return DataChannel(self.data_address, slots, self.data_public)


class LocalWorker:
    """A :class:`~.launcher.WorkerProcess` on this host."""

    remote = False
    death_cause = None

    def __init__(self, name: str, km: AsyncKernelManager, data: DataChannel) -> None:
        self.name = name
        self.node = socket.gethostname()
        self.data = data
        self._km = km
        self._killed = False
        self.connection_info: dict[str, Any] = dict(km.get_connection_info())

    @property
    def pid(self) -> int | None:
        process = getattr(self._km.provisioner, "process", None)
        return process.pid if process is not None else None

    async def poll(self) -> int | None:
        provisioner = self._km.provisioner
        if provisioner is None:
            return 0
        code: int | None = await provisioner.poll()
        return code

    async def signal(self, signum: int) -> None:
        if not self._killed and self._km.provisioner is not None:
            await self._km.signal_kernel(signum)

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        self.data.close()
        await shutdown(self._km, self.name)


async def shutdown(km: AsyncKernelManager, name: str) -> None:
    """SIGKILL to the worker's process group; its connection files removed."""
    if not km.has_kernel:
        km.cleanup_resources()
        return
    try:
        await km.shutdown_kernel(now=True)
    except Exception:
        log.exception("worker %s: error during shutdown", name)


async def _start(km: AsyncKernelManager, **kwargs: Any) -> None:
    """``km.start_kernel``; a start given up half way (cancelled, failed) leaves no process."""
    try:
        await km.start_kernel(**kwargs)
    except BaseException:
        await asyncio.shield(shutdown(km, "(starting)"))
        raise


def _free_port(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


class LocalLauncher:
    """Starts workers on this host; call :meth:`close` to remove its runtime folder.

    ``env`` is the workers' base environment (default: this process's).
    ``transport`` is ``ipc`` or ``tcp`` (on address ``ip``), as the module
    docstring says.
    """

    def __init__(self, env: dict[str, str] | None = None, *, transport: str = "ipc",
                 ip: str = "127.0.0.1") -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be ipc or tcp, not {transport!r}")
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="rgpu-"))  # mode 0700
        self.transport = transport
        self.ip = ip
        self._env = env

    async def spawn(self, spec: WorkerSpec, cuda_devices: str | None = None) -> Spawned:
        """Start the process; ``cuda_devices`` (default: from its slots) becomes
        its ``CUDA_VISIBLE_DEVICES``."""
        env = dict(os.environ if self._env is None else self._env)
        env["CUDA_VISIBLE_DEVICES"] = (cuda_visible_devices(list(spec.slots)) if cuda_devices is None
                                       else cuda_devices)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["RGPU_SLOTS"] = ",".join(s.id for s in spec.slots)
        env["RGPU_PARENT_PID"] = str(os.getpid())  # the worker dies with this process
        env.pop("JUPYTER_RUNTIME_DIR", None)
        km = AsyncKernelManager(kernel_name="rgpu-worker", kernel_spec_manager=_SpecManager())
        km.connection_file = str(self.runtime_dir / f"{spec.name}.json")
        if self.transport == "tcp":
            return await self._spawn_tcp(km, env)
        data_addr = f"ipc://{self.runtime_dir / spec.name}-data"
        env["RGPU_DATA_ADDR"] = data_addr
        km.transport = "ipc"
        km.ip = str(self.runtime_dir / spec.name)
        ring_fd = transfer.create_ring()
        env["RGPU_DATA_RING_FD"] = str(ring_fd)
        try:
            ring = transfer.Ring(ring_fd)
            await _start(km, env=env, pass_fds=(ring_fd,))
        finally:
            os.close(ring_fd)  # the worker has its own copy; the mapping stays
        return Spawned(km, data_addr, ring, None)

    async def _spawn_tcp(self, km: AsyncKernelManager, env: dict[str, str]) -> Spawned:
        km.transport = "tcp"
        km.ip = self.ip
        # jupyter_client puts the key pair in the connection file: the kernel
        # serves every channel with it and clients encrypt with it.
        km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
        data_public, data_secret = zmq.curve_keypair()
        data_addr = f"tcp://{self.ip}:{_free_port(self.ip)}"
        env["RGPU_DATA_ADDR"] = data_addr
        env["RGPU_DATA_CURVE_SECRET"] = data_secret.decode()
        await _start(km, env=env)
        return Spawned(km, data_addr, None, data_public)

    async def launch(self, spec: WorkerSpec) -> LocalWorker:
        spawned = await self.spawn(spec)
        return LocalWorker(spec.name, spawned.km, spawned.channel())

    async def close(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
