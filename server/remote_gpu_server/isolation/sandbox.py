"""Workers of a server that is not root, in bubblewrap sandboxes.

A server that is not root cannot give workers other uids. It starts each
worker under Debian's ``bwrap`` (bubblewrap) instead, in new user, mount,
pid, ipc and uts namespaces, with a filesystem built from an allow-list:

- read-only: the system (``/usr``, ``/etc``, ``/opt``, ``/sys`` and the
  top-level links or folders ``/bin``, ``/lib``, ...) and the server's Python
  environment (``sys.prefix``, the base interpreter, every ``sys.path``
  folder);
- read-write: the worker's own runtime folder (its connection file and
  sockets) and its session folder, its working directory; until its lease,
  the session root at a stash from which its user's site is then bound in,
  the stash itself taken away (see :mod:`.site_binder`);
- fresh: ``/proc`` of its own pid namespace, a minimal ``/dev`` plus the
  device files of the worker's own GPUs and the control files CUDA opens
  (see :mod:`.devices`; none for a worker on CPU slots), and size-limited
  tmpfs on ``/tmp`` and ``/dev/shm``;
- hidden: every file and folder of the server's that lies inside something
  bound above, wherever it is (:attr:`SandboxLayout.hidden`): its data
  folder (the store's folder: the store, the uid mapping, ``tls/``), every
  file its configuration names (``--certfile`` and ``--keyfile`` in
  ``/etc/rgpu``, say), and the runtime and session roots. A folder is
  covered by an empty tmpfs, and what the worker's Python needs inside it
  (a virtual environment beside the store) is bound back; a file is
  covered by ``/dev/null``. A system folder (``/etc``, ``/opt``, ...) is never
  covered whole: only the server's files in it are.

So a worker sees no other worker's files or processes and cannot signal
the server (it is not in the worker's pid namespace). The network is shared:
users may need it, and the worker's Jupyter channels are ``ipc://`` sockets
in its bound runtime folder (its data channel a socket pair it inherits).
``--die-with-parent`` ends the sandbox with the server.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .site_binder import SITE, STASH, SiteBinder, sandbox_pid

__all__ = ["SandboxLayout", "bubblewrap_argv", "check_bubblewrap", "check_site_binding", "find_bubblewrap",
           "python_paths"]

_SYSTEM = ("/usr", "/etc", "/opt", "/sys")
_FRESH = ("/tmp", "/dev/shm")
_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_NAMESPACES = ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
               "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session")


def find_bubblewrap() -> str | None:
    """The ``bwrap`` program on ``PATH``, or None."""
    return shutil.which("bwrap")


def check_bubblewrap(bwrap: str) -> str | None:
    """None if ``bwrap`` can make the namespaces workers need here, else why not."""
    argv = [bwrap, *_NAMESPACES, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--",
            sys.executable, "-c", "pass"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{bwrap} did not run: {exc}"
    if done.returncode != 0:
        return f"{bwrap} cannot create namespaces here: {done.stderr.strip() or done.returncode}"
    return None


def python_paths() -> list[Path]:
    """Every folder the worker's Python reads code from.

    The server's working directory is left out (``python -m`` puts it on
    ``sys.path``), unless this package is imported from there.
    """
    import remote_gpu_core
    import remote_gpu_server

    # The folders that hold the server's packages and the shared core (a worker imports both).
    ours = {Path(folder).resolve().parent for package in (remote_gpu_server, remote_gpu_core)
            for folder in package.__path__}
    paths = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                               os.path.dirname(os.path.realpath(sys.executable)))}
    paths |= {Path(p) for p in sys.path if p and os.path.exists(p) and os.path.abspath(p) != os.getcwd()}
    return sorted({p.resolve() for p in paths} | ours)


@dataclasses.dataclass(frozen=True)
class SandboxLayout:
    """What one worker's sandbox holds; see the module docstring."""

    #: The worker's runtime folder and session folder, bound read-write.
    writable: tuple[Path, ...]
    #: The server's files and folders, hidden where they lie inside a readable path.
    hidden: tuple[Path, ...] = ()
    #: Size in bytes of the /tmp and /dev/shm tmpfs; None: no limit.
    tmp_size: int | None = None
    #: The working directory.
    chdir: Path | None = None
    #: Device files bound in: (the host's file, its path in the sandbox).
    devices: tuple[tuple[Path, Path], ...] = ()
    readable: tuple[Path, ...] = dataclasses.field(default_factory=lambda: tuple(python_paths()))
    #: More folders bound read-write: (the host's folder, its path in the sandbox).
    binds: tuple[tuple[Path, Path], ...] = ()
    #: Empty folders made in the sandbox (mount points for later).
    dirs: tuple[Path, ...] = ()


def _nested(path: Path, roots: list[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def _inside(path: Path, roots: list[Path]) -> Path | None:
    """The deepest of ``roots`` that is ``path`` or holds it, or None."""
    holders = [root for root in roots if path.is_relative_to(root)]
    return max(holders, key=lambda root: len(root.parts)) if holders else None


def _hiding(layout: SandboxLayout, kept: list[Path]) -> list[str]:
    """The bubblewrap arguments that hide ``layout.hidden`` (see the module docstring)."""
    system = {Path("/"), *(Path(p) for p in _SYSTEM + _TOP_LEVEL)}
    paths = {Path(os.path.abspath(p)) for p in layout.hidden} | {Path(os.path.realpath(p)) for p in layout.hidden}
    folders = sorted((p for p in paths if p.is_dir() and not p.is_symlink() and p not in system),
                     key=lambda p: len(p.parts))
    files = sorted(p for p in paths if p.exists() and not p.is_dir())
    shown: list[Path] = list(kept)
    covered: list[Path] = []
    argv: list[str] = []

    def visible(path: Path) -> bool:  # a folder bound back is bound after its cover: it wins a tie
        shown_at, covered_at = _inside(path, shown), _inside(path, covered)
        return shown_at is not None and (covered_at is None or len(shown_at.parts) >= len(covered_at.parts))

    for folder in folders:
        if not visible(folder):
            continue
        argv += ["--tmpfs", str(folder)]
        covered.append(folder)
        needed = [p for p in layout.readable if p.is_relative_to(folder)]
        for path in needed:
            if not _nested(path, needed):
                argv += ["--ro-bind", str(path), str(path)]
                shown.append(path)
    for path in files:
        if visible(path):
            argv += ["--ro-bind", "/dev/null", str(path)]
    return argv


def bubblewrap_argv(bwrap: str, layout: SandboxLayout) -> list[str]:
    """The ``bwrap ... --`` prefix that starts a command in ``layout``'s sandbox."""
    # ipykernel would take bwrap's init (pid 1) for the adopter of an orphan
    # and exit; a parent pid of 1 tells it not to watch (--die-with-parent
    # does that job).
    argv = [bwrap, *_NAMESPACES, "--setenv", "JPY_PARENT_PID", "1"]
    for top in _TOP_LEVEL:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    readable = sorted({Path(p) for p in _SYSTEM if os.path.isdir(p)} | set(layout.readable),
                      key=lambda p: len(p.parts))
    kept = [p for p in readable if not _nested(p, readable)]  # a folder inside another comes with it
    # What lies in /tmp or /dev/shm (a named environment's worker code, a test's
    # virtual environment) is bound after their fresh tmpfs, which would cover it.
    in_tmp = [p for p in kept if any(p.is_relative_to(t) for t in _FRESH)]
    for path in kept:
        if path not in in_tmp:
            argv += ["--ro-bind", str(path), str(path)]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for source, target in layout.devices:
        argv += ["--dev-bind", str(source), str(target)]
    for tmp in _FRESH:
        if layout.tmp_size:
            argv += ["--size", str(layout.tmp_size)]
        argv += ["--tmpfs", tmp]
    for path in in_tmp:
        argv += ["--ro-bind", str(path), str(path)]
    argv += _hiding(layout, [*kept, *(Path(p) for p in _TOP_LEVEL if os.path.isdir(p) and not os.path.islink(p))])
    for path in layout.writable:
        argv += ["--bind", str(path), str(path)]
    for source, target in layout.binds:
        argv += ["--bind", str(source), str(target)]
    for folder in layout.dirs:
        argv += ["--dir", str(folder)]
    if layout.chdir is not None:
        argv += ["--chdir", str(layout.chdir)]
    return [*argv, "--"]


def check_site_binding(bwrap: str, binder: SiteBinder) -> str | None:
    """None if ``binder`` can bind a user's site into a started sandbox here (see
    :mod:`.site_binder`), else why not."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rgpu-site-probe-") as tmp:
        (Path(tmp) / "site").mkdir()
        (Path(tmp) / "site" / "probe").write_text("")
        layout = SandboxLayout(writable=(), binds=((Path(tmp), STASH),), dirs=(SITE,))
        check = (f"import os, sys; sys.stdin.readline(); "
                 f"print(os.listdir({str(SITE)!r}), os.listdir({str(STASH)!r}), sep='|')")
        argv = bubblewrap_argv(bwrap, layout) + [sys.executable, "-I", "-S", "-c",
                                                 f"print('ready', flush=True); {check}"]
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as sandbox:
            assert sandbox.stdin is not None and sandbox.stdout is not None
            try:
                if sandbox.stdout.readline().strip() != "ready":
                    return f"a sandbox did not start ({sandbox.stderr.read().strip() if sandbox.stderr else ''})"
                pid = sandbox_pid(sandbox.pid)
                if pid is None:
                    return "the sandbox's process could not be found"
                binder.bind(pid, STASH / "site")
                out, _ = sandbox.communicate("\n", timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                sandbox.kill()
                sandbox.communicate()
                return str(exc)
        if out.strip() != "['probe']|[]":
            return f"the site was not bound as it should be ({out.strip()})"
    return None
