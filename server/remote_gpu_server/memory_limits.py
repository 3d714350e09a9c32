"""Host memory limits for workers: a cgroup each, else an rlimit.

:meth:`MemoryLimits.probe` picks, once at start, the first of:

1. **cgroup v2**, where the server may create cgroups with the memory
   controller under its own cgroup (a root server, or one that systemd
   delegated a subtree to). The server's own process moves into a leaf of
   its own first when it is the only process of its cgroup, as delegation
   requires ("no internal processes").
2. **cgroup v1**, where a memory hierarchy is mounted and the server may
   create groups in it.
3. **RLIMIT_DATA**, set by the worker itself at start (see
   :mod:`.confinement`). Not RLIMIT_AS: CUDA reserves far more address
   space than it uses, so an address-space limit breaks it; RLIMIT_DATA
   counts private writable memory (malloc, numpy, torch CPU tensors) and
   ignores those reservations. It is per process, so a worker's children
   each get as much, and pages of its tmpfs are not counted (the tmpfs
   size limits those).

A cgroup holds the worker and every process it starts, even one that left
its process group: :meth:`WorkerMemory.close` kills what is left in it. When
the kernel's OOM killer ends a worker for passing its limit,
:meth:`WorkerMemory.explain` says so ("out of host memory (limit 4 GiB)").

Layout: ``<own cgroup>/rgpu-<server pid>/<worker name>``. Groups that a
server which died left behind are emptied and removed at the next start.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MemoryControl", "MemoryLimits", "WorkerMemory", "fair_share", "format_size", "parse_size"]

log = logging.getLogger("remote_gpu_server")

#: Of the host's memory, the share the workers divide among themselves.
HOST_SHARE = 0.9
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class MemoryControl(enum.Enum):
    CGROUP_V2 = "cgroup v2"
    CGROUP_V1 = "cgroup v1"
    RLIMIT = "RLIMIT_DATA"
    NONE = "none"


def parse_size(text: str, *, minimum: int = 64 << 20, what: str = "a worker") -> int | None:
    """Bytes in ``"8G"``, ``"512MiB"``, ``"1.5 GB"`` (binary units); None for ``none``.

    Raises ValueError naming what is wrong; a size below ``minimum`` is too
    small for ``what`` (by default a worker's memory: at least 64M).
    """
    if text.strip().lower() in ("none", "off", "unlimited"):
        return None
    found = _SIZE.match(text)
    if not found:
        raise ValueError(f"{text!r} is not a size: write it like 8G, 512M or none")
    size = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if size < minimum:
        raise ValueError(f"{text!r} is too small for {what}: give it at least {format_size(minimum)}")
    return size


def format_size(size: float) -> str:
    """``4 GiB``, ``1.5 GiB``, ``512 MiB``, ``64 KiB``, ``300 bytes``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"


def fair_share(slots: int, total: int | None = None) -> int:
    """Each slot's share of the host's memory: :data:`HOST_SHARE` of it, divided."""
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * HOST_SHARE / max(1, slots))


def _write(path: Path, value: str) -> None:
    # One write(2) per value: cgroup files take a whole value per call.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _counter(path: Path, name: str) -> int:
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


def _empty_and_remove(group: Path, kill_file: bool, timeout: float = 5.0) -> bool:
    """SIGKILL every process in ``group`` (and below), then remove the groups."""
    children = [p for p in group.iterdir() if p.is_dir()] if group.is_dir() else []
    ok = all([_empty_and_remove(child, kill_file, timeout) for child in children])
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids(group)
        if not pids:
            break
        if kill_file and (group / "cgroup.kill").exists():
            _write(group / "cgroup.kill", "1")
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            log.warning("processes %s in %s did not die", pids, group)
            return False
        time.sleep(0.02)
    for _ in range(50):  # the last exits may take a moment to leave the group
        try:
            group.rmdir()
            return ok
        except FileNotFoundError:
            return ok
        except OSError:
            time.sleep(0.02)
    log.warning("could not remove the cgroup %s", group)
    return False


class WorkerMemory:
    """One worker's memory limit; made by :meth:`MemoryLimits.for_worker`.

    ``join`` (or None) puts the calling process into the worker's cgroup:
    the server runs it in the child between fork and exec (Popen's
    ``preexec_fn``), so everything the worker ever allocates is counted.
    It makes two system calls and touches no lock, which is what makes it
    safe in the child of a threaded server. ``data_limit`` is the RLIMIT_DATA
    the worker sets on itself, when no cgroup holds it.
    """

    def __init__(self, limit: int | None, group: Path | None = None, version: int = 0,
                 data_limit: int | None = None) -> None:
        self.limit = limit
        self.group = group
        self.data_limit = data_limit
        self._version = version
        self.join: Callable[[], None] | None = None
        if group is not None:
            procs = os.fsencode(group / "cgroup.procs")

            def join() -> None:
                fd = os.open(procs, os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)

            self.join = join

    @property
    def limit_text(self) -> str | None:
        return None if self.limit is None else format_size(self.limit)

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended a process of this worker."""
        if self.group is None:
            return False
        if self._version == 2:
            return _counter(self.group / "memory.events", "oom_kill") > 0
        return _counter(self.group / "memory.oom_control", "oom_kill") > 0

    def explain(self, returncode: int | None) -> str | None:
        """``out of host memory (limit 4 GiB)`` if that is how the worker ended."""
        if self.limit is not None and returncode == -signal.SIGKILL and self.oom_killed():
            return f"out of host memory (limit {self.limit_text})"
        return None

    def close(self) -> None:
        """Kill whatever is left in the worker's cgroup and remove it; call after the kill."""
        if self.group is not None:
            _empty_and_remove(self.group, kill_file=self._version == 2)
            self.group = None


class MemoryLimits:
    """The server's way to limit its workers' memory; see the module docstring.

    Make it with :meth:`probe`; call :meth:`for_worker` for each worker and
    :meth:`close` at the end.
    """

    def __init__(self, control: MemoryControl, per_slot: int | None, base: Path | None = None,
                 reason: str = "") -> None:
        self.control = control
        self.per_slot = per_slot
        self.base = base  # this server's group: <own cgroup>/rgpu-<pid>
        self.reason = reason

    @classmethod
    def probe(cls, per_slot: int | None, *, allow_cgroups: bool = True, pid: int | None = None,
              proc: Path = Path("/proc/self")) -> MemoryLimits:
        """The best control this server has; ``per_slot`` None means no limit."""
        if per_slot is None:
            return cls(MemoryControl.NONE, None, reason="--worker-memory none")
        pid = os.getpid() if pid is None else pid
        reasons = []
        if allow_cgroups:
            for version in (2, 1):
                try:
                    base = _make_server_group(version, pid, proc)
                except OSError as exc:
                    reasons.append(f"cgroup v{version}: {exc.strerror or exc}")
                    continue
                control = MemoryControl.CGROUP_V2 if version == 2 else MemoryControl.CGROUP_V1
                return cls(control, per_slot, base)
        return cls(MemoryControl.RLIMIT, per_slot, reason="; ".join(reasons))

    def describe(self) -> str:
        """One line for the log and ``/api/status``."""
        if self.per_slot is None:
            return "no memory limit"
        text = f"{format_size(self.per_slot)} per slot ({self.control.value})"
        return text + (f"; no cgroup: {self.reason}" if self.reason else "")

    def for_worker(self, name: str, slots: int) -> WorkerMemory:
        """The limit of a worker on ``slots`` slots: each slot's share, added up."""
        if self.per_slot is None:
            return WorkerMemory(None)
        limit = self.per_slot * max(1, slots)
        if self.control is MemoryControl.RLIMIT or self.base is None:
            return WorkerMemory(limit, data_limit=limit)
        group = self.base / name
        group.mkdir(mode=0o755)
        try:
            if self.control is MemoryControl.CGROUP_V2:
                _write(group / "memory.max", str(limit))
                for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if (group / knob).exists():
                        _write(group / knob, value)
                return WorkerMemory(limit, group, 2)
            _write(group / "memory.limit_in_bytes", str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():  # no swapping past it either
                _write(group / "memory.memsw.limit_in_bytes", str(limit))
            return WorkerMemory(limit, group, 1)
        except OSError:
            group.rmdir()
            raise

    def close(self) -> None:
        """Remove this server's group; its workers' groups must be closed first."""
        if self.base is not None:
            _empty_and_remove(self.base, kill_file=self.control is MemoryControl.CGROUP_V2)
            self.base = None


def _mounts(proc: Path) -> list[tuple[str, str, str, str]]:
    """``(root, mount point, fstype, super options)`` of every mount."""
    found = []
    for line in (proc / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            found.append((fields[3], fields[4].replace("\\040", " "), tail[0], tail[2]))
    return found


def _own_group(version: int, proc: Path) -> Path:
    """Where this process's cgroup is in the filesystem, for one hierarchy."""
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 2 and controllers == "") or (version == 1 and "memory" in controllers.split(",")):
            break
    else:
        raise OSError(0, "this process is in no such hierarchy")
    for root, mount, fstype, options in _mounts(proc):
        if version == 2 and fstype == "cgroup2" or (
                version == 1 and fstype == "cgroup" and "memory" in options.split(",")):
            relative = path[len(root):] if path.startswith(root) and root != "/" else path
            return Path(mount) / relative.lstrip("/")
    raise OSError(0, "its hierarchy is not mounted")


def _make_server_group(version: int, pid: int, proc: Path) -> Path:
    """Create ``<own cgroup>/rgpu-<pid>`` with the memory controller usable below it."""
    own = _own_group(version, proc)
    if version == 2:
        if "memory" not in (own / "cgroup.controllers").read_text().split():
            raise OSError(0, f"the memory controller is not available in {own}")
        _enable_memory_v2(own, pid)
    base = own / f"rgpu-{pid}"
    base.mkdir(mode=0o755, exist_ok=True)
    try:
        if version == 2:
            _write(base / "cgroup.subtree_control", "+memory")
        elif not (base / "memory.limit_in_bytes").exists():
            raise OSError(0, f"{base} has no memory controller")
    except OSError:
        base.rmdir()
        raise
    _remove_stale(own)  # only now: this server has the rights to
    return base


def _enable_memory_v2(own: Path, pid: int) -> None:
    """Let ``own``'s children use the memory controller, as cgroup v2 delegation does.

    A cgroup that has processes cannot enable a controller for its children
    (except the root): when this server is the only process in its cgroup,
    it moves into a leaf ``rgpu-server-<pid>`` first. It never moves anyone
    else's processes.
    """
    if "memory" in (own / "cgroup.subtree_control").read_text().split():
        return
    members = _pids(own)
    if members and members != [pid]:
        raise OSError(0, f"{own} holds other processes, so its children cannot get the memory controller")
    if members:
        leaf = own / f"rgpu-server-{pid}"
        leaf.mkdir(mode=0o755, exist_ok=True)
        _write(leaf / "cgroup.procs", str(pid))
    _write(own / "cgroup.subtree_control", "+memory")


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
        _empty_and_remove(group, kill_file=(group / "cgroup.kill").exists())
