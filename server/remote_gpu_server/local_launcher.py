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

How a worker is confined (its command, environment, memory limit, and the
identity it takes on at lease time) comes from the launcher's
:class:`~.isolation.Isolation`; each worker has a runtime folder of its own
(connection file, sockets, mode 0700) and its stdout and stderr on a pipe
the server reads into its log (:mod:`.worker_output`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from . import transfer
from .confinement import EnterSpec
from .datachannel import DataChannel
from .isolation import Isolation, Tenant, WorkerIsolation
from .launcher import WorkerSpec
from .slots import cuda_visible_devices
from .worker_output import WorkerOutput

__all__ = ["LocalLauncher", "LocalWorker", "Spawned"]

log = logging.getLogger("remote_gpu_server")


#: The worker's command line, before its isolation wraps it.
WORKER_ARGV = [sys.executable, "-m", "remote_gpu_server.worker_kernel", "-f", "{connection_file}",
               # Each worker's history stays in it: a shared file would show every
               # user's code to the next (the Remote GPU kernel keeps its own).
               "--HistoryManager.hist_file=:memory:"]


class _SpecManager(KernelSpecManager):  # type: ignore[misc]
    """Hands jupyter_client the worker's command line."""

    def __init__(self, argv: list[str], interrupt_mode: str) -> None:
        super().__init__()
        self.argv = argv
        self.interrupt_mode = interrupt_mode

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=self.argv, display_name="remote-gpu worker", language="python",
                          interrupt_mode=self.interrupt_mode)


@dataclasses.dataclass
class Spawned:
    """A started worker process, where its data channel is, and how it is confined."""

    km: AsyncKernelManager
    data_address: str
    #: The shared ring (ipc), or None: pieces travel inside the notes (tcp).
    ring: transfer.Ring | None
    #: The data channel's CurveZMQ public key (tcp).
    data_public: bytes | None
    isolation: WorkerIsolation
    output: WorkerOutput
    #: Why it ended where its isolation knows better than its return code.
    death_cause: str | None = None

    async def poll(self) -> int | None:
        provisioner = self.km.provisioner
        code: int | None = await provisioner.poll() if provisioner is not None else 0
        if code is not None and self.death_cause is None:
            self.death_cause = self.isolation.explain(code)
        return code

    async def interrupt(self) -> None:
        """SIGINT to its process group, or an interrupt message where a sandbox hides it."""
        if self.km.provisioner is not None:
            await self.km.interrupt_kernel()

    async def close(self, name: str) -> None:
        """Kill it and everything it left (its cgroup); remove its runtime folder."""
        await shutdown(self.km, name)
        await asyncio.to_thread(self.isolation.close)
        await self.output.close()

    def channel(self) -> DataChannel:
        """The server's end of the data channel, connected."""
        slots: transfer.Slots = self.ring if self.ring is not None else transfer.Inline()
        return DataChannel(self.data_address, slots, self.data_public)


class LocalWorker:
    """A :class:`~.launcher.WorkerProcess` on this host."""

    remote = False

    def __init__(self, name: str, spawned: Spawned) -> None:
        self.name = name
        self.node = socket.gethostname()
        self.data = spawned.channel()
        self._spawned = spawned
        self._km = spawned.km
        self._killed = False
        self.connection_info: dict[str, Any] = dict(spawned.km.get_connection_info())

    @property
    def pid(self) -> int | None:
        process = getattr(self._km.provisioner, "process", None)
        return process.pid if process is not None else None

    @property
    def death_cause(self) -> str | None:
        return self._spawned.death_cause

    @property
    def tenant(self) -> Tenant | None:
        return self._spawned.isolation.tenant

    def enter_spec(self, user: str) -> EnterSpec | None:
        return self._spawned.isolation.enter_spec(user)

    def adopt(self, tenant: Tenant) -> bool:
        """Serve a lease that has its session folder already (see WorkerIsolation.adopt)."""
        return self._spawned.isolation.adopt(tenant)

    async def poll(self) -> int | None:
        return await self._spawned.poll()

    async def signal(self, signum: int) -> None:
        if self._killed or self._km.provisioner is None:
            return
        if signum == signal.SIGINT:
            await self._spawned.interrupt()
        else:
            await self._km.signal_kernel(signum)

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        self.data.close()
        await self._spawned.close(self.name)


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

    ``isolation`` confines them (default: not at all, as the server's user).
    ``transport`` is ``ipc`` or ``tcp`` (on address ``ip``), as the module
    docstring says.
    """

    def __init__(self, isolation: Isolation | None = None, *, transport: str = "ipc",
                 ip: str = "127.0.0.1") -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be ipc or tcp, not {transport!r}")
        self.isolation = isolation or Isolation.unconfined()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="rgpu-"))  # mode 0700
        self.transport = transport
        self.ip = ip

    async def spawn(self, spec: WorkerSpec, cuda_devices: str | None = None) -> Spawned:
        """Start the process; ``cuda_devices`` (default: from its slots) becomes
        its ``CUDA_VISIBLE_DEVICES``."""
        runtime = self.runtime_dir / spec.name
        runtime.mkdir(mode=0o700)
        confined = self.isolation.prepare(spec.name, len(spec.slots), runtime, spec.tenant)
        extra = {
            "CUDA_VISIBLE_DEVICES": (cuda_visible_devices(list(spec.slots)) if cuda_devices is None
                                     else cuda_devices),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "RGPU_SLOTS": ",".join(s.id for s in spec.slots),
        }
        if not confined.own_pid_namespace:  # a sandbox's init kills it with the server already
            extra["RGPU_PARENT_PID"] = str(os.getpid())  # the worker dies with this process
        km = AsyncKernelManager(kernel_name="rgpu-worker", kernel_spec_manager=_SpecManager(
            confined.command(list(WORKER_ARGV)), confined.interrupt_mode))
        km.connection_file = str(runtime / "kernel.json")
        output = WorkerOutput(spec.name)
        options: dict[str, Any] = dict(stdout=output.fd, stderr=output.fd, **confined.popen_options)
        ring: transfer.Ring | None = None
        data_public: bytes | None = None
        try:
            if self.transport == "tcp":
                km.transport, km.ip = "tcp", self.ip
                # jupyter_client puts the key pair in the connection file: the
                # kernel serves every channel with it and clients encrypt with it.
                km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
                data_public, data_secret = zmq.curve_keypair()
                data_addr = f"tcp://{self.ip}:{_free_port(self.ip)}"
                extra.update(RGPU_DATA_ADDR=data_addr, RGPU_DATA_CURVE_SECRET=data_secret.decode())
                await _start(km, env=confined.environment(extra), **options)
            else:
                km.transport, km.ip = "ipc", str(runtime / "kernel")
                data_addr = f"ipc://{runtime / 'data'}"
                ring_fd = transfer.create_ring()
                extra.update(RGPU_DATA_ADDR=data_addr, RGPU_DATA_RING_FD=str(ring_fd))
                try:
                    ring = transfer.Ring(ring_fd)
                    await _start(km, env=confined.environment(extra), pass_fds=(ring_fd,), **options)
                finally:
                    os.close(ring_fd)  # the worker has its own copy; the mapping stays
        except BaseException:
            await asyncio.to_thread(confined.close)
            await output.close()
            raise
        output.started()  # the worker has the pipe's writing end now; read its output
        return Spawned(km, data_addr, ring, data_public, confined, output)

    async def launch(self, spec: WorkerSpec) -> LocalWorker:
        return LocalWorker(spec.name, await self.spawn(spec))

    def release(self, tenant: Tenant | None) -> None:
        """A lease ended: its session folder goes."""
        self.isolation.release(tenant)

    async def close(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
