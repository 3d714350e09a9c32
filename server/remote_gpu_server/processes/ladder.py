"""The stop ladder: SIGTERM to every process a worker started, SIGKILL after a grace.

Killing a worker's process group misses what its user's code started in a
session of its own (``setsid``, ``subprocess.Popen(start_new_session=True)``,
a daemon that forked twice), and such a process can keep GPU memory long
after the lease ended. :func:`stop` finds a worker's processes four ways and
takes the union:

- its **process tree**: the worker's main process and its descendants, walked
  with psutil before anything is signalled (a ``setsid`` child keeps its
  parent; it is orphaned only once the worker dies);
- its **cgroups** (cgroup v2, or each v1 hierarchy it has a group in, see
  :mod:`.cgroups`): everything that ever started inside them, however it
  left the tree;
- its **namespaces**, where no cgroup holds it: a worker of a root server
  has a mount namespace of its own (see :mod:`.confinement`), which its
  children inherit and which a process without privileges cannot leave
  except into a new user namespace. Every process of the worker's uids in
  one of its namespaces is the worker's, even orphaned (a double fork) with
  an environment it emptied (``env -i``), and none of the same user's other
  workers' is (a user's dynamic uid is shared by all their leases);
- its **mark**, where no cgroup holds it: every worker has
  ``RGPU_WORKER=<mark>`` in its environment, which its children inherit;
  processes of the worker's uids that carry the mark belong to it even when
  orphaned. It is all there is for a worker that runs as the server's user
  with no cgroup (``--no-isolation``), and a process can drop it.

Then: SIGTERM to all of them; wait up to ``grace`` seconds for them to end;
look again (a process may have forked meanwhile); SIGKILL to what is left
(``cgroup.kill`` on cgroup v2). The pids found are returned: the drain check
(:mod:`.drain`) asks afterwards whether any of them still holds the slot.

Never signalled: this server, its ancestors, and any process that is
neither the worker's nor in its namespaces nor carries its mark. Runs in a
thread (it sleeps while it waits); a process that is already gone is
skipped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = ["MARK_VAR", "NAMESPACES", "Scope", "in_namespaces", "members", "own_namespaces", "stop"]

log = logging.getLogger("remote_gpu_server")

#: The environment variable that marks a worker's processes.
MARK_VAR = "RGPU_WORKER"
#: How often the ladder looks whether the signalled processes have ended.
POLL = 0.02
#: After SIGKILL, how long to wait for the processes to go (a process stuck
#: in the kernel may never go: the drain check then holds its slot out).
KILL_WAIT = 2.0
#: The kinds of namespace a worker may have of its own (``/proc/PID/ns/<kind>``).
NAMESPACES = ("mnt", "ipc", "net", "uts", "cgroup", "time")


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where one worker's processes are.

    ``root``: its main process (None if it never started); ``cgroups``: its
    cgroups' folders, where it has any; ``mark``: the value of
    :data:`MARK_VAR` it was started with (None: do not look for marks);
    ``namespaces``: ``(kind, inode)`` of the namespaces it has of its own
    (see :func:`own_namespaces`); ``uids``: the uids whose processes are
    looked at for the mark and the namespaces (empty: every uid this server
    may read).
    """

    root: int | None
    cgroups: tuple[Path, ...] = ()
    mark: str | None = None
    uids: frozenset[int] = frozenset()
    namespaces: frozenset[tuple[str, int]] = frozenset()


def _protected() -> set[int]:
    """This process and its ancestors: never signalled."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _cgroup_pids(groups: tuple[Path, ...]) -> list[int]:
    pids: list[int] = []
    for group in groups:
        for procs in [group / "cgroup.procs", *group.glob("*/cgroup.procs")]:
            try:
                pids += [int(p) for p in procs.read_text().split()]
            except (OSError, ValueError):
                continue
    return pids


def _namespace(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def own_namespaces(pid: int) -> frozenset[tuple[str, int]]:
    """``(kind, inode)`` of each namespace of process ``pid`` that this process
    does not share (empty if it is gone)."""
    found = set()
    for kind in NAMESPACES:
        inode = _namespace(pid, kind)
        if inode is not None and inode != _namespace("self", kind):
            found.add((kind, inode))
    return frozenset(found)


def in_namespaces(pid: int, namespaces: frozenset[tuple[str, int]]) -> bool:
    """Process ``pid`` is in one of ``namespaces`` (``(kind, inode)``)."""
    return any(_namespace(pid, kind) == inode for kind, inode in namespaces)


def _belonging(mark: str | None, namespaces: frozenset[tuple[str, int]], uids: frozenset[int]) -> list[int]:
    """Processes of ``uids`` that carry ``mark`` or are in one of ``namespaces``."""
    # Never one this process shares (a namespace noted before the worker made its own).
    namespaces = frozenset(n for n in namespaces if n[1] != _namespace("self", n[0]))
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if uids and proc.info["uids"] is not None and proc.info["uids"].real not in uids:
                continue
            if in_namespaces(proc.pid, namespaces):
                found.append(proc.pid)
            elif mark and proc.environ().get(MARK_VAR) == mark:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def members(scope: Scope) -> dict[int, psutil.Process]:
    """The worker's live processes now, by pid (see the module docstring)."""
    found: dict[int, psutil.Process] = {}

    def add(pids: Iterable[int]) -> None:
        for pid in pids:
            if pid in found:
                continue
            try:
                found[pid] = psutil.Process(pid)
            except psutil.Error:
                continue

    if scope.root is not None:
        try:
            root = psutil.Process(scope.root)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    add(_cgroup_pids(scope.cgroups))
    if scope.mark or scope.namespaces:
        add(_belonging(scope.mark, scope.namespaces, scope.uids))
    for pid in _protected():
        found.pop(pid, None)
    return found


def _alive(proc: psutil.Process) -> bool:
    # A zombie holds no memory: it only waits for its parent to read its status
    # (the server reaps its own child later, and psutil must not: that would
    # take the exit status away from jupyter_client).
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs: Iterable[psutil.Process], signum: int) -> None:
    for proc in procs:
        try:
            if proc.is_running():
                proc.send_signal(signum)
        except psutil.Error:
            continue


def _wait(procs: dict[int, psutil.Process], timeout: float) -> dict[int, psutil.Process]:
    """The processes still alive after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = {pid: p for pid, p in procs.items() if _alive(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(POLL)
        alive = {pid: p for pid, p in alive.items() if _alive(p)}
    return alive


def stop(scope: Scope, grace: float, *, name: str = "worker") -> frozenset[int]:
    """Stop every process of ``scope``: SIGTERM, ``grace`` seconds, SIGKILL.

    Returns the pids of every process found (alive or not by now). With
    ``grace`` 0 the processes get SIGKILL at once.
    """
    found = members(scope)
    every = dict(found)
    if grace > 0 and found:
        signalled = time.monotonic()
        _signal(found.values(), signal.SIGTERM)
        left = _wait(found, grace)
        waited = time.monotonic() - signalled
        # Children forked during the grace and new cgroup members; those
        # signalled already are either in ``left`` or ended (a zombie of an
        # ended one still shows here until its parent reaps it).
        again = members(scope)
        every.update(again)
        new = {pid: p for pid, p in again.items() if pid not in found and _alive(p)}
        if left:
            log.info("%s: %d process(es) still ran %.1f s after SIGTERM: SIGKILL to %s", name, len(left),
                     waited, ", ".join(str(p) for p in sorted(left)))
        if new:
            log.info("%s: %d process(es) started while the others were stopping: SIGKILL to %s", name,
                     len(new), ", ".join(str(p) for p in sorted(new)))
        found = {**left, **new}
    if found:
        _signal(found.values(), signal.SIGKILL)
        for group in scope.cgroups:
            if (group / "cgroup.kill").exists():
                try:
                    fd = os.open(group / "cgroup.kill", os.O_WRONLY)
                    try:
                        os.write(fd, b"1")
                    finally:
                        os.close(fd)
                except OSError:
                    pass
        left = _wait(found, KILL_WAIT)
        if left:
            log.warning("%s: process(es) %s did not end on SIGKILL (stuck in the kernel?)", name,
                        ", ".join(str(p) for p in sorted(left)))
    return frozenset(every)
