"""What a worker does to itself to become one user's, in two steps.

This module runs inside the worker process (see :mod:`.kernel`) and
imports only the standard library; the server imports it for the two specs,
which it sends as JSON.

1. :func:`prepare`, with a :class:`SpawnSpec`, is the first thing the worker
   does, while it is still a single thread and, under a root server, still
   root. It sets the memory and process rlimits (when no cgroup holds the
   worker; RLIMIT_NPROC binds once the worker is no longer root) and the
   file size rlimit (where the server only measures its users' disks), moves
   into an IPC namespace of its own (its SysV shared memory, semaphores and
   message queues, and its POSIX message queues, are its own, go with it,
   and its shared memory is held to its memory limit) and a mount namespace
   of its own with private, size-limited tmpfs on ``/tmp``, ``/var/tmp``
   and ``/dev/shm``, sets ``no_new_privs``, and refuses itself new user
   namespaces (:mod:`.user_namespaces`). A mount namespace is per thread at
   the moment it is made: made here, before ipykernel and torch start any
   thread, every thread of the worker shares it, so no thread keeps a door
   into the host's ``/tmp``.

   Some paths must stay reachable once the worker is no longer root: the
   Python it runs (read-only; it may live under ``/root``, mode 0700), its
   own runtime folder (where its sockets are) and the session root (both
   possibly under the host's ``/tmp``). Each is opened before the private
   tmpfs cover the host's, and bound back in place afterwards; where an
   ancestor is closed to others, that ancestor is covered by a small tmpfs
   holding only the way down to the exposed paths. Everything else under
   it is hidden from the worker.

   Its ``/dev`` is its own too (with ``SpawnSpec.devices``): a small tmpfs
   on which no device file works, holding what bubblewrap's ``--dev``
   holds (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``, a
   ``pts`` of its own with ``ptmx``, ``shm``, the ``fd``, ``std*`` and
   ``core`` links) and the device files of its lease (see
   :mod:`.devices`), each bound from the host's: none of the host's other
   files, so no other GPU's. After :func:`enter` the worker has no
   capability left to make a device file or to mount anything, and a mount
   namespace it makes in a user namespace of its own inherits these mounts
   locked: it cannot take them off to see the host's ``/dev``.
2. :func:`enter`, with an :class:`EnterSpec`, runs at lease time in the
   kernel's main thread (a comm request, in order before any cell): it
   mounts the user's own disk in its namespace where that namespace was made
   before the disk was mounted (see :mod:`.user_disks`), hands
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
import sys
from typing import Any

__all__ = ["ENV_VAR", "IOPUB_DIR_VAR", "PRIVATE_TMP", "EnterSpec", "SpawnSpec", "enter", "prepare",
           "prepare_from_environ"]

#: The environment variable that carries the worker's :class:`SpawnSpec`.
ENV_VAR = "RGPU_CONFINE"
#: The folder in which the worker makes its IOPub pipe (see :mod:`.iopub`):
#: one only its user reaches.
IOPUB_DIR_VAR = "RGPU_IOPUB_DIR"

# From <sched.h>, <sys/mount.h> and <linux/prctl.h>.
_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38
#: Folders that get a private tmpfs, where they exist.
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
#: The host's files a private ``/dev`` holds, as bubblewrap's ``--dev`` does.
DEV_FILES = ("null", "zero", "full", "random", "urandom", "tty")
#: Its links: name → target.
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))
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
    #: RLIMIT_FSIZE in bytes: the largest file the worker may write (the user's
    #: disk limit, where the server only measures it).
    file_limit: int | None = None
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
    #: An IPC namespace of its own (the server runs as root; bubblewrap has
    #: ``--unshare-ipc``), whose SysV shared memory is held to ``ipc_limit``
    #: bytes where given.
    private_ipc: bool = False
    ipc_limit: int | None = None
    #: Refuse new user namespaces with a seccomp filter (as root; bubblewrap
    #: has ``--disable-userns``).
    refuse_user_namespaces: bool = False
    #: A ``/dev`` of its own (with ``private_tmp``) holding the usual files and
    #: these device files: ``(path on the host, name under /dev)``. None keeps
    #: the host's ``/dev``.
    devices: tuple[tuple[str, str], ...] | None = None
    #: Folders covered with an empty tmpfs (a test's stand-in for ``/dev``).
    cover: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SpawnSpec:
        data = json.loads(text)
        data["expose"] = tuple((str(p), bool(w)) for p, w in data.get("expose") or ())
        if data.get("devices") is not None:
            data["devices"] = tuple((str(s), str(n)) for s, n in data["devices"])
        data["cover"] = tuple(str(p) for p in data.get("cover") or ())
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
    #: ``(device, folder, device number)``: the user's own ext4 filesystem,
    #: mounted at ``folder`` first unless this namespace has it there already.
    mount: tuple[str, str, int] | None = None
    #: The user's own site for packages in this worker's environment, made
    #: ready by the worker once it is its user's (see :mod:`.user_site`);
    #: None: packages go to the session folder, for the session only.
    site: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnterSpec:
        mount = data.get("mount")
        return cls(cwd=str(data["cwd"]), uid=data.get("uid"), gid=data.get("gid"),
                   groups=tuple(int(g) for g in data.get("groups") or ()),
                   env=tuple((str(k), str(v)) for k, v in data.get("env") or ()),
                   chown=tuple(str(p) for p in data.get("chown") or ()),
                   mount=(str(mount[0]), str(mount[1]), int(mount[2])) if mount else None,
                   site=str(data["site"]) if data.get("site") else None)


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


def _private_dev(libc: Any, files: list[tuple[str, int]]) -> None:
    """A fresh ``/dev`` holding ``files`` (name, O_PATH descriptor of the host's file) and
    the usual links, a ``pts`` of its own and an empty ``shm``; see the module docstring."""
    # nodev: a device file on the tmpfs itself does not work; each bound file
    # keeps its own mount's flags.
    _mount(libc, b"tmpfs", "/dev", b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0755,size=64k")
    for name, fd in files:
        path = os.path.join("/dev", name)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # the mount point
        _mount(libc, f"/proc/self/fd/{fd}".encode(), path, None, _MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join("/dev", name))
    os.mkdir("/dev/shm", 0o755)
    os.mkdir("/dev/pts", 0o755)
    _mount(libc, b"devpts", "/dev/pts", b"devpts", _MS_NOSUID | _MS_NOEXEC, b"newinstance,ptmxmode=0666,mode=620")


def _private_namespace(libc: Any, spec: SpawnSpec) -> None:
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing mounted here may reach the host's namespace, and nothing
    # mounted there later reaches this one.
    _mount(libc, b"none", "/", None, _MS_REC | _MS_PRIVATE)
    # Open what stays reachable before anything covers it (O_PATH: a device
    # file is not opened, only named).
    exposed = [(path, writable, _blocked_ancestor(path), os.open(path, os.O_PATH | os.O_DIRECTORY))
               for path, writable in spec.expose]
    devices: list[tuple[str, int]] = []
    try:
        if spec.devices is not None:
            wanted = [(os.path.join("/dev", n), n) for n in DEV_FILES] + list(spec.devices)
            devices = [(name, os.open(source, os.O_PATH)) for source, name in wanted if os.path.exists(source)]
            os.umask(0o022)
            _private_dev(libc, devices)
    finally:
        for _name, fd in devices:
            os.close(fd)
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
    for path in spec.cover:  # one the private tmpfs hid already is not there any more
        if os.path.isdir(path) and not os.path.islink(path):
            _mount(libc, b"tmpfs", path, b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0755,size=4k")


def _private_ipc(libc: Any, limit: int | None) -> None:
    """An IPC namespace of its own; with ``limit``, its SysV shared memory stays
    within ``limit`` bytes and its message queues within a quarter of that
    (a segment's pages count towards a memory cgroup, not towards RLIMIT_DATA)."""
    _check(libc.unshare(_CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")
    if limit is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def sysctl(name: str, value: int) -> None:
        with open(f"/proc/sys/kernel/{name}", "w") as out:
            out.write(str(value))

    try:
        sysctl("shmmax", limit)
        sysctl("shmall", max(1, limit // page))
        with open("/proc/sys/kernel/msgmnb") as queue_size, open("/proc/sys/kernel/msgmni") as queues:
            sysctl("msgmni", max(1, min(int(queues.read()), limit // 4 // max(1, int(queue_size.read())))))
    except OSError as exc:  # a read-only /proc/sys (a container): the namespace still fences
        print(f"rgpu worker: SysV IPC is private but not held to the memory limit: {exc}", file=sys.stderr)


def prepare(spec: SpawnSpec) -> None:
    """Confine this process at start; see the module docstring. Raises OSError."""
    import resource

    if spec.data_limit is not None:
        # RLIMIT_DATA, not RLIMIT_AS: CUDA reserves far more address space
        # than it uses, with PROT_NONE mappings that RLIMIT_DATA ignores.
        resource.setrlimit(resource.RLIMIT_DATA, (spec.data_limit, spec.data_limit))
    if spec.file_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.file_limit, spec.file_limit))
    if spec.nproc_limit is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.nproc_limit, spec.nproc_limit))
    libc = _libc()
    if spec.private_ipc:
        _private_ipc(libc, spec.ipc_limit)
    if spec.private_tmp:
        _private_namespace(libc, spec)
    if spec.no_new_privs:
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if spec.refuse_user_namespaces:
        from .user_namespaces import refuse_user_namespaces

        refuse_user_namespaces()


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


def _mount_disk(device: str, folder: str, rdev: int) -> None:
    """Mount the ext4 filesystem on block device ``rdev`` (``device`` on the
    host) at ``folder``, unless it is there.

    A worker's own ``/dev`` holds no block device, and its tmpfs allow no
    device file: the node is made, for this mount only, on a tmpfs of its
    own that allows one, in a folder only root can enter, and both are gone
    before the worker becomes its user.
    """
    if os.stat(folder).st_dev == rdev:
        return
    libc = _libc()
    if os.path.exists(device) and os.stat(device).st_rdev == rdev:  # the host's /dev
        _mount(libc, device.encode(), folder, b"ext4", _MS_NOSUID | _MS_NODEV)
        return
    import stat
    import tempfile

    scratch = tempfile.mkdtemp(prefix=".rgpu-disk-")  # 0700, in the private /tmp
    try:
        _mount(libc, b"tmpfs", scratch, b"tmpfs", _MS_NOSUID | _MS_NOEXEC, b"mode=0700,size=4k")
        try:
            node = os.path.join(scratch, "disk")
            os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
            _mount(libc, node.encode(), folder, b"ext4", _MS_NOSUID | _MS_NODEV)
        finally:
            _check(libc.umount2(scratch.encode(), 0), f"umount {scratch}")
    finally:
        os.rmdir(scratch)


def enter(spec: EnterSpec) -> None:
    """Take on the lease's identity; see the module docstring.

    Raises OSError if a step fails (the server then kills this worker); ends
    the process if, after the change, it could still become root again.
    """
    if spec.mount is not None:
        _mount_disk(*spec.mount)
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
