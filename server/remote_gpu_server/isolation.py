"""Isolation of workers: who a user's code runs as, and what it can reach.

:class:`Isolation` is the server-wide policy, chosen once at start; each
worker gets a :class:`WorkerIsolation` from :meth:`Isolation.prepare`, which
is all a launcher needs: the command, environment and process options to
start the worker with, the :class:`~.confinement.EnterSpec` to send it at
lease time, what a death means, and a cleanup. The modes:

- ``uids`` (the server runs as root): warm workers start as root in a mount
  namespace of their own (private ``/tmp``, ``/var/tmp``, ``/dev/shm``),
  with no user code in them; at lease time the worker, told through its
  signed channel, moves into a fresh session folder and becomes the user's
  uid (see :mod:`.identities`) before any cell runs. A lease thus still
  takes a started worker: the change costs one round trip.
- ``bubblewrap`` (not root, and ``bwrap`` can make user namespaces): each
  worker starts in a sandbox of its own with its session folder bound in
  (see :mod:`.sandbox`); at lease time it only learns its user's name.
- ``none``: workers run as the server's user, as without this module:
  where neither mode above is possible, or where the admin asked for it
  with ``--no-isolation``. Without that flag such a server serves one user
  only (the first to connect); either way it says that workers are not
  isolated in its log and ``/api/status``. So does a server whose workers
  are isolated but share something that does not keep users apart (a Ray
  cluster without token authentication: :meth:`Isolation.refuse_sharing`).

In every mode a worker's environment comes from an allow-list (like
JupyterHub's ``Spawner.env_keep``), its output goes to a pipe of its own
(:mod:`.worker_output`), and its host memory is limited (see
:mod:`.memory_limits`).

A session folder lives as long as its lease, across worker restarts within
it, and is removed when the lease ends; ``/tmp`` is the worker's own.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .confinement import ENV_VAR, PRIVATE_TMP, EnterSpec, SpawnSpec
from .errors import IsolationError
from .identities import DEFAULT_UID_RANGE, Identities, Identity, RunAs
from .memory_limits import MemoryLimits, WorkerMemory, fair_share, parse_size
from .sandbox import SandboxLayout, bubblewrap_argv, check_bubblewrap, find_bubblewrap, python_paths

__all__ = ["ENV_KEEP", "Isolation", "IsolationConfig", "IsolationMode", "Tenant", "WorkerIsolation",
           "device_groups"]

log = logging.getLogger("remote_gpu_server")

#: Server environment variables a worker keeps (names, and prefixes ending in ``_``).
ENV_KEEP = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_ROOT",
            "LANG", "LANGUAGE", "LC_", "TZ", "LD_LIBRARY_PATH", "CUDA_", "NVIDIA_", "NCCL_",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Never passed, whatever --worker-env says: Ray's token lets its holder run code on every node.
_ENV_NEVER = ("RAY_AUTH_",)
#: Kept too when workers run as the server's own user.
_ENV_KEEP_SAME_USER = ("HOME", "USER", "LOGNAME", "SHELL", "TMPDIR")
#: Where IPython keeps its profile and history: in the worker's private /tmp.
_IPYTHONDIR = "/tmp/.ipython"


class IsolationMode(enum.Enum):
    UIDS = "uids"
    BUBBLEWRAP = "bubblewrap"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class IsolationConfig:
    """The ``rgpu serve`` flags of this module."""

    #: ``--run-as``: a dynamic uid per user, or their OS account where one exists.
    run_as: RunAs = RunAs.DYNAMIC
    #: ``--no-isolation``: do not isolate workers, and serve every user anyway.
    no_isolation: bool = False
    #: ``--worker-memory``: ``auto`` (a fair share per slot), a size, or ``none``.
    worker_memory: str = "auto"
    #: ``--session-root``: where session folders go (default: ``sessions`` next to the store).
    session_root: Path | None = None
    #: ``--uid-range``: the dynamic uids.
    uid_range: range = DEFAULT_UID_RANGE
    #: ``--worker-env``: more environment variables workers keep.
    worker_env: tuple[str, ...] = ()
    #: The mode to use instead of probing (tests); None probes.
    mode: IsolationMode | None = None


@dataclasses.dataclass(frozen=True)
class Tenant:
    """The user a leased worker works for, and the lease's session folder."""

    user: str
    folder: Path
    identity: Identity | None = None


def device_groups() -> tuple[int, ...]:
    """Groups that give access to the NVIDIA device files where others have none.

    Drivers installed with ``NVreg_DeviceFileMode=0660`` leave ``/dev/nvidia*``
    to a group (often ``video``): workers join it, so CUDA works for them
    as for the host's users.
    """
    gids = set()
    for device in glob.glob("/dev/nvidia*"):
        try:
            mode, gid = os.stat(device).st_mode, os.stat(device).st_gid
        except OSError:
            continue
        if not mode & 0o006 and mode & 0o060 and gid != 0:
            gids.add(gid)
    return tuple(sorted(gids))


def _keep(name: str, keep: tuple[str, ...]) -> bool:
    return any(name.startswith(k) if k.endswith("_") else name == k for k in keep)


class Isolation:
    """The server's isolation; see the module docstring.

    Call :meth:`start` once the slots are known, :meth:`close` at the end.
    """

    def __init__(self, config: IsolationConfig, db: Path, server_files: tuple[Path, ...] = ()) -> None:
        self.config = config
        self.db = db
        self.mode = config.mode or IsolationMode.NONE  # chosen in start() unless given
        self.reason = ""  # why the mode is not a stronger one
        self.session_root = config.session_root or db.parent / "sessions"
        self.memory = MemoryLimits.probe(None)
        self.identities: Identities | None = None
        self.bwrap: str | None = None
        #: What keeps this server to one user although workers are isolated (see refuse_sharing).
        self.unfenced: str | None = None
        #: More files no worker may read (a Ray node's token): a sandbox hides them.
        self._server_files = tuple(server_files)
        self._only_user: str | None = None
        self._tenants: set[Tenant] = set()

    @classmethod
    def unconfined(cls) -> Isolation:
        """Workers as the server's user, no limits, session folders in a private
        temporary folder: what a bare pool gets."""
        root = Path(tempfile.mkdtemp(prefix="rgpu-sessions-"))
        return cls(IsolationConfig(mode=IsolationMode.NONE, worker_memory="none", session_root=root),
                   Path("rgpu.sqlite3"))

    @property
    def isolated(self) -> bool:
        return self.mode is not IsolationMode.NONE

    def start(self, slots: int, *, server_pid: int | None = None) -> None:
        """Choose the mode and the memory control; raises IsolationError."""
        try:
            per_slot = (fair_share(slots) if self.config.worker_memory == "auto"
                        else parse_size(self.config.worker_memory))
        except ValueError as exc:
            raise IsolationError(f"--worker-memory: {exc}") from None
        self.mode = self.choose_mode()
        self.memory = MemoryLimits.probe(per_slot, pid=server_pid)
        if self.mode is IsolationMode.UIDS:
            os.umask(0o077)  # whatever the server writes from now on is its own
            self._protect_store()
            self.identities = Identities(self.db.with_name(self.db.name + "-uids.json"),
                                         self.config.run_as, self.config.uid_range)
        self._make_session_root()  # every lease has a session folder, isolated or not
        self._announce()

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

    def _announce(self) -> None:
        memory = self.memory.describe()
        if self.mode is IsolationMode.UIDS:
            log.info("workers are isolated: each user's run as a uid of their own (--run-as %s) with a "
                     "private /tmp; session folders in %s; memory: %s", self.config.run_as.value,
                     self.session_root, memory)
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
                "detail": detail}

    # -- workers -------------------------------------------------------------

    def prepare(self, name: str, slots: int, runtime: Path, tenant: Tenant | None = None) -> WorkerIsolation:
        """How to start worker ``name`` on ``slots`` slots; ``runtime`` is its own
        runtime folder; ``tenant`` is given for a worker that replaces another
        within a lease."""
        try:
            memory = self.memory.for_worker(name, slots)
        except OSError as exc:  # the cgroup could not be made: the worker limits itself
            log.warning("worker %s: no memory cgroup (%s); it gets RLIMIT_DATA instead", name, exc)
            limit = None if self.memory.per_slot is None else self.memory.per_slot * max(1, slots)
            memory = WorkerMemory(limit, data_limit=limit)
        return WorkerIsolation(self, name, runtime, memory, tenant)

    def new_folder(self, owner: Identity | None) -> Path:
        """A fresh session folder, mode 0700, owned by ``owner`` (else the server)."""
        folder = self.session_root / secrets.token_hex(8)
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
        tenant = Tenant(user, folder or self.new_folder(identity), identity)
        self._tenants.add(tenant)
        return tenant

    def forget(self, tenant: Tenant) -> None:
        """The lease's folder outlives its workers (a parked session's): :meth:`release`
        and :meth:`close` leave it alone until :meth:`track` takes it back."""
        self._tenants.discard(tenant)

    def track(self, tenant: Tenant) -> None:
        """``tenant``'s folder is this server's to remove again (a session resumed,
        or found parked at start)."""
        self._tenants.add(tenant)

    def release(self, tenant: Tenant | None) -> None:
        """The lease ended: remove its session folder (links in it are not followed)."""
        if tenant is None or tenant not in self._tenants:
            return
        self._tenants.discard(tenant)
        shutil.rmtree(tenant.folder, ignore_errors=True)

    def close(self) -> None:
        for tenant in list(self._tenants):
            self.release(tenant)
        self.memory.close()

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """A worker's environment: the allow-listed part of the server's, then ``extra``."""
        keep = ENV_KEEP + self.config.worker_env + (() if self.isolated else _ENV_KEEP_SAME_USER)
        env = {k: v for k, v in os.environ.items() if _keep(k, keep) and not k.startswith(_ENV_NEVER)}
        env.setdefault("PATH", os.defpath)
        env.update(extra)
        return env


class WorkerIsolation:
    """One worker's side of :class:`Isolation`; made by :meth:`Isolation.prepare`.

    Use :meth:`command`, :meth:`environment` and :attr:`popen_options` to start
    the worker, :meth:`enter_spec` at lease time (send what it returns, if
    anything, before any user request), :meth:`explain` when it dies, and
    :meth:`close` once it is dead.
    """

    def __init__(self, isolation: Isolation, name: str, runtime: Path, memory: WorkerMemory,
                 tenant: Tenant | None) -> None:
        self.isolation = isolation
        self.name = name
        self.runtime = runtime
        self.memory = memory
        self.tenant = tenant
        self.mode = isolation.mode
        #: The sandbox's session folder (bubblewrap binds it at start).
        self.folder: Path | None = None
        if self.mode is IsolationMode.BUBBLEWRAP:
            self.folder = tenant.folder if tenant is not None else isolation.new_folder(None)
        #: How the server interrupts it: a signal, or a message where the
        #: sandbox's pid namespace keeps the kernel out of the server's reach.
        self.interrupt_mode = "message" if self.mode is IsolationMode.BUBBLEWRAP else "signal"

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
        db = isolation.db
        assert isolation.bwrap is not None and self.folder is not None
        layout = SandboxLayout(
            writable=(self.runtime, self.folder),
            hidden_files=tuple(db.with_name(db.name + s) for s in ("", "-wal", "-shm", "-journal", "-uids.json"))
            + isolation._server_files,
            hidden_dirs=(isolation.session_root, self.runtime.parent),
            tmp_size=self._tmp_size(), chdir=self.folder)
        return bubblewrap_argv(isolation.bwrap, layout) + list(argv)

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        spec = SpawnSpec(data_limit=self.memory.data_limit, limit_text=self.memory.limit_text)
        env = dict(extra)
        if self.mode is IsolationMode.UIDS:
            expose = [(str(p), False) for p in python_paths()]
            expose += [(str(self.runtime), True), (str(self.isolation.session_root), True)]
            spec = dataclasses.replace(spec, private_tmp=True, tmp_size=self._tmp_size(),
                                       expose=tuple(expose))
            env.update(HOME="/tmp", IPYTHONDIR=_IPYTHONDIR)
        elif self.mode is IsolationMode.BUBBLEWRAP:
            assert self.folder is not None
            env.update(HOME=str(self.folder), IPYTHONDIR=_IPYTHONDIR, TMPDIR="/tmp")
        env[ENV_VAR] = spec.to_json()
        return self.isolation.environment(env)

    @property
    def popen_options(self) -> dict[str, Any]:
        """Keyword arguments for Popen (through jupyter_client)."""
        options: dict[str, Any] = {}
        if self.mode is IsolationMode.UIDS:
            options["cwd"] = "/"
        join: Callable[[], None] | None = self.memory.join
        if join is not None:
            options["preexec_fn"] = join
        return options

    def enter_spec(self, user: str, identity: Identity | None = None) -> EnterSpec | None:
        """What the worker must take on for ``user``'s lease: its session folder and,
        isolated, its identity; None for a worker leased for no user (a pool of
        its own, in tests). ``identity``: see :meth:`Isolation.tenant`."""
        if not user:
            if self.mode is IsolationMode.NONE:
                return None
            raise IsolationError(f"worker {self.name} was leased for no user; isolated workers need one")
        if self.tenant is None:
            self.tenant = self.isolation.tenant(user, self.folder, identity)
        elif self.tenant.user != user:
            raise IsolationError(f"worker {self.name} belongs to {self.tenant.user}, not {user}")
        tenant = self.tenant
        if self.mode is IsolationMode.NONE:
            return EnterSpec(cwd=str(tenant.folder))  # the folder only: it runs as the server's user
        env = {"USER": user, "LOGNAME": user, "HOME": str(tenant.folder), "TMPDIR": "/tmp"}
        if tenant.identity is None:
            return EnterSpec(cwd=str(tenant.folder), env=tuple(env.items()))
        identity = tenant.identity
        if identity.home and os.path.isdir(identity.home):
            env["HOME"] = identity.home
        groups = tuple(sorted(set(identity.groups) | set(device_groups())))
        # What the worker wrote in its private tmpfs before the lease (IPython's
        # folder, whatever CUDA's start left there) becomes the user's.
        return EnterSpec(cwd=str(tenant.folder), uid=identity.uid, gid=identity.gid, groups=groups,
                         env=tuple(env.items()), chown=PRIVATE_TMP)

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
        return self.memory.explain(returncode)

    def close(self) -> None:
        """Kill what is left of the worker (its cgroup) and remove its runtime folder."""
        self.memory.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        if self.tenant is None and self.folder is not None:  # a sandbox never leased
            shutil.rmtree(self.folder, ignore_errors=True)

