"""A cgroup of its own for each worker, in every hierarchy that has a controller the server uses.

The server limits its workers with cgroup controllers (``memory``, see
:mod:`.memory_limits`; ``pids``, see :mod:`.process_limits`). :meth:`Cgroups.probe`
finds, once at start, where each wanted controller can be used:

1. **cgroup v2**, where the server may create groups with the controller
   under its own cgroup (a root server, or one that systemd delegated a
   subtree to: ``Delegate=yes``). The server's own process moves into a leaf
   of its own first when it is the only process of its cgroup, as delegation
   requires ("no internal processes").
2. **cgroup v1**, where the controller's hierarchy is mounted and the server
   may create groups in it.

Layout: ``<own cgroup>/rgpu-<server pid>/<worker name>`` in each hierarchy
used; on cgroup v2 one group carries every controller, on v1 each
controller's hierarchy has a group of the worker's. A group holds the worker
and every process it ever starts, even one that left its process group,
dropped its environment or forked twice: :meth:`WorkerCgroup.close` kills
what is left in it. Groups left behind by a server that died are emptied
and removed at the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["Cgroups", "WorkerCgroup", "own_group", "read_counter", "write_value"]

log = logging.getLogger("remote_gpu_server")


def write_value(path: Path, value: str) -> None:
    """Write ``value`` to a cgroup file in one write(2): cgroup files take a whole value per call."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_counter(path: Path, name: str) -> int:
    """The value of ``name N`` in a flat-keyed cgroup file; 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


#: How long the processes left in a worker's groups may take to die of SIGKILL.
#: The stop ladder has waited for them already; a process still there is stuck
#: in the kernel, and its slot drains (see remote_gpu_server.workers.drain).
KILL_WAIT = 2.0


def _tree(group: Path) -> list[Path]:
    """``group`` and the groups below it, the deepest first."""
    if not group.is_dir():
        return []
    below = [found for child in group.iterdir() if child.is_dir() for found in _tree(child)]
    return [*below, group]


def _empty_and_remove(*groups: tuple[Path, bool], timeout: float = KILL_WAIT) -> bool:
    """SIGKILL every process in ``groups`` (each ``(folder, has cgroup.kill)``, and
    the groups below them), wait for them all together, then remove the groups.
    False if a process would not die or a group could not be removed."""
    trees = [(folder, kill_file) for group, kill_file in groups for folder in _tree(group)]
    deadline = time.monotonic() + timeout
    ok = True
    while True:
        left = [(folder, kill_file, _pids(folder)) for folder, kill_file in trees]
        left = [entry for entry in left if entry[2]]
        if not left:
            break
        for folder, kill_file, pids in left:
            if kill_file and (folder / "cgroup.kill").exists():
                write_value(folder / "cgroup.kill", "1")
            else:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if time.monotonic() > deadline:
            for folder, _kill_file, pids in left:
                log.warning("processes %s in %s did not die", pids, folder)
            return False
        time.sleep(0.02)
    for folder, _kill_file in trees:
        for _ in range(50):  # the last exits may take a moment to leave the group
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        else:
            log.warning("could not remove the cgroup %s", folder)
            ok = False
    return ok


@dataclasses.dataclass(frozen=True)
class _Hierarchy:
    """Where a controller's worker groups go: this server's group in one hierarchy."""

    version: int
    base: Path  # <own cgroup>/rgpu-<server pid>


class WorkerCgroup:
    """One worker's groups; made by :meth:`Cgroups.make`.

    ``join`` (or None where the worker has no group) puts the calling
    process into every group of the worker: the server runs it in the child
    between fork and exec (Popen's ``preexec_fn``), so everything the worker
    ever starts is held. It makes only system calls and touches no lock,
    which is what makes it safe in the child of a threaded server.
    """

    def __init__(self, groups: dict[str, tuple[int, Path]] | None = None) -> None:
        self._groups = dict(groups or {})  # controller → (version, folder)
        self.join: Callable[[], None] | None = None
        procs = [os.fsencode(folder / "cgroup.procs") for folder in self.folders]
        if procs:
            def join() -> None:
                for path in procs:
                    fd = os.open(path, os.O_WRONLY)
                    os.write(fd, b"0")
                    os.close(fd)

            self.join = join

    def path(self, controller: str) -> Path | None:
        """The worker's group that has ``controller``, or None."""
        found = self._groups.get(controller)
        return found[1] if found is not None else None

    def version(self, controller: str) -> int:
        """1 or 2 for a controller the worker has, else 0."""
        found = self._groups.get(controller)
        return found[0] if found is not None else 0

    @property
    def folders(self) -> tuple[Path, ...]:
        """Each of its groups once: every one holds all of the worker's processes."""
        return tuple(dict.fromkeys(folder for _, folder in self._groups.values()))

    def close(self) -> None:
        """Kill whatever is left in the worker's groups and remove them; call after the kill."""
        versions = {folder: version for version, folder in self._groups.values()}
        self._groups = {}
        self.join = None
        _empty_and_remove(*((folder, version == 2) for folder, version in versions.items()))


class Cgroups:
    """Where this server may make cgroups for its workers; see the module docstring.

    Make it with :meth:`probe`; call :meth:`make` for each worker and
    :meth:`close` at the end, after every worker's group was closed.
    """

    def __init__(self, hierarchies: dict[str, _Hierarchy] | None = None,
                 reasons: dict[str, str] | None = None) -> None:
        self._hierarchies = dict(hierarchies or {})
        #: Why a wanted controller has no hierarchy here, by controller.
        self.reasons = dict(reasons or {})

    @classmethod
    def probe(cls, controllers: Iterable[str], *, pid: int | None = None, proc: Path = Path("/proc/self"),
              allow: bool = True) -> Cgroups:
        """Find a hierarchy for each of ``controllers`` (cgroup v2 first); ``allow``
        False finds none (the reason then says so)."""
        pid = os.getpid() if pid is None else pid
        found: dict[str, _Hierarchy] = {}
        reasons: dict[str, str] = {}
        for controller in controllers:
            if not allow:
                reasons[controller] = "cgroups are not used"
                continue
            tried = []
            for version in (2, 1):
                try:
                    found[controller] = _Hierarchy(version, _make_server_group(version, controller, pid, proc))
                    break
                except OSError as exc:
                    tried.append(f"cgroup v{version}: {exc.strerror or exc}")
            else:
                reasons[controller] = "; ".join(tried)
        return cls(found, reasons)

    def version(self, controller: str) -> int:
        """1 or 2 where ``controller`` can be used, else 0."""
        found = self._hierarchies.get(controller)
        return found.version if found is not None else 0

    def make(self, name: str) -> WorkerCgroup:
        """Worker ``name``'s groups, one in each hierarchy used (none: an empty
        WorkerCgroup); raises OSError, leaving nothing made behind."""
        groups: dict[str, tuple[int, Path]] = {}
        made: list[Path] = []
        try:
            for controller, hierarchy in self._hierarchies.items():
                folder = hierarchy.base / name
                if folder not in made:
                    folder.mkdir(mode=0o755)
                    made.append(folder)
                groups[controller] = (hierarchy.version, folder)
        except OSError:
            for folder in made:
                folder.rmdir()
            raise
        return WorkerCgroup(groups)

    def close(self) -> None:
        """Remove this server's groups; its workers' groups must be closed first."""
        bases = {h.base: h.version for h in self._hierarchies.values()}
        self._hierarchies = {}
        _empty_and_remove(*((base, version == 2) for base, version in bases.items()))


def _mounts(proc: Path) -> list[tuple[str, str, str, str]]:
    """``(root, mount point, fstype, super options)`` of every mount."""
    found = []
    for line in (proc / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((fields[3], fields[4].replace("\\040", " "), tail[0], tail[2]))
    return found


def own_group(version: int, proc: Path, controller: str = "memory") -> Path:
    """Where this process's cgroup is in the filesystem: in the v2 hierarchy, or
    in the v1 hierarchy of ``controller``."""
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 2 and controllers == "") or (version == 1 and controller in controllers.split(",")):
            break
    else:
        raise OSError(0, "this process is in no such hierarchy")
    for root, mount, fstype, options in _mounts(proc):
        if version == 2 and fstype == "cgroup2" or (
                version == 1 and fstype == "cgroup" and controller in options.split(",")):
            relative = path[len(root):] if path.startswith(root) and root != "/" else path
            return Path(mount) / relative.lstrip("/")
    raise OSError(0, "its hierarchy is not mounted")


def _make_server_group(version: int, controller: str, pid: int, proc: Path) -> Path:
    """Create ``<own cgroup>/rgpu-<pid>`` with ``controller`` usable below it."""
    own = own_group(version, proc, controller)
    if version == 2:
        if controller not in (own / "cgroup.controllers").read_text().split():
            raise OSError(0, f"the {controller} controller is not available in {own}")
        _enable_v2(own, pid, controller)
    base = own / f"rgpu-{pid}"
    made = not base.exists()
    base.mkdir(mode=0o755, exist_ok=True)
    try:
        if version == 2:
            write_value(base / "cgroup.subtree_control", f"+{controller}")
        elif not any(base.glob(f"{controller}.*")):
            raise OSError(0, f"{base} has no {controller} controller")
    except OSError:
        if made:
            base.rmdir()
        raise
    _remove_stale(own)  # only now: this server has the rights to
    return base


def _enable_v2(own: Path, pid: int, controller: str) -> None:
    """Let ``own``'s children use ``controller``, as cgroup v2 delegation does.

    A cgroup that has processes cannot enable a controller for its children
    (except the root): when this server is the only process in its cgroup,
    it moves into a leaf ``rgpu-server-<pid>`` first. It never moves anyone
    else's processes.
    """
    if controller in (own / "cgroup.subtree_control").read_text().split():
        return
    members = _pids(own)
    if members and members != [pid]:
        raise OSError(0, f"{own} holds other processes, so its children cannot get the {controller} "
                         "controller")
    if members:
        leaf = own / f"rgpu-server-{pid}"
        leaf.mkdir(mode=0o755, exist_ok=True)
        write_value(leaf / "cgroup.procs", str(pid))
    write_value(own / "cgroup.subtree_control", f"+{controller}")


def _remove_stale(own: Path) -> None:
    """Empty and remove groups left by servers that are no longer running."""
    for group in own.glob("rgpu-*"):
        found = re.fullmatch(r"rgpu-(?:server-)?(\d+)", group.name)
        if not found or not group.is_dir():
            continue
        try:
            os.kill(int(found.group(1)), 0)
            continue  # that server still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.info("removing %s, left by a server that is gone", group)
        _empty_and_remove((group, (group / "cgroup.kill").exists()))
