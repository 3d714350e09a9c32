"""Host memory limits for workers: a memory cgroup each, else an rlimit.

:meth:`MemoryLimits.choose` picks, once at start, the first of:

1. a **memory cgroup** per worker, where :class:`.cgroups.Cgroups` found a
   hierarchy with the memory controller (cgroup v2, else v1). It counts
   everything the worker and its children hold: private memory, and the
   pages of memfd, SysV shared memory and tmpfs files they wrote;
2. **RLIMIT_DATA**, set by the worker itself at start (see
   :mod:`.confinement`). Not RLIMIT_AS: CUDA reserves far more address space
   than it uses, so an address-space limit breaks it; RLIMIT_DATA counts
   private writable memory (malloc, numpy, torch CPU tensors) and ignores
   those reservations. It is per process, so a worker's children each get
   as much, and shared pages are not counted at all: memfd
   (``memfd_create``), SysV shared memory and tmpfs files (the private
   tmpfs' sizes bound the last). A cell can hold as much memfd as the host
   has; :meth:`MemoryLimits.describe` says so, and why no cgroup could be
   had, in the log at start and in ``/api/status``.

When the kernel's OOM killer ends a worker for passing its cgroup's limit,
:meth:`WorkerMemory.explain` says so ("out of host memory (limit 4 GiB)").
"""

from __future__ import annotations

import enum
import os
import signal
from pathlib import Path

from remote_gpu_core.sizes import format_size

from .cgroups import Cgroups, WorkerCgroup, read_counter, write_value

__all__ = ["MIN_WORKER_MEMORY", "MemoryControl", "MemoryLimits", "WorkerMemory", "fair_share"]

#: The least memory a worker may be given (``--worker-memory``).
MIN_WORKER_MEMORY = 64 << 20

#: Of the host's memory, the share the workers divide among themselves.
HOST_SHARE = 0.9


class MemoryControl(enum.Enum):
    CGROUP_V2 = "cgroup v2"
    CGROUP_V1 = "cgroup v1"
    RLIMIT = "RLIMIT_DATA"
    NONE = "none"


def fair_share(slots: int, total: int | None = None) -> int:
    """Each slot's share of the host's memory: :data:`HOST_SHARE` of it, divided."""
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * HOST_SHARE / max(1, slots))


class WorkerMemory:
    """One worker's memory limit; made by :meth:`MemoryLimits.for_worker`.

    ``group`` is its memory cgroup (None where it has none); ``data_limit``
    the RLIMIT_DATA the worker sets on itself where no cgroup holds it.
    """

    def __init__(self, limit: int | None, group: Path | None = None, version: int = 0,
                 data_limit: int | None = None) -> None:
        self.limit = limit
        self.group = group
        self.data_limit = data_limit
        self._version = version

    @property
    def limit_text(self) -> str | None:
        return None if self.limit is None else format_size(self.limit)

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended a process of this worker."""
        if self.group is None:
            return False
        if self._version == 2:
            return read_counter(self.group / "memory.events", "oom_kill") > 0
        return read_counter(self.group / "memory.oom_control", "oom_kill") > 0

    def explain(self, returncode: int | None) -> str | None:
        """``out of host memory (limit 4 GiB)`` if that is how the worker ended."""
        if self.limit is not None and returncode == -signal.SIGKILL and self.oom_killed():
            return f"out of host memory (limit {self.limit_text})"
        return None


class MemoryLimits:
    """The server's way to limit its workers' memory; see the module docstring.

    Make it with :meth:`choose`; call :meth:`for_worker` for each worker.
    """

    def __init__(self, control: MemoryControl, per_slot: int | None, reason: str = "") -> None:
        self.control = control
        self.per_slot = per_slot
        self.reason = reason  # why there is no cgroup, where there is none

    @classmethod
    def choose(cls, per_slot: int | None, cgroups: Cgroups) -> MemoryLimits:
        """A memory cgroup where ``cgroups`` has the controller, else RLIMIT_DATA;
        ``per_slot`` None means no limit."""
        if per_slot is None:
            return cls(MemoryControl.NONE, None, reason="--worker-memory none")
        version = cgroups.version("memory")
        if version:
            return cls(MemoryControl.CGROUP_V2 if version == 2 else MemoryControl.CGROUP_V1, per_slot)
        return cls(MemoryControl.RLIMIT, per_slot, reason=cgroups.reasons.get("memory", ""))

    @property
    def counts_shared_pages(self) -> bool:
        """Whether memfd, SysV shared memory and tmpfs pages count against the limit."""
        return self.control in (MemoryControl.CGROUP_V2, MemoryControl.CGROUP_V1)

    def describe(self) -> str:
        """One line for the log and ``/api/status``."""
        if self.per_slot is None:
            return "no memory limit"
        text = f"{format_size(self.per_slot)} per slot ({self.control.value})"
        if self.counts_shared_pages:
            return text
        return (text + ": memfd, SysV shared memory and tmpfs pages are not counted, since no memory "
                f"cgroup could be had ({self.reason or 'unknown'}); delegate a cgroup v2 subtree with "
                "the memory controller to the server (systemd: Delegate=yes) to count them")

    def for_worker(self, cgroup: WorkerCgroup, slots: int) -> WorkerMemory:
        """The limit of a worker on ``slots`` slots (each slot's share, added up), in
        ``cgroup``'s memory group where it has one; raises OSError if the group
        refuses the limit."""
        if self.per_slot is None:
            return WorkerMemory(None)
        limit = self.per_slot * max(1, slots)
        group = cgroup.path("memory")
        if group is None:
            return WorkerMemory(limit, data_limit=limit)
        if cgroup.version("memory") == 2:
            write_value(group / "memory.max", str(limit))
            for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (group / knob).exists():
                    write_value(group / knob, value)
            return WorkerMemory(limit, group, 2)
        write_value(group / "memory.limit_in_bytes", str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():  # no swapping past it either
            write_value(group / "memory.memsw.limit_in_bytes", str(limit))
        return WorkerMemory(limit, group, 1)
