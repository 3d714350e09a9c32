"""How worker processes are started and controlled: the launcher interface.

A :class:`WorkerLauncher` starts one worker process for a
:class:`WorkerSpec` and hands back a :class:`WorkerProcess`: what the
server needs to talk to it (Jupyter connection info, its data channel) and
to control it (poll, signal, kill), the way jupyter_client's
``KernelProvisionerBase`` separates process control from messaging. The
pool asks a launcher for workers and never builds a process itself.

Two launchers exist: :class:`~.local_launcher.LocalLauncher` (this host:
``ipc://`` sockets, a shared-memory ring) and
:class:`~remote_gpu_server.cluster.launcher.RayLauncher` (a Ray actor on any node of a cluster:
TCP: the Jupyter channels encrypted with CurveZMQ, the data channel over mutual TLS).
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Awaitable
from typing import Any, Protocol

from ..worker_process.confinement import EnterSpec
from .datachannel import DataChannel
from ..environments import DEFAULT_ENVIRONMENT
from ..gpus.discovery import Slot
from ..isolation.tenant import Tenant

__all__ = ["WorkerLauncher", "WorkerProcess", "WorkerSpec", "describe_exit"]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """A worker to start: its name (unique in the server) and the slots it is pinned to."""

    name: str
    slots: tuple[Slot, ...]
    startup_timeout: float = 120.0
    #: The lease it continues (its user and session folder) when it replaces
    #: a worker of that lease; None for a warm worker.
    tenant: Tenant | None = None
    #: The environment it runs in (see :mod:`..environments`).
    environment: str = DEFAULT_ENVIRONMENT


class WorkerProcess(Protocol):
    """One started worker process, as its launcher controls it.

    Every method is safe to call after the process ended; :meth:`kill` is
    safe to call twice. What it tells is read-only to its users: a launcher's
    process keeps each as an attribute or a property of its own.
    """

    @property
    def name(self) -> str:
        """Its name, unique in the server (the spec's)."""

    @property
    def node(self) -> str:
        """Where it runs: this host's name, or the cluster node's."""

    @property
    def connection_info(self) -> dict[str, Any]:
        """Jupyter connection info (transport, ip, ports, key, signature_scheme,
        and CurveZMQ keys where its sockets are encrypted)."""

    @property
    def data(self) -> DataChannel:
        """The server's end of its data channel."""

    @property
    def remote(self) -> bool:
        """Whether it runs on another host than the server's."""

    @property
    def death_cause(self) -> str | None:
        """Why it ended when its return code does not say it all (its node went
        away, out of host memory), else None."""

    @property
    def fault_report(self) -> str | None:
        """What faulthandler wrote when it died of a fatal signal (see :mod:`.death`), else None."""

    @property
    def pid(self) -> int | None:
        """Its process id on its node, when known."""

    async def poll(self) -> int | None:
        """None while it runs, else its return code (negative: killed by that signal)."""

    async def signal(self, signum: int) -> None:
        """Send ``signum`` to it (SIGINT interrupts the running cell)."""

    async def terminate(self, grace: float) -> frozenset[int]:
        """The stop ladder, on its node: SIGTERM to every process it started (its
        whole tree, its cgroup, what carries its mark; see :mod:`.ladder`), SIGKILL
        to what is left after ``grace`` seconds; then release what it held (files,
        sockets). Returns the pids found, as its node numbers them; a second call
        returns the first's."""

    async def kill(self) -> None:
        """:meth:`terminate` with no grace."""

    @property
    def tenant(self) -> Tenant | None:
        """The lease it serves (user, session folder), once it entered one."""

    def enter_spec(self, user: str) -> EnterSpec | None | Awaitable[EnterSpec | None]:
        """What it must take on for ``user``'s lease (identity, session folder), sent
        before any of their requests; None if nothing (may be awaitable: asked of a
        remote node). Raises IsolationError."""


class WorkerLauncher(Protocol):
    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        """Start a worker; raises an exception saying why it could not."""

    def release(self, tenant: Tenant | None) -> None:
        """A lease ended: what it kept across its workers (its session folder) goes."""

    async def close(self) -> None:
        """Stop what the launcher itself runs (not the workers: the pool kills those)."""


def describe_exit(returncode: int | None) -> str:
    """'exit code 3' or 'signal SIGSEGV' for a process's return code."""
    if returncode is None:
        return "an unknown cause"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
