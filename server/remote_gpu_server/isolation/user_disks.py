"""Each user's disk for session folders: ``rgpu serve --session-disk SIZE``.

Session folders sit next to the store (``--session-root``); without a
limit, one cell that writes without end fills the disk that every user's
writes, and the store's, need. Each user gets SIZE in all, across their
session folders (live and parked; later their own packages). The default,
``auto``, is a tenth of the filesystem that holds the session root (at
least 1 GiB); ``none`` sets no limit. How the limit holds depends on what
the server may do (:class:`DiskMode`, chosen once at :meth:`UserDisks.start`):

- ``filesystem`` (a root server that isolates workers with uids, where loop
  devices work): each user has an ext4 filesystem of SIZE of their own, in
  a sparse image ``SESSION_ROOT/.disks/KEY.ext4`` (KEY: :func:`user_key`),
  made at their first lease and mounted (``nosuid,nodev``, ``discard`` so
  deleted files give the host its space back) at ``SESSION_ROOT/KEY/``
  while the server runs. Their session folders are made in it. The kernel
  enforces the limit: a write past it fails with ``ENOSPC`` ("No space left
  on device") in that user's cell, which the worker explains (see
  :mod:`.worker_files`), and nobody else notices. A worker's mount namespace
  may have been made before the user's filesystem was mounted: the lease's
  :class:`~.confinement.EnterSpec` names the device, and the worker mounts
  it in its own namespace before it drops root. The images persist (a
  parked session's files are in them); one whose size differs from SIZE at
  the next start is resized to it where its files fit.
- ``server`` (everywhere else: a server that is not root, whose bubblewrap
  sandboxes cannot mount; a root server without loop devices): session
  folders stay in the session root, each worker gets ``RLIMIT_FSIZE`` of
  SIZE (no one file outgrows the limit: ``EFBIG``, "File too large"), and
  the server measures each user's folders in a thread while their cells run
  (:mod:`.disk_watch`), stopping the cells of a user past the limit.
- ``none``: ``--session-disk none``, and Ray nodes (each node's workers are
  its own; the head does not reach their folders).

What it does not fence: the sum. Images are sparse, so SIZE times the users
may promise more than the disk holds; the server warns when the images it
made promise more than is free.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from remote_gpu_core.sizes import format_size, parse_size

__all__ = ["DISKS", "DiskMode", "UserDisk", "UserDisks", "allocated_bytes", "user_key"]

log = logging.getLogger("remote_gpu_server")

#: The folder, in the session root, that holds the users' filesystem images.
DISKS = ".disks"
#: ``auto``: this share of the session root's filesystem per user, at least :data:`AUTO_MINIMUM`.
AUTO_SHARE = 0.1
AUTO_MINIMUM = 1 << 30
#: The smallest ``--session-disk`` (an ext4 filesystem needs a few MiB of its own).
MINIMUM = 8 << 20
#: Mount options of a user's filesystem: no setuid programs or device files,
#: deleted files punched out of the sparse image, no background zeroing.
MOUNT_OPTIONS = "loop,nosuid,nodev,noinit_itable,discard"
_MKFS = ("-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1")
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class DiskMode(enum.Enum):
    FILESYSTEM = "filesystem"
    SERVER = "server"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class UserDisk:
    """One user's mounted filesystem."""

    user: str
    image: Path
    #: Where it is mounted: the user's session folders are made in it.
    folder: Path
    #: The loop device it is mounted from (workers mount it in their own namespace).
    device: str
    #: This server mounted it (and unmounts it at the end); False: it found it mounted.
    mounted_here: bool


def user_key(user: str) -> str:
    """A user's name on disk: ``u-NAME-HASH``, NAME made of safe characters,
    HASH telling apart names that look alike once made safe."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user)[:32]
    return f"u-{safe}-{hashlib.sha256(user.encode()).hexdigest()[:10]}"


def allocated_bytes(folders: Iterable[Path]) -> int:
    """Bytes of disk that the files and folders under ``folders`` take (their
    blocks: a sparse file counts what it holds, a hard link once), never
    following a link; a folder that is gone counts 0."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in folders:
        try:
            top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            for _root, dirs, files, dir_fd in os.fwalk(".", dir_fd=top):
                for name in dirs + files:
                    try:
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISLNK(info.st_mode) or (info.st_dev, info.st_ino) in seen:
                        continue
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
        except OSError:
            pass
        finally:
            os.close(top)
    return total


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    """Run a filesystem tool; raises OSError with what it printed unless it
    exits with a status in ``ok``."""
    tool = _tool(argv[0])
    if tool is None:
        raise OSError(f"{argv[0]} is not installed")
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode not in ok:
        raise OSError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip() or f'exit {done.returncode}'}")


def _mount_source(folder: Path) -> str | None:
    """The device mounted at ``folder`` (the topmost mount there), or None."""
    found = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        dash = fields.index("-")
        if fields[4].replace("\\040", " ") == str(folder):
            found = fields[dash + 2]
    return found


class UserDisks:
    """The users' disks; see the module docstring. ``spec``: ``--session-disk``;
    ``root``: the session root. Call :meth:`start` once, :meth:`close` at the end;
    everything else may be called from any thread."""

    def __init__(self, spec: str, root: Path) -> None:
        self.spec = spec
        self.root = root
        self.mode = DiskMode.NONE
        self.limit: int | None = None
        #: Why the mode is not ``filesystem``, where it could be.
        self.reason = ""
        self._disks: dict[str, UserDisk] = {}
        self._lock = threading.Lock()

    @property
    def images(self) -> Path:
        return self.root / DISKS

    def start(self, *, filesystems: bool) -> None:
        """Choose the mode: ``filesystems`` says whether a filesystem per user
        would fence workers here (a root server isolating with uids). Raises
        ValueError for a bad ``--session-disk``."""
        if self.spec.strip().lower() == "auto":
            fs = os.statvfs(self.root)
            self.limit = max(AUTO_MINIMUM, int(fs.f_blocks * fs.f_frsize * AUTO_SHARE) >> 20 << 20)
        else:
            try:
                self.limit = parse_size(self.spec, minimum=MINIMUM, what="a user's session folders", allow_none=True)
            except ValueError as exc:
                raise ValueError(f"--session-disk: {exc}") from None
        if self.limit is None:
            self.mode, self.reason = DiskMode.NONE, "--session-disk none"
            return
        if not filesystems:
            self.mode, self.reason = DiskMode.SERVER, "workers are not isolated with uids by a root server"
            return
        problem = self._probe()
        if problem is None:
            self.mode = DiskMode.FILESYSTEM
        else:
            self.mode, self.reason = DiskMode.SERVER, problem

    def _probe(self) -> str | None:
        """None if a filesystem image can be made and mounted here, else why not."""
        if os.geteuid() != 0:
            return "not root, so no filesystem can be mounted"
        for tool in ("mkfs.ext4", "mount", "umount", "e2fsck", "resize2fs"):
            if _tool(tool) is None:
                return f"{tool} is not installed (e2fsprogs, util-linux)"
        self.images.mkdir(mode=0o700, exist_ok=True)
        image = self.images / f".probe-{os.getpid()}.ext4"
        folder = self.images / f".probe-{os.getpid()}"
        try:
            self._make_image(image, MINIMUM)
            folder.mkdir(exist_ok=True)
            _run("mount", "-o", MOUNT_OPTIONS, str(image), str(folder))
            _run("umount", str(folder))
        except OSError as exc:
            return f"a filesystem image could not be mounted ({exc})"
        finally:
            image.unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                pass
        return None

    # -- a user's filesystem -------------------------------------------------

    def ready(self, user: str) -> bool:
        """``user``'s session folders can be made now without waiting for a mount."""
        return self.mode is not DiskMode.FILESYSTEM or user in self._disks

    def folder_root(self, user: str | None) -> Path:
        """Where ``user``'s session folders go (mounting their filesystem first,
        which takes a moment: see :meth:`ready`); None: a folder for nobody yet."""
        if user is None or self.mode is not DiskMode.FILESYSTEM:
            return self.root
        return self.attach(user).folder

    def owns(self, user: str, folder: Path) -> bool:
        """``folder`` is where one of ``user``'s session folders may be."""
        parent = folder.parent.resolve()
        if self.mode is DiskMode.FILESYSTEM:
            return parent == (self.root / user_key(user)).resolve()
        return parent == self.root.resolve()

    def mount_of(self, user: str) -> tuple[str, str, int] | None:
        """``(device, folder, device number)`` of ``user``'s filesystem, for a worker
        to mount; None where there is none."""
        disk = self._disks.get(user)
        return (disk.device, str(disk.folder), os.stat(disk.device).st_rdev) if disk is not None else None

    def attach(self, user: str) -> UserDisk:
        """``user``'s filesystem, made and mounted if need be. Raises OSError."""
        with self._lock:
            disk = self._disks.get(user)
            if disk is None:
                disk = self._attach(user)
                self._disks[user] = disk
            return disk

    def _attach(self, user: str) -> UserDisk:
        assert self.limit is not None
        key = user_key(user)
        image, folder = self.images / f"{key}.ext4", self.root / key
        self.images.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        source = _mount_source(folder)
        mounted_here = source is None
        if source is None:
            if not image.exists():
                self._make_image(image, self.limit)
                log.info("made a %s filesystem for %s's session folders (--session-disk): %s",
                         format_size(self.limit), user, image)
                self._warn_if_promised_too_much()
            elif image.stat().st_size != self.limit:
                self._resize(image, self.limit)
            _run("mount", "-o", MOUNT_OPTIONS, str(image), str(folder))
            source = _mount_source(folder)
            if source is None:
                raise OSError(f"{image} was mounted, but not at {folder}")
        # Its users walk through to their own folders, never list it.
        os.chown(folder, 0, 0)
        os.chmod(folder, 0o711)
        return UserDisk(user, image, folder, source, mounted_here)

    def _make_image(self, image: Path, size: int) -> None:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            _run("mkfs.ext4", *_MKFS, str(image))
        except OSError:
            image.unlink(missing_ok=True)
            raise

    def _resize(self, image: Path, size: int) -> None:
        """Make ``image`` ``size`` long where its files fit; else keep it, and say so."""
        old = image.stat().st_size
        try:
            _run("e2fsck", "-f", "-p", str(image), ok=(0, 1))  # 1: it repaired something
            if size > old:
                os.truncate(image, size)
                _run("resize2fs", str(image))
            else:
                _run("resize2fs", str(image), f"{size >> 10}K")
                os.truncate(image, size)
            log.info("resized %s from %s to %s (--session-disk)", image, format_size(old), format_size(size))
        except OSError as exc:
            log.warning("could not resize %s from %s to %s (--session-disk): %s; it keeps its size",
                        image, format_size(old), format_size(size), exc)

    def _warn_if_promised_too_much(self) -> None:
        try:
            images = [p for p in self.images.iterdir() if p.suffix == ".ext4" and not p.name.startswith(".")]
            promised = sum(p.stat().st_size - p.stat().st_blocks * 512 for p in images)
            fs = os.statvfs(self.images)
        except OSError:
            return
        free = fs.f_bavail * fs.f_frsize
        if promised > free:
            log.warning("the users' session disks (%d of %s, --session-disk) may still grow by %s, more "
                        "than the %s free where they are: if that fills up, writes fail for everyone",
                        len(images), format_size(self.limit or 0), format_size(promised), format_size(free))

    # -- use --------------------------------------------------------------------

    def used(self, user: str) -> int | None:
        """Bytes ``user``'s filesystem holds (None where ``user`` has none mounted)."""
        disk = self._disks.get(user)
        if disk is None:
            return None
        try:
            fs = os.statvfs(disk.folder)
        except OSError:
            return None
        return (fs.f_blocks - fs.f_bfree) * fs.f_frsize

    def capacity(self, user: str) -> int | None:
        """Bytes ``user``'s filesystem can hold in all (a little under the limit:
        the filesystem keeps some for its own records)."""
        disk = self._disks.get(user)
        if disk is None:
            return self.limit
        try:
            fs = os.statvfs(disk.folder)
        except OSError:
            return self.limit
        return fs.f_blocks * fs.f_frsize

    def users(self) -> list[str]:
        """Users with a filesystem mounted now."""
        return sorted(self._disks)

    def describe(self) -> str:
        if self.mode is DiskMode.FILESYSTEM:
            return (f"{format_size(self.limit or 0)} per user, a filesystem of their own each "
                    "(the kernel refuses writes past it)")
        if self.mode is DiskMode.SERVER:
            return (f"{format_size(self.limit or 0)} per user, measured by the server ({self.reason}): "
                    "cells of a user past it are stopped")
        return f"no limit ({self.reason})" if self.reason else "no limit"

    def status_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "enforced_by": None if self.mode is DiskMode.NONE else self.mode.value,
                "detail": self.describe()}

    def close(self) -> None:
        """Unmount the filesystems this server mounted (lazily: a deletion still
        running in one finishes on its own)."""
        with self._lock:
            disks, self._disks = list(self._disks.values()), {}
        for disk in disks:
            if disk.mounted_here:
                try:
                    _run("umount", "-l", str(disk.folder))
                except OSError as exc:
                    log.warning("could not unmount %s's session disk at %s: %s", disk.user, disk.folder, exc)
