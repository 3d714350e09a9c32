"""Isolation of workers: who a user's code runs as, and what it can reach.

:class:`Isolation` is the server-wide policy, chosen once at start; each
worker gets a :class:`~.worker_isolation.WorkerIsolation` from
:meth:`Isolation.prepare`, which is all a launcher needs (see
:mod:`.worker_isolation`). The modes (:class:`~.modes.IsolationMode`):

- ``uids`` (the server runs as root): warm workers start as root in mount
  and IPC namespaces of their own (private ``/tmp``, ``/var/tmp``,
  ``/dev/shm``, SysV IPC, and a ``/dev`` with only their own GPUs' device
  files), refused new user namespaces, with no user code in them; at lease
  time the worker, told through its signed channel, moves into a fresh
  session folder and becomes the user's uid (see :mod:`.identities`; a uid
  no other server on the host gives out) before any cell runs. A lease thus
  still takes a started worker: the change costs one round trip.
- ``bubblewrap`` (not root, and ``bwrap`` can make user namespaces): each
  worker starts in a sandbox of its own with its session folder bound in
  and every file of the server's hidden (see :mod:`.sandbox`); at lease
  time it only learns its user's name.
- ``none``: workers run as the server's user, as without this module:
  where neither mode above is possible, or where the admin asked for it
  with ``--no-isolation``. Without that flag such a server serves one user
  only (the first to connect); either way it says that workers are not
  isolated in its log and ``/api/status``. So does a server whose workers
  are isolated but share something that does not keep users apart (a Ray
  cluster without token authentication: :meth:`Isolation.refuse_sharing`).

In every mode a worker's environment comes from an allow-list (like
JupyterHub's ``Spawner.env_keep``) and the server's pip configuration (see
:mod:`.pip_settings`), each user installs packages into a site of their own
(see :mod:`.user_sites`), its output goes to a pipe of its own
(:mod:`.worker_output`), its host memory and its number of processes and
threads are limited, with a cgroup of its own where the server can make one
(see :mod:`.cgroups`, :mod:`.memory_limits`, :mod:`.process_limits`), its
user's session folders share one disk limit (see :mod:`.user_disks`), and it
listens on no network port: its Jupyter sockets are ``ipc://`` paths that
only it and the server reach (ipykernel's IOPub pipe included, see
:mod:`.worker_iopub`) and its data channel a socket pair the server made,
or, for a worker of a Ray node, ports that answer only the keys of its
server. Isolated, a worker can open the device files of the GPUs it was
started for and no others (see :mod:`.devices`): a worker on CPU slots
none at all.

A session folder lives as long as its lease, across worker restarts within
it, and is removed when the lease ends, by a thread of its own (see
:mod:`.folder_removal`); ``/tmp`` is the worker's own. While its session is
parked, a folder is out of its user's reach where users have uids of their
own: it belongs to the server until the session resumes (:meth:`Isolation.seal`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

from remote_gpu_core.sizes import parse_size

from ..errors import IsolationError
from ..worker_process.kernel import PRELOAD_VAR
from .cgroups import Cgroups, WorkerCgroup
from .devices import DeviceTree
from .folder_removal import FolderRemover
from .identities import DEFAULT_UID_RANGE, Identities, Identity, RunAs
from .memory_limits import MIN_WORKER_MEMORY, MemoryLimits, fair_share
from .modes import IsolationMode
from .pip_settings import pip_environment
from .process_limits import NprocCounting, ProcessLimits, nproc_counting, parse_pids
from .sandbox import check_bubblewrap, check_site_binding, find_bubblewrap
from .site_binder import SiteBinder
from .tenant import Tenant
from .uid_registry import default_path as default_uid_registry
from .user_disks import DiskMode, UserDisks
from .user_sites import DEFAULT_ENVIRONMENT, UserSites
from .worker_isolation import WorkerIsolation, can_refuse_user_namespaces

__all__ = ["ENV_KEEP", "Isolation", "IsolationConfig"]

log = logging.getLogger("remote_gpu_server")

#: Server environment variables a worker keeps (names, and prefixes ending in ``_``).
ENV_KEEP = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_ROOT",
            "LANG", "LANGUAGE", "LC_", "TZ", "LD_LIBRARY_PATH", "CUDA_", "NVIDIA_", "NCCL_",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            # Proxies, which a company mirror usually needs (pip's own settings: see pip_settings).
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
            "all_proxy")
#: Never passed, whatever --worker-env says: Ray's token lets its holder run code on every node.
_ENV_NEVER = ("RAY_AUTH_",)
#: Kept too when workers run as the server's own user.
_ENV_KEEP_SAME_USER = ("HOME", "USER", "LOGNAME", "SHELL", "TMPDIR")


@dataclasses.dataclass(frozen=True)
class IsolationConfig:
    """The ``rgpu serve`` flags of this module."""

    #: ``--run-as``: a dynamic uid per user, or their OS account where one exists.
    run_as: RunAs = RunAs.DYNAMIC
    #: ``--no-isolation``: do not isolate workers, and serve every user anyway.
    no_isolation: bool = False
    #: ``--worker-memory``: ``auto`` (a fair share per slot), a size, or ``none``.
    worker_memory: str = "auto"
    #: ``--worker-pids``: processes and threads per slot: ``auto``, a number, or ``none``.
    worker_pids: str = "auto"
    #: ``--session-root``: where session folders go (default: ``sessions`` next to the store).
    session_root: Path | None = None
    #: ``--session-disk``: each user's disk for session folders: ``auto``, a size, or ``none``.
    session_disk: str = "auto"
    #: ``--uid-range``: the dynamic uids.
    uid_range: range = DEFAULT_UID_RANGE
    #: ``--uid-registry``: the host-wide record of the dynamic uids every root
    #: server here gave out (see :mod:`.uid_registry`).
    uid_registry: Path = dataclasses.field(default_factory=default_uid_registry)
    #: ``--worker-env``: more environment variables workers keep.
    worker_env: tuple[str, ...] = ()
    #: Not ``--no-worker-pip-settings``: the server's pip settings reach workers (see :mod:`.pip_settings`).
    worker_pip_settings: bool = True
    #: ``--preload``: modules a worker imports before its lease (None: the
    #: worker's default, torch where it is installed).
    preload: tuple[str, ...] | None = None
    #: The mode to use instead of probing (tests); None probes.
    mode: IsolationMode | None = None
    #: Tests only (``$RGPU_TEST_DEVICE_ROOT``): a folder that stands in for ``/``
    #: where NVIDIA's device files are looked for (see :mod:`.devices`); None: ``/``.
    device_root: Path | None = None


def _keep(name: str, keep: tuple[str, ...]) -> bool:
    return any(name.startswith(k) if k.endswith("_") else name == k for k in keep)


class Isolation:
    """The server's isolation; see the module docstring.

    Call :meth:`start` once the slots are known, :meth:`close` at the end.
    """

    def __init__(self, config: IsolationConfig, db: Path, server_files: tuple[Path, ...] = (), *,
                 nvml: Any | None = None) -> None:
        self.config = config
        self._nvml = nvml  # a test double of pynvml, or None
        #: This host's NVIDIA device files (known once :meth:`start` ran).
        self.devices = DeviceTree(config.device_root or Path("/"))
        self.db = db
        self._server_files = server_files
        self.mode = config.mode or IsolationMode.NONE  # chosen in start() unless given
        self.reason = ""  # why the mode is not a stronger one
        self.session_root = config.session_root or db.parent / "sessions"
        self.cgroups = Cgroups()
        self.memory = MemoryLimits.choose(None, self.cgroups)
        self.processes = ProcessLimits.choose(None, self.cgroups, NprocCounting(None))
        self.identities: Identities | None = None
        self.bwrap: str | None = None
        #: Users' sites are bound into sandboxes at lease time (see :mod:`.site_binder`), by it.
        self.site_binding = False
        self.binder = SiteBinder()
        #: Each user's disk limit (see :mod:`.user_disks`); none until :meth:`start` asks for one.
        self.disks = UserDisks(config.session_disk, self.session_root)
        #: Each user's own packages, per environment (see :mod:`.user_sites`).
        self.sites = UserSites(self.session_root, self.disks)
        #: Deletes the folders of ended leases, off the event loop.
        self.remover = FolderRemover()
        #: What keeps this server to one user although workers are isolated (see refuse_sharing).
        self.unfenced: str | None = None
        self._only_user: str | None = None
        self._tenants: set[Tenant] = set()
        self._parked: set[Tenant] = set()  # forgotten while parked: see forget()
        self._swept: set[Path] = set()

    @classmethod
    def unconfined(cls) -> Isolation:
        """Workers as the server's user, no limits, session folders in a private
        temporary folder: what a bare pool gets."""
        root = Path(tempfile.mkdtemp(prefix="rgpu-sessions-"))
        return cls(IsolationConfig(mode=IsolationMode.NONE, worker_memory="none", worker_pids="none",
                                   session_root=root),
                   Path("rgpu.sqlite3"))

    @property
    def isolated(self) -> bool:
        return self.mode is not IsolationMode.NONE

    def start(self, slots: int, *, server_pid: int | None = None, disks: bool = False) -> None:
        """Choose the mode, the cgroups, the limits and (``disks``: on this server's
        own machine) the users' disk limit; raises IsolationError."""
        try:
            per_slot = (fair_share(slots) if self.config.worker_memory == "auto"
                        else parse_size(self.config.worker_memory, minimum=MIN_WORKER_MEMORY, what="a worker",
                                        allow_none=True))
        except ValueError as exc:
            raise IsolationError(f"--worker-memory: {exc}") from None
        try:
            pids = parse_pids(self.config.worker_pids, slots)
        except ValueError as exc:
            raise IsolationError(f"--worker-pids: {exc}") from None
        self.mode = self.choose_mode()
        wanted = [name for name, limit in (("memory", per_slot), ("pids", pids)) if limit is not None]
        self.cgroups = Cgroups.probe(wanted, pid=server_pid)
        self.memory = MemoryLimits.choose(per_slot, self.cgroups)
        self.processes = ProcessLimits.choose(pids, self.cgroups, nproc_counting(self.mode.value), slots)
        if self.isolated:
            if self.config.device_root is not None:
                log.warning("NVIDIA device files are looked for under %s, not / (a test's stand-in, "
                            "$RGPU_TEST_DEVICE_ROOT)", self.config.device_root)
            self.devices = DeviceTree.probe(self.config.device_root, self._nvml)
            self.devices.make_missing_files()
            if self.devices.gpus:
                log.info("workers see the device files of their own GPUs only (%d GPU(s) here; minor numbers "
                         "from %s)", len(self.devices.gpus), self.devices.source)
        if self.mode is IsolationMode.UIDS:
            os.umask(0o077)  # whatever the server writes from now on is its own
            self._protect_store()
            self.identities = Identities(self.db.with_name(self.db.name + "-uids.json"),
                                         self.config.run_as, self.config.uid_range,
                                         registry=self.config.uid_registry)
        if self.mode is IsolationMode.BUBBLEWRAP and self.bwrap is not None:
            problem = check_site_binding(self.bwrap, self.binder)
            self.site_binding = problem is None
            if problem is not None:
                log.warning("packages users install last one session only: their own site cannot be bound "
                            "into a sandbox here (%s)", problem)
        self._make_session_root()  # every lease has a session folder, isolated or not
        if disks:
            try:
                self.disks.start(filesystems=self.mode is IsolationMode.UIDS)
            except ValueError as exc:
                raise IsolationError(str(exc)) from None
        else:
            self.disks.reason = "the session folders are not on this server's machine"
        self._sweep(self.session_root)
        self._announce()

    def server_files(self) -> tuple[Path, ...]:
        """What no worker may read: the data folder (the store's: the store, its
        journal files, the uid mapping, ``tls/``), the session root, the uid
        registry and every file the server's configuration names (``server_files``
        as given: keys, certificates, ...). A sandbox hides them where they lie
        inside what it binds (see :mod:`.sandbox`); as root, file modes do."""
        db, registry = self.db, self.config.uid_registry
        return (db.parent, *(db.with_name(db.name + s) for s in ("", "-wal", "-shm", "-journal", "-uids.json")),
                self.session_root, registry, registry.with_name(registry.name + ".lock"), *self._server_files)

    def choose_mode(self) -> IsolationMode:
        """The mode :meth:`start` takes: the one given, none for --no-isolation,
        else the strongest this host allows (:attr:`reason` says why not a stronger one)."""
        if self.config.mode is not None:
            return self.config.mode
        if self.config.no_isolation:
            self.reason = "--no-isolation"
            return IsolationMode.NONE
        return self._probe()

    def refuse_sharing(self, problem: str) -> None:
        """Serve one user only although workers are isolated, because something
        they share does not keep users apart (``problem``: what, and what to do);
        ``--no-isolation`` shares the server anyway, knowingly."""
        self.unfenced = problem

    def _make_session_root(self) -> None:
        root = self.session_root
        root.mkdir(parents=True, exist_ok=True)
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise IsolationError(f"the session root {root} must be a folder of the server's own "
                                 "(not a link, not another user's): remove it or choose --session-root")
        # Workers may walk through (to their own folder) but not list it.
        os.chmod(root, 0o711 if self.mode is IsolationMode.UIDS else 0o700)

    def _probe(self) -> IsolationMode:
        if os.geteuid() == 0:
            return IsolationMode.UIDS
        bwrap = find_bubblewrap()
        if bwrap is None:
            self.reason = "not root, and bubblewrap (bwrap) is not installed"
            return IsolationMode.NONE
        problem = check_bubblewrap(bwrap)
        if problem is not None:
            self.reason = f"not root, and {problem}"
            return IsolationMode.NONE
        self.bwrap = bwrap
        return IsolationMode.BUBBLEWRAP

    def _protect_store(self) -> None:
        """The store and its journal files are the server's alone (SQLite gives
        new -wal and -shm files the database's mode)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = self.db.with_name(self.db.name + suffix)
            if path.exists():
                os.chmod(path, 0o600)

    def _sweep(self, folder: Path) -> None:
        """Delete what an earlier run left in ``folder``'s trash (once per folder)."""
        if folder not in self._swept:
            self._swept.add(folder)
            self.remover.sweep(folder)

    def _announce(self) -> None:
        memory = f"{self.memory.describe()}; processes: {self.processes.describe()}"
        if self.disks.mode is not DiskMode.NONE:
            log.info("session folders: %s", self.disks.describe())
        if self.mode is IsolationMode.UIDS:
            log.info("workers are isolated: each user's run as a uid of their own (--run-as %s) with a "
                     "private /tmp and SysV IPC; session folders in %s; memory: %s", self.config.run_as.value,
                     self.session_root, memory)
            if not can_refuse_user_namespaces():
                log.warning("workers may make user namespaces: no seccomp filter for %s", platform.machine())
        elif self.mode is IsolationMode.BUBBLEWRAP:
            log.info("workers are isolated in bubblewrap sandboxes (user, mount and pid namespaces); "
                     "session folders in %s; memory: %s", self.session_root, memory)
        elif self.config.no_isolation:
            log.warning("workers are NOT isolated (--no-isolation): every user's code runs as uid %d, "
                        "like the server, and can read the store, the tokens' users' work and the "
                        "server's files; memory: %s", os.geteuid(), memory)
        else:
            log.warning("workers are NOT isolated (%s): this server serves one user only; start it "
                        "with --no-isolation to share it anyway, without isolation", self.reason)
        if self.memory.per_slot is not None and not self.memory.counts_shared_pages:
            log.warning("worker memory: %s", self.memory.describe())
        crowded = self.processes.crowding()
        if crowded:
            log.warning("%s", crowded)

    def admit(self, user: str) -> str | None:
        """None if ``user`` may use workers here, else the one-line reason not."""
        if self.config.no_isolation or (self.isolated and self.unfenced is None):
            return None
        if self._only_user is None:
            self._only_user = user
            log.warning("users are NOT kept apart: this server now serves %s only", user)
        if user == self._only_user:
            return None
        if self.isolated:
            return (f"this server cannot keep users apart ({self.unfenced}), so it serves one user only "
                    f"({self._only_user}); its admin can fix that, or start it with --no-isolation to "
                    "share it knowingly")
        return (f"this server cannot isolate workers ({self.reason}), so it serves one user only "
                f"({self._only_user}); its admin can start it with --no-isolation to share it "
                "without isolation")

    def status_json(self) -> dict[str, Any]:
        """The ``isolation`` object of ``GET /api/status``."""
        if self.mode is IsolationMode.UIDS:
            detail = f"Each user's workers run as a uid of their own (--run-as {self.config.run_as.value})."
        elif self.mode is IsolationMode.BUBBLEWRAP:
            detail = "Each worker runs in a bubblewrap sandbox of its own."
        elif self.config.no_isolation:
            detail = ("Started with --no-isolation: every user's code runs as the server's user and can "
                      "read the other users' code, data and output here.")
        else:
            detail = f"Nothing here can isolate them ({self.reason}), so this server serves one user only."
        if self.unfenced is not None and self.isolated:
            detail += f" But this server cannot keep users apart ({self.unfenced}), so it serves one user only."
        return {"isolated": self.isolated and self.unfenced is None, "mode": self.mode.value,
                "run_as": self.config.run_as.value
                if self.mode is IsolationMode.UIDS else None, "memory": self.memory.describe(),
                "disk": self.disks.describe(), "processes": self.processes.describe(), "detail": detail}

    # -- workers -------------------------------------------------------------

    def prepare(self, name: str, slots: int, runtime: Path, tenant: Tenant | None = None,
                gpus: str = "", *, environment: str = DEFAULT_ENVIRONMENT,
                code_paths: tuple[Path, ...] | None = None) -> WorkerIsolation:
        """How to start worker ``name`` on ``slots`` slots; ``runtime`` is its own
        runtime folder; ``tenant`` is given for a worker that replaces another
        within a lease; ``gpus`` is its ``CUDA_VISIBLE_DEVICES``: the GPUs whose
        device files it gets (none for ""); ``environment``: the name of the
        environment it runs (its user's site is that environment's);
        ``code_paths``: the folders its Python reads code from (default: the
        server's own, :func:`.sandbox.python_paths`), readable and never writable."""
        cgroup = WorkerCgroup()
        try:
            cgroup = self.cgroups.make(name)
            memory = self.memory.for_worker(cgroup, slots)
            processes = self.processes.for_worker(cgroup, slots)
        except OSError as exc:  # the cgroup could not be made: the worker limits itself
            log.warning("worker %s: no cgroup (%s); it limits itself with rlimits instead", name, exc)
            cgroup.close()
            cgroup = WorkerCgroup()
            memory = self.memory.for_worker(cgroup, slots)
            processes = self.processes.for_worker(cgroup, slots)
        if not self.isolated:
            return WorkerIsolation(self, name, runtime, cgroup, memory, processes, tenant,
                                   cuda_visible_devices=gpus, environment=environment, code_paths=code_paths)
        return WorkerIsolation(self, name, runtime, cgroup, memory, processes, tenant,
                               self.devices.for_worker(gpus), self.devices.visible_devices(gpus),
                               environment=environment, code_paths=code_paths)

    def new_folder(self, owner: Identity | None, user: str | None = None) -> Path:
        """A fresh session folder, mode 0700, owned by ``owner`` (else the server), on
        ``user``'s disk (None: a sandbox's, made before its user is known)."""
        try:
            parent = self.disks.folder_root(user)
        except OSError as exc:
            raise IsolationError(f"{user}'s disk for session folders could not be made ready: {exc}") from None
        self._sweep(parent)
        folder = parent / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        if owner is not None:
            os.chown(folder, owner.uid, owner.gid)
        return folder

    def identity(self, user: str) -> Identity | None:
        """Who ``user``'s workers run as (None: as the server's user)."""
        return self.identities.of(user) if self.identities is not None else None

    def tenant(self, user: str, folder: Path | None = None, identity: Identity | None = None) -> Tenant:
        """``user``'s tenancy of a new lease; its session folder is made here
        unless the worker already has one (a sandbox binds it at start).
        ``identity`` is who the user runs as where another server decided it
        (a cluster's head, for its nodes); by default this one decides."""
        if identity is None:
            identity = self.identity(user)
        elif self.identities is not None:
            self.identities.adopt(identity)  # the head's uid, claimed on this host too
        tenant = Tenant(user, folder or self.new_folder(identity, user), identity)
        self._tenants.add(tenant)
        return tenant

    def forget(self, tenant: Tenant) -> None:
        """The lease's folder outlives its workers (a parked session's): :meth:`release`
        and :meth:`close` leave it alone until :meth:`track` takes it back. It still
        counts towards its user's disk (:meth:`folders_of`)."""
        self._tenants.discard(tenant)
        self._parked.add(tenant)

    def track(self, tenant: Tenant) -> None:
        """``tenant``'s folder is this server's to remove again (a session resumed,
        or found parked at start)."""
        self._parked.discard(tenant)
        self._tenants.add(tenant)

    def folders_of(self, user: str) -> list[Path]:
        """What counts in ``user``'s disk here: their leases' and parked sessions'
        folders, and their own packages (see :mod:`.user_sites`)."""
        return [t.folder for t in self._tenants | self._parked if t.user == user] + self.sites.existing(user)

    def users(self) -> set[str]:
        """Users with a session folder here."""
        return {t.user for t in self._tenants | self._parked}

    def seal(self, tenant: Tenant) -> None:
        """A parked session's folder goes out of its user's reach: the server's, mode
        0700, until :meth:`unseal` (only where users run as uids of their own; their
        other sessions run as the same uid). Blocks: call in a thread."""
        if tenant.identity is not None and os.geteuid() == 0:
            os.chown(tenant.folder, 0, 0, follow_symlinks=False)
            os.chmod(tenant.folder, 0o700, follow_symlinks=False)

    def unseal(self, tenant: Tenant) -> None:
        """Give a parked session's folder back to its user, as it resumes."""
        if tenant.identity is not None and os.geteuid() == 0:
            os.chown(tenant.folder, tenant.identity.uid, tenant.identity.gid, follow_symlinks=False)

    def release(self, tenant: Tenant | None) -> None:
        """The lease ended: its session folder goes, in the remover's thread (links
        in it are not followed); returns at once."""
        if tenant is None or tenant not in self._tenants:
            return
        self._tenants.discard(tenant)
        self._parked.discard(tenant)
        self.remover.remove(tenant.folder)

    def close(self) -> None:
        """Remove the leases' folders (parked ones stay), and unmount the users'
        disks. Blocks until the folders are deleted, or a few seconds."""
        for tenant in list(self._tenants):
            self.release(tenant)
        self.remover.close()
        self.binder.close()
        self.disks.close()
        self.cgroups.close()

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """A worker's environment: the allow-listed part of the server's, its pip
        configuration (:mod:`.pip_settings`), then ``extra``."""
        keep = ENV_KEEP + self.config.worker_env + (() if self.isolated else _ENV_KEEP_SAME_USER)
        env = {k: v for k, v in os.environ.items() if _keep(k, keep) and not k.startswith(_ENV_NEVER)}
        env.setdefault("PATH", os.defpath)
        env.update(pip_environment(server_settings=self.config.worker_pip_settings))
        if self.config.preload is not None:
            env[PRELOAD_VAR] = ",".join(self.config.preload)
        env.update(extra)
        return env
