"""Each user's own packages: one persistent site per user and environment.

``%pip install`` in a remote cell installs into the user's site for the
worker's environment (today the only one is :data:`DEFAULT_ENVIRONMENT`, the
server's own Python), never into the environment itself, which is shared
and read-only to users. The site is a folder ``site-ENV`` in the user's
folder of the session root (``SESSION_ROOT/KEY/``, KEY from
:func:`~.user_disks.user_key`): on their own filesystem where each user has
one, so it counts in their ``--session-disk`` limit the way their session
folders do; where the server measures the users' disks instead, it is
measured with their session folders (:meth:`.policy.Isolation.folders_of`).
It outlives sessions and server restarts; ``%gpu env reset`` empties it.

The server makes only the empty folder, owned by the user's uid where
users have uids of their own (mode 0700, in a folder of the server's that
they may walk through but not change, so they cannot move it away or put a
link in its place). What goes in it is written by the worker itself, after
it became its user (see :mod:`..worker_process.user_site`): the server never
writes into a folder its users own.

A worker in a bubblewrap sandbox is started before its user is known; its
user's site is bound into it at lease time, at :data:`.site_binder.SITE`
(see :mod:`.site_binder`). Where the host does not allow that (checked at
the server's start), sandboxed workers get no site of their user's and
install into the session folder, for the session only.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import IsolationError
from .identities import Identity
from .user_disks import DiskMode, UserDisks, user_key

__all__ = ["DEFAULT_ENVIRONMENT", "SITE_PREFIX", "UserSites", "site_name"]

#: The environment of the server's own Python.
DEFAULT_ENVIRONMENT = "default"
#: A site's folder name is this and its environment's name.
SITE_PREFIX = "site-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def site_name(environment: str) -> str:
    """The folder name of a site for ``environment``; raises ValueError for a bad name."""
    if not _NAME.fullmatch(environment):
        raise ValueError(f"{environment!r} is not an environment name (letters, digits, '_', '.', '-')")
    return f"{SITE_PREFIX}{environment}"


class UserSites:
    """The users' sites in the session root ``root``, on their disks (``disks``).

    Call from any thread; :meth:`folder` may mount the user's filesystem (see
    :meth:`.user_disks.UserDisks.ready`).
    """

    def __init__(self, root: Path, disks: UserDisks) -> None:
        self.root = root
        self.disks = disks

    def user_folder(self, user: str) -> Path:
        """Where ``user``'s sites are: the top of their own filesystem where they
        have one (mounted here if need be), else a folder of theirs in the root."""
        if self.disks.mode is DiskMode.FILESYSTEM:
            self.disks.attach(user)
        return self.root / user_key(user)

    def folder(self, user: str, identity: Identity | None,
               environment: str = DEFAULT_ENVIRONMENT) -> Path:
        """``user``'s site for ``environment``, made if need be and owned by
        ``identity`` (None: the server's user). Raises IsolationError where it
        cannot be made, or where what is there is not a folder of theirs."""
        try:
            parent = self.user_folder(user)
            parent.mkdir(mode=0o711, exist_ok=True)
            info = os.lstat(parent)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise IsolationError(f"{parent} must be a folder of the server's own (not a link): remove it")
            if stat.S_IMODE(info.st_mode) != 0o711:  # whatever the umask (a root server's is 077)
                os.chmod(parent, 0o711)
            site = parent / site_name(environment)
            try:
                site.mkdir(mode=0o700)
                if identity is not None:
                    os.chown(site, identity.uid, identity.gid, follow_symlinks=False)
            except FileExistsError:
                pass
            info = os.lstat(site)
        except OSError as exc:
            raise IsolationError(f"{user}'s own site for packages could not be made ready: {exc}") from None
        owner = identity.uid if identity is not None else os.geteuid()
        if not stat.S_ISDIR(info.st_mode):
            raise IsolationError(f"{site} is not a folder: remove it; {user}'s packages go there")
        if info.st_uid != owner:
            # The user's uid changed (another --run-as): their files become theirs again.
            _chown_tree(site, identity)
        return site

    def existing(self, user: str) -> list[Path]:
        """``user``'s sites that exist now (for measuring their disk)."""
        if self.disks.mode is DiskMode.FILESYSTEM:
            return []  # on their own filesystem: the kernel counts it
        folder = self.root / user_key(user)
        try:
            return sorted(p for p in folder.iterdir() if p.name.startswith(SITE_PREFIX) and not p.is_symlink())
        except OSError:
            return []


def _chown_tree(folder: Path, identity: Identity | None) -> None:
    """Give ``folder`` and everything in it to ``identity``, following no link."""
    uid, gid = (identity.uid, identity.gid) if identity is not None else (os.geteuid(), os.getegid())
    os.chown(folder, uid, gid, follow_symlinks=False)
    top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for _root, dirs, files, dir_fd in os.fwalk(".", dir_fd=top):
            for name in dirs + files:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(top)
