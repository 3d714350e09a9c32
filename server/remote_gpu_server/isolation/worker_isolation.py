"""One worker's isolation: what it starts with, what it takes on at lease
time, what its death means, and its cleanup.

:meth:`.policy.Isolation.prepare` makes a :class:`WorkerIsolation` for each
worker from the server's policy (the mode, the limits, the users' disks);
it is all a launcher needs: the command, environment and process options to
start the worker with, the :class:`~..worker_process.confinement.EnterSpec`
to send it at lease time, what a death means, and a cleanup.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from remote_gpu_core.sizes import format_size

from ..errors import IsolationError
from ..worker_process.confinement import ENV_VAR, IOPUB_DIR_VAR, PRIVATE_TMP, EnterSpec, SpawnSpec
from ..worker_process.user_namespaces import SUPPORTED as USERNS_FILTER_MACHINES
from .cgroups import WorkerCgroup
from .devices import DeviceFile, DeviceTree
from .folder_removal import FolderRemover
from .identities import Identity
from .memory_limits import WorkerMemory
from .modes import IsolationMode
from .process_limits import WorkerProcesses
from .sandbox import SandboxLayout, bubblewrap_argv, python_paths
from .site_binder import SITE, STASH, SiteBinder, sandbox_pid
from .tenant import Tenant
from .user_disks import DiskMode, UserDisks
from .user_sites import DEFAULT_ENVIRONMENT, UserSites

__all__ = ["DISK_VAR", "ServerIsolation", "WorkerIsolation", "can_refuse_user_namespaces", "device_groups"]

#: Where IPython keeps its profile and history: in the worker's private /tmp.
_IPYTHONDIR = "/tmp/.ipython"
#: The environment variable that tells a worker its user's disk limit, for its
#: "disk full" hint (see :mod:`..worker_process.files`).
DISK_VAR = "RGPU_SESSION_DISK"


def device_groups(files: Iterable[DeviceFile]) -> tuple[int, ...]:
    """Groups that give access to a worker's device files where others have none.

    Drivers installed with ``NVreg_DeviceFileMode=0660`` leave ``/dev/nvidia*``
    to a group (often ``video``): workers join it, so CUDA works for them
    as for the host's users.
    """
    gids = set()
    for device in (f.source for f in files):
        try:
            mode, gid = os.stat(device).st_mode, os.stat(device).st_gid
        except OSError:
            continue
        if not mode & 0o006 and mode & 0o060 and gid != 0:
            gids.add(gid)
    return tuple(sorted(gids))


def can_refuse_user_namespaces() -> bool:
    """Whether a root server's workers can be refused new user namespaces here
    (a seccomp filter for this machine; see :mod:`..worker_process.user_namespaces`)."""
    return platform.machine() in USERNS_FILTER_MACHINES


class ServerIsolation(Protocol):
    """What a worker's isolation uses of the server's (:class:`~.policy.Isolation`)."""

    @property
    def mode(self) -> IsolationMode: ...

    @property
    def bwrap(self) -> str | None:
        """``bwrap``'s path, where workers start in bubblewrap sandboxes."""

    @property
    def session_root(self) -> Path: ...

    @property
    def devices(self) -> DeviceTree: ...

    @property
    def disks(self) -> UserDisks: ...

    @property
    def remover(self) -> FolderRemover: ...

    @property
    def sites(self) -> UserSites: ...

    @property
    def site_binding(self) -> bool:
        """Users' sites are bound into sandboxes at lease time (see :mod:`.site_binder`)."""

    @property
    def binder(self) -> SiteBinder: ...

    def server_files(self) -> tuple[Path, ...]: ...

    def environment(self, extra: dict[str, str]) -> dict[str, str]: ...

    def new_folder(self, owner: Identity | None, user: str | None = None) -> Path: ...

    def tenant(self, user: str, folder: Path | None = None, identity: Identity | None = None) -> Tenant: ...


class WorkerIsolation:
    """One worker's side of :class:`~.policy.Isolation`; made by its :meth:`~.policy.Isolation.prepare`.

    Use :meth:`command`, :meth:`environment` and :attr:`popen_options` to start
    the worker, :meth:`enter_spec` at lease time (send what it returns, if
    anything, before any user request), :meth:`explain` when it dies, and
    :meth:`close` once it is dead.
    """

    def __init__(self, isolation: ServerIsolation, name: str, runtime: Path, cgroup: WorkerCgroup,
                 memory: WorkerMemory, processes: WorkerProcesses, tenant: Tenant | None,
                 devices: tuple[DeviceFile, ...] = (), cuda_visible_devices: str = "", *,
                 environment: str = DEFAULT_ENVIRONMENT, code_paths: tuple[Path, ...] | None = None) -> None:
        self.isolation = isolation
        self.name = name
        self.runtime = runtime
        #: Its cgroups (none where the server has none): they hold all of its processes.
        self.cgroup = cgroup
        self.memory = memory
        self.processes = processes
        self.tenant = tenant
        self.mode = isolation.mode
        #: The device files it may open (its GPUs' and the control files; see :mod:`.devices`).
        self.devices = devices
        #: Its ``CUDA_VISIBLE_DEVICES``: its GPUs by UUID where they are fenced.
        self.cuda_visible_devices = cuda_visible_devices
        #: The sandbox's session folder (bubblewrap binds it at start).
        self.folder: Path | None = None
        if self.mode is IsolationMode.BUBBLEWRAP:
            self.folder = tenant.folder if tenant is not None else isolation.new_folder(None)
        #: How the server interrupts it: a signal, or a message where the
        #: sandbox's pid namespace keeps the kernel out of the server's reach.
        self.interrupt_mode = "message" if self.mode is IsolationMode.BUBBLEWRAP else "signal"
        #: The environment it runs: its user's site is theirs for it.
        self.environment_name = environment
        #: The folders its Python reads code from, readable and never writable.
        self.code_paths = code_paths
        #: A sandbox's: its user's site, seen from inside before the lease (see :meth:`bind_site`).
        self.site_source: Path | None = None

    @property
    def own_pid_namespace(self) -> bool:
        """The worker runs in a pid namespace of its own (a bubblewrap sandbox)."""
        return self.mode is IsolationMode.BUBBLEWRAP

    def _tmp_size(self) -> int | None:
        # The tmpfs pages count as the worker's memory too: half of it for
        # files, so a full /tmp says "No space left" before memory runs out.
        return self.memory.limit // 2 if self.memory.limit is not None else None

    def command(self, argv: list[str]) -> list[str]:
        if self.mode is not IsolationMode.BUBBLEWRAP:
            return list(argv)
        isolation = self.isolation
        assert isolation.bwrap is not None and self.folder is not None
        binding = isolation.site_binding
        layout = SandboxLayout(writable=(self.runtime, self.folder),
                               hidden=(*isolation.server_files(), self.runtime.parent, *self._stand_in_dev()),
                               tmp_size=self._tmp_size(), chdir=self.folder,
                               devices=tuple((f.source, Path("/dev") / f.name) for f in self.devices),
                               binds=((isolation.session_root, STASH),) if binding else (),
                               dirs=(SITE,) if binding else (), readable=self._readable())
        return bubblewrap_argv(isolation.bwrap, layout) + list(argv)

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        disks = self.isolation.disks
        # Where the server only measures the users' disks, no one file may outgrow
        # the limit between two of its looks (see user_disks).
        file_limit = disks.limit if disks.mode is DiskMode.SERVER else None
        processes = self.processes
        spec = SpawnSpec(data_limit=self.memory.data_limit, limit_text=self.memory.limit_text,
                         file_limit=file_limit, nproc_limit=processes.nproc, pids_limit=processes.limit,
                         pids_events=str(processes.events) if processes.events is not None else None)
        env = dict(extra)
        if disks.limit is not None and disks.mode is not DiskMode.NONE:
            env[DISK_VAR] = format_size(disks.limit)
        if self.mode is IsolationMode.UIDS:
            expose = [(str(p), False) for p in self._readable()]
            expose += [(str(self.runtime), True), (str(self.isolation.session_root), True)]
            spec = dataclasses.replace(spec, private_tmp=True, tmp_size=self._tmp_size(), expose=tuple(expose),
                                       private_ipc=True, ipc_limit=self.memory.limit,
                                       refuse_user_namespaces=can_refuse_user_namespaces(),
                                       devices=tuple((str(f.source), f.name) for f in self.devices),
                                       cover=tuple(str(p) for p in self._stand_in_dev()))
            env.update(HOME="/tmp", IPYTHONDIR=_IPYTHONDIR)
        elif self.mode is IsolationMode.BUBBLEWRAP:
            assert self.folder is not None
            env.update(HOME=str(self.folder), IPYTHONDIR=_IPYTHONDIR, TMPDIR="/tmp")
        # ipykernel's pipe for forked children's output: in the private /tmp where
        # there is one, else in the worker's runtime folder (see worker_iopub).
        env[IOPUB_DIR_VAR] = "/tmp" if self.mode is not IsolationMode.NONE else str(self.runtime)
        env[ENV_VAR] = spec.to_json()
        return self.isolation.environment(env)

    def _readable(self) -> tuple[Path, ...]:
        return self.code_paths if self.code_paths is not None else tuple(python_paths())

    def _stand_in_dev(self) -> tuple[Path, ...]:
        """A test's stand-in for ``/dev``, which the worker must not reach either."""
        dev = self.isolation.devices.dev
        return () if dev == Path("/dev") else (dev,)

    @property
    def popen_options(self) -> dict[str, Any]:
        """Keyword arguments for Popen (through jupyter_client)."""
        options: dict[str, Any] = {}
        if self.mode is IsolationMode.UIDS:
            options["cwd"] = "/"
        join: Callable[[], None] | None = self.cgroup.join
        if join is not None:
            options["preexec_fn"] = join
        return options

    def enter_spec(self, user: str, identity: Identity | None = None) -> EnterSpec | None:
        """What the worker must take on for ``user``'s lease: its session folder and,
        isolated, its identity; None for a worker leased for no user (a pool of
        its own, in tests). ``identity``: see :meth:`.policy.Isolation.tenant`."""
        if not user:
            if self.mode is IsolationMode.NONE:
                return None
            raise IsolationError(f"worker {self.name} was leased for no user; isolated workers need one")
        if self.tenant is None:
            self.tenant = self.isolation.tenant(user, self.folder, identity)
        elif self.tenant.user != user:
            raise IsolationError(f"worker {self.name} belongs to {self.tenant.user}, not {user}")
        tenant = self.tenant
        if self.mode is IsolationMode.NONE:  # the folders only: it runs as the server's user
            site = self.isolation.sites.folder(user, None, self.environment_name)
            return EnterSpec(cwd=str(tenant.folder), site=str(site))
        env = {"USER": user, "LOGNAME": user, "HOME": str(tenant.folder), "TMPDIR": "/tmp"}
        if tenant.identity is None:  # a sandbox: its user's site is bound in (see bind_site)
            if not self.isolation.site_binding:
                return EnterSpec(cwd=str(tenant.folder), env=tuple(env.items()))
            site = self.isolation.sites.folder(user, None, self.environment_name)
            self.site_source = STASH / site.relative_to(self.isolation.session_root)
            return EnterSpec(cwd=str(tenant.folder), env=tuple(env.items()), site=str(SITE))
        identity = tenant.identity
        if identity.home and os.path.isdir(identity.home):
            env["HOME"] = identity.home
        groups = tuple(sorted(set(identity.groups) | set(device_groups(self.devices))))
        # What the worker wrote in its private tmpfs before the lease (IPython's
        # folder, whatever CUDA's start left there) becomes the user's. Its mount
        # namespace may predate the user's disk: it mounts that first.
        return EnterSpec(cwd=str(tenant.folder), uid=identity.uid, gid=identity.gid, groups=groups,
                         env=tuple(env.items()), chown=PRIVATE_TMP,
                         mount=self.isolation.disks.mount_of(user),
                         site=str(self.isolation.sites.folder(user, identity, self.environment_name)))

    @property
    def binds_site(self) -> bool:
        """:meth:`bind_site` must run after :meth:`enter_spec`, before the spec is sent."""
        return self.mode is IsolationMode.BUBBLEWRAP and self.isolation.site_binding

    def bind_site(self, pid: int | None) -> None:
        """Bind the user's site into the sandbox whose bubblewrap is ``pid``, and
        take every other folder of the session root out of its reach; blocks (call
        in a thread). Raises IsolationError: the worker must not be leased then."""
        if self.site_source is None:
            return
        inside = sandbox_pid(pid) if pid is not None else None
        if inside is None:
            raise IsolationError(f"worker {self.name}: its sandbox is gone; the user's site was not bound")
        try:
            self.isolation.binder.bind(inside, self.site_source)
        except OSError as exc:
            raise IsolationError(f"worker {self.name}: {exc}") from None

    def adopt(self, tenant: Tenant) -> bool:
        """Serve ``tenant``, a lease that already has its session folder (a parked
        session resuming), instead of a new one; False where this started worker
        cannot: a sandbox bound another folder at its start, or it serves a lease."""
        if self.tenant is not None or self.mode is IsolationMode.BUBBLEWRAP:
            return False
        self.tenant = tenant
        return True

    def explain(self, returncode: int | None) -> str | None:
        """Why the worker ended, where isolation knows better than its exit code."""
        return self.memory.explain(returncode) or self.processes.explain(returncode)

    def close(self) -> None:
        """Kill what is left of the worker (its cgroup) and remove its runtime folder."""
        self.cgroup.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        if self.tenant is None and self.folder is not None:  # a sandbox never leased
            self.isolation.remover.remove(self.folder)

