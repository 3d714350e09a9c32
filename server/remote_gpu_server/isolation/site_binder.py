"""Bind a user's site into a warm bubblewrap sandbox at lease time.

A sandbox starts before its user is known, and a server that is not root
cannot mount a folder of the host into another mount namespace (the
kernel refuses a bind whose source is outside the caller's namespace). It
can act inside a namespace it owns, though: bubblewrap's user namespace is
the server's, so a process of the server's that joins the sandbox's user
and mount namespaces may mount there, from what the sandbox itself holds.

So a warm sandbox starts with the session root bound at :data:`STASH`
(only the server's code runs in it before a lease) and an empty
:data:`SITE` folder. At lease time :meth:`SiteBinder.bind` asks a
program of its own, this file, started once (joining a namespace needs a
process of one thread; the server has many), to fork a child that joins
the sandbox's namespaces, binds the user's site from the stash
onto :data:`SITE`, and detaches the stash, so that nothing of another user
is reachable from then on; it fails (and the worker must not be leased)
unless the stash is gone. The worker, which has no capability left, can
neither undo the bind nor mount anything. :func:`.sandbox.check_site_binding`
checks once at the server's start that this works on the host. A bind
takes a fork (a few milliseconds), not a Python start (25-45 ms here).

This file runs as a program with the standard library only.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["SITE", "STASH", "SiteBinder", "sandbox_pid"]

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


class SiteBinder:
    """The program that binds sites into sandboxes (see the module docstring):
    started at the first :meth:`bind`, ended by :meth:`close`. Thread-safe."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def bind(self, pid: int, site: Path, timeout: float = 30) -> None:
        """In the sandbox of process ``pid``, bind ``site`` (a path under :data:`STASH`)
        onto :data:`SITE` and detach the stash. Raises OSError with the reason."""
        request = json.dumps([pid, str(site), str(SITE), str(STASH)]) + "\n"
        with self._lock:
            for attempt in (1, 2):  # once more with a new program, if the old one is gone
                process = self._start()
                assert process.stdin is not None and process.stdout is not None
                try:
                    process.stdin.write(request)
                    process.stdin.flush()
                    line = process.stdout.readline()
                except OSError:
                    line = ""
                if line:
                    break
                self._stop()
            reply = json.loads(line) if line else {"error": "the program that binds sites ended"}
        if reply.get("error"):
            raise OSError(f"the user's site could not be bound into the sandbox: {reply['error']}")

    def _start(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self._process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.communicate()

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.communicate("")  # end of input: it exits


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


def _serve() -> None:
    """Answer each request line (``[pid, source, target, stash]``) with
    ``{"error": null|"why"}``, each done by a child of its own."""
    for line in sys.stdin:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read)
            try:
                _main(*json.loads(line))
                code, why = 0, b""
            except Exception as exc:  # the child's last word, whatever it was
                code, why = 1, str(exc).encode()
            os.write(write, why)
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            why_text = pipe.read().decode(errors="replace")
        _, status = os.waitpid(child, 0)
        error = None if os.waitstatus_to_exitcode(status) == 0 else (why_text or f"status {status}")
        sys.stdout.write(json.dumps({"error": error}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
