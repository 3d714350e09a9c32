"""Bind a user's site into a warm bubblewrap sandbox at lease time.

A sandbox starts before its user is known, and a server that is not root
cannot mount a folder of the host into another mount namespace (the
kernel refuses a bind whose source is outside the caller's namespace). It
can act inside a namespace it owns, though: bubblewrap's user namespace is
the server's, so a process of the server's that joins the sandbox's user
and mount namespaces may mount there, from what the sandbox itself holds.

So a warm sandbox starts with the session root bound at :data:`STASH`
(only the server's code runs in it before a lease) and an empty
:data:`SITE` folder. At lease time :func:`bind_site` runs this file as a
program of its own (joining a namespace needs a process of one thread):
it joins the sandbox's namespaces, binds the user's site from the stash
onto :data:`SITE`, and detaches the stash, so that nothing of another user
is reachable from then on; it fails (and the worker must not be leased)
unless the stash is gone. The worker, which has no capability left, can
neither undo the bind nor mount anything. :func:`probe` checks once at the
server's start that this works on the host.

This file runs as a program with the standard library only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["SITE", "STASH", "bind_site", "sandbox_pid"]

#: Where a warm sandbox sees the session root, until its lease.
STASH = Path("/run/rgpu/sites")
#: Where a leased sandbox sees its user's site.
SITE = Path("/run/rgpu/site")
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_BIND, _MS_REC = 0x1000, 0x4000
_MNT_DETACH = 2
_NS_GET_USERNS = 0xB701  # ioctl: the user namespace that owns a namespace


def sandbox_pid(bwrap_pid: int) -> int | None:
    """A process inside the sandbox that ``bwrap_pid`` (bubblewrap's own, outside it) runs."""
    try:
        with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children") as children:
            found = children.read().split()
    except OSError:
        return None
    return int(found[0]) if found else None


def bind_site(pid: int, site: Path, timeout: float = 30) -> None:
    """In the sandbox of process ``pid``, bind ``site`` (a path under :data:`STASH`)
    onto :data:`SITE` and detach the stash. Raises OSError with the reason."""
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(pid), str(site), str(SITE), str(STASH)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise OSError(f"the user's site could not be bound into the sandbox: "
                      f"{(done.stderr or done.stdout).strip() or f'exit {done.returncode}'}")


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _main(pid: str, source: str, target: str, stash: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    mount_ns = os.open(f"/proc/{int(pid)}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    owner = fcntl.ioctl(mount_ns, _NS_GET_USERNS)
    _check(libc.setns(owner, _CLONE_NEWUSER), "joining the sandbox's user namespace")
    _check(libc.setns(mount_ns, _CLONE_NEWNS), "joining the sandbox's mount namespace")
    os.chdir("/")
    if not os.path.isdir(target) or os.path.ismount(target):
        raise OSError(f"{target} is not an empty mount point in the sandbox")
    _check(libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None), f"binding {source}")
    _check(libc.umount2(stash.encode(), _MNT_DETACH), f"detaching {stash}")
    if os.path.ismount(stash) or (os.path.isdir(stash) and os.listdir(stash)):
        raise OSError(f"{stash} is still reachable in the sandbox")


if __name__ == "__main__":
    try:
        _main(*sys.argv[1:5])
    except (OSError, TypeError, ValueError) as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
