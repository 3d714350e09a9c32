"""What a worker does to itself to become one user's, in two steps.

This module runs inside the worker process (see :mod:`.worker_kernel`) and
imports only the standard library; the server imports it for the two specs,
which it sends as JSON.

1. :func:`prepare`, with a :class:`SpawnSpec`, is the first thing the worker
   does, while it is still a single thread and, under a root server, still
   root. It sets the memory and process rlimits (when no cgroup holds the
   worker; RLIMIT_NPROC binds once the worker is no longer root), moves
   into a mount namespace of its own with private, size-limited tmpfs on
   ``/tmp``, ``/var/tmp`` and ``/dev/shm``, and sets ``no_new_privs``. A
   mount namespace is per thread at the moment it is made: made here, before
   ipykernel and torch start any thread, every thread of the worker shares
   it, so no thread keeps a door into the host's ``/tmp``.

   Some paths must stay reachable once the worker is no longer root: the
   Python it runs (read-only; it may live under ``/root``, mode 0700), its
   own runtime folder (where its sockets are) and the session root (both
   possibly under the host's ``/tmp``). Each is opened before the private
   tmpfs cover the host's, and bound back in place afterwards; where an
   ancestor is closed to others, that ancestor is covered by a small tmpfs
   holding only the way down to the exposed paths. Everything else under
   it is hidden from the worker.
2. :func:`enter`, with an :class:`EnterSpec`, runs at lease time in the
   kernel's main thread (a comm request, in order before any cell): it hands
   what the worker wrote in its private ``/tmp`` to the user, moves into the
   session folder, and sets the user's groups, gid and uid. glibc applies
   ``setgroups``/``setresgid``/``setresuid`` to every thread, and a uid
   change away from 0 clears every capability, so nothing in the process
   keeps root. The call checks that uid 0 cannot be taken back, or ends the
   process.

Contract: call :func:`prepare` once before anything starts a thread, and
:func:`enter` at most once; a worker whose :func:`enter` failed must not be
given to anyone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from typing import Any

__all__ = ["ENV_VAR", "PRIVATE_TMP", "EnterSpec", "SpawnSpec", "enter", "prepare", "prepare_from_environ"]

#: The environment variable that carries the worker's :class:`SpawnSpec`.
ENV_VAR = "RGPU_CONFINE"

# From <sched.h>, <sys/mount.h> and <linux/prctl.h>.
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38
#: Folders that get a private tmpfs, where they exist.
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
#: Exit status of a worker that could not drop root: it must not serve anyone.
_EXIT_STILL_PRIVILEGED = 70
#: The private tmpfs this process mounted (only these are ever chowned).
_mounted: set[str] = set()


@dataclasses.dataclass(frozen=True)
class SpawnSpec:
    """How a worker confines itself at start (see :func:`prepare`)."""

    #: A mount namespace of its own with private tmpfs (the server runs as
    #: root; under bubblewrap the sandbox already has them).
    private_tmp: bool = False
    #: Size of each private tmpfs in bytes (its pages count as the worker's memory).
    tmp_size: int | None = None
    #: RLIMIT_DATA in bytes, where no cgroup limits the worker's memory.
    data_limit: int | None = None
    #: The limit as people read it ("4 GiB"), for the MemoryError message.
    limit_text: str | None = None
    #: RLIMIT_NPROC, where no cgroup limits the worker's processes and threads.
    nproc_limit: int | None = None
    #: The worker's process limit however it is enforced, for the message in
    #: the cell when it is reached; and its cgroup's ``pids.events``, if any.
    pids_limit: int | None = None
    pids_events: str | None = None
    #: Set ``no_new_privs``: no setuid program can raise the worker's privileges.
    no_new_privs: bool = True
    #: Paths kept reachable in the private namespace: ``(path, writable)``.
    expose: tuple[tuple[str, bool], ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SpawnSpec:
        data = json.loads(text)
        data["expose"] = tuple((str(p), bool(w)) for p, w in data.get("expose") or ())
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class EnterSpec:
    """The identity a leased worker takes on (see :func:`enter`)."""

    #: The session folder: the working directory from now on.
    cwd: str
    #: The uid, gid and supplementary groups to take; None keeps the process's.
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    #: Environment variables to set (HOME, USER, LOGNAME, ...).
    env: tuple[tuple[str, str], ...] = ()
    #: Private tmpfs whose contents (written before the lease) become the
    #: user's; one that :func:`prepare` did not mount is left alone.
    chown: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnterSpec:
        return cls(cwd=str(data["cwd"]), uid=data.get("uid"), gid=data.get("gid"),
                   groups=tuple(int(g) for g in data.get("groups") or ()),
                   env=tuple((str(k), str(v)) for k, v in data.get("env") or ()),
                   chown=tuple(str(p) for p in data.get("chown") or ()))


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _blocked_ancestor(path: str) -> str | None:
    """The highest folder on the way to ``path`` that others cannot enter,
    counting the private tmpfs folders; None if the way is open."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if ancestor in PRIVATE_TMP or not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _mount(libc: Any, source: bytes, target: str, fstype: bytes | None, flags: int,
           options: bytes | None = None) -> None:
    _check(libc.mount(source, target.encode(), fstype, flags, options), f"mount {target}")


def _private_namespace(libc: Any, spec: SpawnSpec) -> None:
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing mounted here may reach the host's namespace, and nothing
    # mounted there later reaches this one.
    _mount(libc, b"none", "/", None, _MS_REC | _MS_PRIVATE)
    # Open what stays reachable before anything covers it.
    exposed = [(path, writable, _blocked_ancestor(path), os.open(path, os.O_PATH | os.O_DIRECTORY))
               for path, writable in spec.expose]
    size = f",size={spec.tmp_size}" if spec.tmp_size else ""
    covered = set()
    os.umask(0o022)  # the skeleton folders below must let the user through
    for path in PRIVATE_TMP:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount(libc, b"tmpfs", path, b"tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777{size}".encode())
            covered.add(path)
            _mounted.add(path)
    for path, writable, blocked, fd in exposed:
        try:
            if blocked is None:
                continue
            if blocked not in covered:
                _mount(libc, b"tmpfs", blocked, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=1m")
                covered.add(blocked)
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}".encode(), path, None, _MS_BIND)
            if not writable:
                _mount(libc, b"none", path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        finally:
            os.close(fd)


def prepare(spec: SpawnSpec) -> None:
    """Confine this process at start; see the module docstring. Raises OSError."""
    import resource

    if spec.data_limit is not None:
        # RLIMIT_DATA, not RLIMIT_AS: CUDA reserves far more address space
        # than it uses, with PROT_NONE mappings that RLIMIT_DATA ignores.
        resource.setrlimit(resource.RLIMIT_DATA, (spec.data_limit, spec.data_limit))
    if spec.nproc_limit is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.nproc_limit, spec.nproc_limit))
    libc = _libc()
    if spec.private_tmp:
        _private_namespace(libc, spec)
    if spec.no_new_privs:
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def prepare_from_environ() -> SpawnSpec | None:
    """:func:`prepare` with the spec the server put in ``$RGPU_CONFINE``, if any."""
    text = os.environ.pop(ENV_VAR, None)
    if not text:
        return None
    spec = SpawnSpec.from_json(text)
    prepare(spec)
    return spec


def _chown_contents(folder: str, uid: int, gid: int) -> None:
    """Give ``folder``'s contents to ``uid``, never following a link or
    crossing into another mount (an exposed path bound inside it)."""
    device = os.stat(folder).st_dev
    for root, dirs, files in os.walk(folder):
        for name in list(dirs):
            if os.lstat(os.path.join(root, name)).st_dev != device:
                dirs.remove(name)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def enter(spec: EnterSpec) -> None:
    """Take on the lease's identity; see the module docstring.

    Raises OSError if a step fails (the server then kills this worker); ends
    the process if, after the change, it could still become root again.
    """
    if spec.uid is not None and spec.gid is not None:
        for folder in spec.chown:
            if folder in _mounted:  # never the host's /tmp
                _chown_contents(folder, spec.uid, spec.gid)
    os.chdir(spec.cwd)
    if spec.uid is not None and spec.gid is not None:
        os.setgroups(list(spec.groups))
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        if os.getresuid() != (spec.uid,) * 3 or os.getresgid() != (spec.gid,) * 3:
            os._exit(_EXIT_STILL_PRIVILEGED)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            os._exit(_EXIT_STILL_PRIVILEGED)
        # A uid change makes the process undumpable, which also stops the
        # user's own tools (and NCCL's pidfd_getfd between their processes)
        # from attaching to it; nothing secret from before the lease is in it.
        _check(_libc().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    os.umask(0o022)
    os.environ.update(dict(spec.env))
    os.environ["PWD"] = spec.cwd
