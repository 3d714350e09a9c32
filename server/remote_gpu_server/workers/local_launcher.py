"""Workers on this host: real ipykernel processes started through jupyter_client.

Each worker is started by jupyter_client's ``AsyncKernelManager`` (its
local provisioner: own process group, connection file), pinned with
``CUDA_VISIBLE_DEVICES`` and, isolated, fenced by the device files it is
given (only its GPUs', see :mod:`.devices`). Two transports:

* ``ipc`` (the default, for a server and its workers on one host): ``ipc://``
  sockets in the launcher's private runtime folder (mode 0700) for the
  Jupyter channels, and for the data channel (:mod:`.transfer`) a socket
  pair and a sealed shared-memory ring, both passed by file descriptor;
* ``tcp`` (for a worker that a server on another host talks to, as a Ray
  node's host actor starts it): TCP sockets on ``ip``, every Jupyter
  channel encrypted with CurveZMQ under a key pair made for this worker
  (refused where jupyter_client or ipykernel is too old to, see :func:`curve_problem`),
  and the data channel opened with mutual TLS, with keys made for it on
  both ends, then sealed (:mod:`.sealed`); pieces travel inside the data channel's notes.

How a worker is confined (its command, environment, memory limit, and the
identity it takes on at lease time) comes from the launcher's
:class:`~.isolation.Isolation`; each worker has a runtime folder of its own
(connection file, sockets, mode 0700) and its stdout and stderr on a pipe
the server reads into its log (:mod:`.worker_output`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from packaging.version import Version

from ..processes import ladder
from . import death
from ..worker_process import transfer
from ..worker_process.confinement import EnterSpec
from .datachannel import DataChannel
from ..environments import Environments, WorkerCode
from ..errors import IsolationError
from ..isolation.policy import Isolation
from ..isolation.tenant import Tenant
from ..isolation.worker_isolation import WorkerIsolation
from .launcher import WorkerSpec
from ..worker_process.sealed import pinned_context
from .carriers import make_identity
from ..gpus.slots import cuda_visible_devices
from .output import WorkerOutput

__all__ = ["CURVE_SINCE", "LocalLauncher", "LocalWorker", "Spawned", "curve_problem"]

log = logging.getLogger("remote_gpu_server")

#: The first releases that encrypt a kernel's channels with the CurveZMQ keys
#: of its connection file; older ones ignore the keys and run in clear.
CURVE_SINCE = {"jupyter_client": Version("8.9"), "ipykernel": Version("7.3")}


def curve_problem(versions: dict[str, str] | None = None) -> str | None:
    """Why the Jupyter channels of a ``tcp`` worker would cross the network in
    clear with these releases (default: those installed), or None."""
    if versions is None:
        versions = {name: importlib.metadata.version(name) for name in CURVE_SINCE}
    old = [f"{name} {versions[name]}" for name, since in CURVE_SINCE.items() if Version(versions[name]) < since]
    if not old:
        return None
    return (f"{' and '.join(old)} would run a worker's Jupyter channels in clear across hosts: "
            "they need jupyter_client 8.9 and ipykernel 7.3 or later (pip install -U jupyter_client ipykernel)")


#: The worker's command line, before its isolation wraps it.
WORKER_ARGV = [sys.executable, "-m", "remote_gpu_server.worker_process.kernel", "-f", "{connection_file}",
               # Each worker's history stays in it: a shared file would show every
               # user's code to the next (the Remote GPU kernel keeps its own).
               "--HistoryManager.hist_file=:memory:"]


class _SpecManager(KernelSpecManager):
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
    #: ``fd://N`` (ipc: the worker's end of the socket pair) or ``tls://HOST:PORT`` (tcp).
    data_address: str
    #: The shared ring (ipc), or None: pieces travel inside the notes (tcp).
    ring: transfer.Ring | None
    #: The worker's data-channel certificate (PEM), which the server pins (tcp).
    data_cert: bytes | None
    isolation: WorkerIsolation
    output: WorkerOutput
    #: The value of :data:`.ladder.MARK_VAR` its processes carry.
    mark: str = ""
    #: Where it writes faulthandler's report of a fatal signal (see :mod:`.death`).
    fault_file: Path | None = None
    #: Why it ended where its isolation knows better than its return code.
    death_cause: str | None = None
    #: What faulthandler wrote when it died of a fatal signal, else None.
    fault_report: str | None = None
    #: The host's OOM kill count when it started (see :func:`.death.host_oom_kills`).
    oom_kills_at_start: int | None = None
    #: The server's end of the socket pair of the data channel (ipc).
    data_socket: socket.socket | None = None
    #: The pids the stop ladder found, once it ran.
    stopped_pids: frozenset[int] | None = None
    #: The namespaces it has of its own (see :func:`.ladder.own_namespaces`), once noted.
    namespaces: frozenset[tuple[str, int]] | None = None

    @property
    def pid(self) -> int | None:
        process = getattr(self.km.provisioner, "process", None)
        return process.pid if process is not None else None

    async def poll(self) -> int | None:
        provisioner = self.km.provisioner
        code: int | None = await provisioner.poll() if provisioner is not None else 0
        if code is not None and self.death_cause is None and self.stopped_pids is None:
            self.death_cause = self.isolation.explain(code) or death.host_oom(code, self.oom_kills_at_start)
            if self.fault_file is not None:
                self.fault_report = death.read_report(self.fault_file)
        return code

    async def interrupt(self) -> None:
        """SIGINT to its process group, or an interrupt message where a sandbox hides it."""
        if self.km.provisioner is not None:
            await self.km.interrupt_kernel()

    def note_namespaces(self) -> None:
        """Note the namespaces it made for itself; call once it is confined (at lease
        time), while it runs: the ladder finds its processes by them even after it died."""
        if self.namespaces is None and self.pid is not None:
            found = ladder.own_namespaces(self.pid)
            if found:
                self.namespaces = found

    def scope(self) -> ladder.Scope:
        """Where its processes are, for the stop ladder."""
        uids = {os.geteuid()}
        tenant = self.isolation.tenant
        if tenant is not None and tenant.identity is not None:
            uids.add(tenant.identity.uid)
        # A sandbox's processes end with its pid namespace; elsewhere its namespaces
        # and its mark find what no cgroup holds (a cgroup holds everything).
        folders = self.isolation.cgroup.folders
        if folders or self.isolation.own_pid_namespace:
            return ladder.Scope(self.pid, folders, uids=frozenset(uids))
        self.note_namespaces()
        return ladder.Scope(self.pid, mark=self.mark, uids=frozenset(uids),
                            namespaces=self.namespaces or frozenset())

    async def halt(self, name: str, cause: str) -> None:
        """SIGKILL to every process of it now; its death says ``cause`` (what the server
        stopped it for). Its end is then noticed as any death is, and :meth:`terminate`
        cleans up."""
        if self.stopped_pids is None and self.death_cause is None:
            self.death_cause = cause
            await asyncio.to_thread(ladder.stop, self.scope(), 0.0, name=name)

    async def terminate(self, name: str, grace: float) -> frozenset[int]:
        """The stop ladder (:func:`.ladder.stop`), then :meth:`close`; returns the pids found."""
        if self.stopped_pids is None:
            self.stopped_pids = frozenset()  # from now on its end is no death to explain
            try:
                self.stopped_pids = await asyncio.to_thread(ladder.stop, self.scope(), grace, name=name)
            finally:
                await self.close(name)
        return self.stopped_pids

    async def close(self, name: str) -> None:
        """Kill it and everything it left (its cgroup); remove its runtime folder."""
        await shutdown(self.km, name)
        await asyncio.to_thread(self.isolation.close)
        await self.output.close()

    def channel(self, client: tuple[bytes, bytes] | None = None) -> DataChannel:
        """The server's end of the data channel; ``client``: the server's own key and
        certificate for a ``tls://`` channel (it pins the worker's)."""
        if self.ring is not None:
            assert self.data_socket is not None
            return DataChannel.over(self.data_socket, self.ring)
        assert client is not None and self.data_cert is not None
        return DataChannel.connect(self.data_address, transfer.Inline(),
                                   pinned_context(False, *client, self.data_cert))


class LocalWorker:
    """A :class:`~.launcher.WorkerProcess` on this host."""

    remote = False

    def __init__(self, name: str, spawned: Spawned, data: DataChannel | None = None) -> None:
        self.name = name
        self.node = socket.gethostname()
        self.data = data or spawned.channel()
        self._spawned = spawned
        self._km = spawned.km
        self._killed = False
        self.connection_info: dict[str, Any] = dict(spawned.km.get_connection_info())

    @property
    def pid(self) -> int | None:
        return self._spawned.pid

    @property
    def death_cause(self) -> str | None:
        return self._spawned.death_cause

    @property
    def fault_report(self) -> str | None:
        return self._spawned.fault_report

    @property
    def tenant(self) -> Tenant | None:
        return self._spawned.isolation.tenant

    def enter_spec(self, user: str) -> EnterSpec | None | Awaitable[EnterSpec | None]:
        self._spawned.note_namespaces()
        isolation = self._spawned.isolation
        if isolation.binds_site:
            return self._enter_spec_binding_site(user)
        if isolation.tenant is None and not isolation.isolation.disks.ready(user):
            return self._enter_spec_on_disk(user)
        return isolation.enter_spec(user)

    async def _enter_spec_binding_site(self, user: str) -> EnterSpec | None:
        """:meth:`enter_spec` of a sandbox, once its user's site is bound in it (in a thread)."""
        spec = self._spawned.isolation.enter_spec(user)
        await asyncio.to_thread(self._spawned.isolation.bind_site, self._spawned.pid)
        return spec

    async def _enter_spec_on_disk(self, user: str) -> EnterSpec | None:
        """:meth:`enter_spec` once ``user``'s disk is mounted (a user's first lease:
        the filesystem is made and mounted in a thread, not on the event loop)."""
        disks = self._spawned.isolation.isolation.disks
        try:
            await asyncio.to_thread(disks.attach, user)
        except OSError as exc:
            raise IsolationError(f"{user}'s disk for session folders could not be made ready: {exc}") from None
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

    async def terminate(self, grace: float) -> frozenset[int]:
        if not self._killed:
            self._killed = True
            self.data.close()
        return await self._spawned.terminate(self.name, grace)

    async def kill(self) -> None:
        await self.terminate(0.0)

    async def halt(self, cause: str) -> None:
        """Stop it at once for ``cause``, which its death then gives (see :mod:`.gpu_fence`)."""
        if not self._killed:
            await self._spawned.halt(self.name, cause)

    @property
    def scope(self) -> ladder.Scope:
        """Where its processes are (see :mod:`.owners`)."""
        return self._spawned.scope()


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
                 ip: str = "127.0.0.1", environments: Environments | None = None) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be ipc or tcp, not {transport!r}")
        problem = curve_problem() if transport == "tcp" else None
        if problem is not None:
            raise RuntimeError(problem)
        self.isolation = isolation or Isolation.unconfined()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="rgpu-"))  # mode 0700
        self.transport = transport
        self.ip = ip
        self._client: tuple[bytes, bytes] | None = None  # this server's data-channel key (tcp)
        #: The interpreters workers run (``WorkerSpec.environment`` names one).
        self.environments = environments or Environments.only_default()
        # The worker's own code, for environments that do not have it (made at the first need).
        self._code: WorkerCode | None = None

    def _interpreter(self, name: str) -> tuple[list[str], dict[str, str], tuple[Path, ...] | None]:
        """The worker's command line, its environment variables and the folders its
        Python reads code from (None: the server's own) in environment ``name``."""
        if name not in self.environments:  # a parked session or a job from a run that had it
            raise ValueError(f"environment {name!r} is not configured on this server; it has: "
                             f"{', '.join(self.environments.names)} (rgpu serve --env NAME=PYTHON)")
        environment = self.environments[name]
        if environment.own:
            return list(WORKER_ARGV), {}, None
        if self._code is None:
            self._code = WorkerCode()
        code = self._code.folder
        path = os.pathsep.join([str(environment.bin), os.environ.get("PATH", os.defpath)])
        extra = {"PYTHONPATH": str(code), "PATH": path}
        # The environment's own marker, not the server's (a conda environment has conda-meta).
        marker = "CONDA_PREFIX" if os.path.isdir(os.path.join(environment.prefix, "conda-meta")) else "VIRTUAL_ENV"
        extra[marker] = environment.prefix
        return [environment.python, *WORKER_ARGV[1:]], extra, (*environment.paths, code)

    async def spawn(self, spec: WorkerSpec, cuda_devices: str | None = None,
                    server_cert: bytes | None = None) -> Spawned:
        """Start the process; ``cuda_devices`` (default: from its slots) becomes
        its ``CUDA_VISIBLE_DEVICES`` (each GPU by its UUID where it is fenced);
        ``server_cert`` (tcp): the certificate of the server that will reach its
        data channel."""
        runtime = self.runtime_dir / spec.name
        runtime.mkdir(mode=0o700)
        mark = f"{spec.name}.{secrets.token_hex(8)}"  # unique on this host, across servers
        cuda = cuda_visible_devices(list(spec.slots)) if cuda_devices is None else cuda_devices
        # Isolated, it can open the device files of these GPUs and no others.
        argv, interpreter_env, code_paths = self._interpreter(spec.environment)
        confined = self.isolation.prepare(spec.name, len(spec.slots), runtime, spec.tenant, gpus=cuda,
                                          environment=spec.environment, code_paths=code_paths)
        extra = {
            **interpreter_env,
            "CUDA_VISIBLE_DEVICES": confined.cuda_visible_devices,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "RGPU_SLOTS": ",".join(s.id for s in spec.slots),
            # Its processes carry this mark, so the stop ladder finds them even
            # where they left its process tree and no cgroup holds them.
            ladder.MARK_VAR: mark,
            death.FAULT_VAR: str(runtime / death.FAULT_FILE),
        }
        if not confined.own_pid_namespace:  # a sandbox's init kills it with the server already
            extra["RGPU_PARENT_PID"] = str(os.getpid())  # the worker dies with this process
        km = AsyncKernelManager(kernel_name="rgpu-worker", kernel_spec_manager=_SpecManager(
            confined.command(argv), confined.interrupt_mode))
        km.connection_file = str(runtime / "kernel.json")
        output = WorkerOutput(spec.name)
        options: dict[str, Any] = dict(stdout=output.fd, stderr=output.fd, **confined.popen_options)
        ring: transfer.Ring | None = None
        data_cert: bytes | None = None
        data_socket: socket.socket | None = None
        try:
            if self.transport == "tcp":
                km.transport, km.ip = "tcp", self.ip
                # jupyter_client puts the key pair in the connection file: the
                # kernel serves every channel with it and clients encrypt with it.
                km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
                # The data channel's TLS key is made here, on the worker's node.
                data_key, data_cert = make_identity("server")
                data_addr = f"tls://{self.ip}:{_free_port(self.ip)}"
                assert server_cert is not None, "a tcp worker needs the certificate of its server"
                extra.update(RGPU_DATA_ADDR=data_addr, RGPU_DATA_TLS_KEY=data_key.decode(),
                             RGPU_DATA_TLS_CERT=data_cert.decode(), RGPU_DATA_TLS_PEER=server_cert.decode())
                await _start(km, env=confined.environment(extra), **options)
            else:
                km.transport, km.ip = "ipc", str(runtime / "kernel")
                # The data channel: a socket pair, so nobody else can connect to it.
                data_socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                data_addr = f"fd://{theirs.fileno()}"
                ring_fd = transfer.create_ring()
                extra.update(RGPU_DATA_ADDR=data_addr, RGPU_DATA_RING_FD=str(ring_fd))
                try:
                    ring = transfer.Ring(ring_fd)
                    await _start(km, env=confined.environment(extra), pass_fds=(ring_fd, theirs.fileno()),
                                 **options)
                finally:
                    os.close(ring_fd)  # the worker has its own copies; the mapping stays
                    theirs.close()
        except BaseException:
            if data_socket is not None:
                data_socket.close()
            await asyncio.to_thread(confined.close)
            await output.close()
            raise
        output.started()  # the worker has the pipe's writing end now; read its output
        return Spawned(km, data_addr, ring, data_cert, confined, output, mark=mark, data_socket=data_socket,
                       fault_file=runtime / death.FAULT_FILE, oom_kills_at_start=death.host_oom_kills())

    async def launch(self, spec: WorkerSpec) -> LocalWorker:
        if self.transport == "tcp":
            client = self._client or make_identity("client")
            self._client = client
            spawned = await self.spawn(spec, server_cert=client[1])
            return LocalWorker(spec.name, spawned, spawned.channel(client))
        return LocalWorker(spec.name, await self.spawn(spec))

    def release(self, tenant: Tenant | None) -> None:
        """A lease ended: its session folder goes."""
        self.isolation.release(tenant)

    async def close(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._code is not None:
            self._code.close()
