"""How many processes and threads a worker may run: a pids cgroup each, else RLIMIT_NPROC.

A fork bomb in one worker must not take the host's process table (``pid_max``,
``threads-max``, the server's own cgroup's ``pids.max``) from the server and
the other users. Linux counts every thread as well as every process against
these limits, and so does the worker's limit: torch alone starts a pool of
threads per CPU core, and a DataLoader a process per worker.

:meth:`ProcessLimits.choose` picks, once at start:

1. the **pids controller**: ``pids.max`` in the worker's own cgroup (v2 or
   v1, see :mod:`.cgroups`), exactly per worker; its ``pids.events`` counts
   the forks and thread starts it refused, which is how the worker knows to
   say so in the cell (see :mod:`.worker_errors`) and how a death after it
   is explained;
2. **RLIMIT_NPROC**, set by the worker itself at start (see
   :mod:`.confinement`). Linux counts it over every task of the worker's
   real uid in its user namespace, checked at each fork and thread start, so
   what it fences depends on the isolation (:func:`nproc_counting`): under a
   root server a user's dynamic uid is theirs alone, so the limit holds for
   all of that user's workers together; a bubblewrap sandbox is a user
   namespace of its own, so the limit is the worker's (Linux 5.14 and later;
   before, every sandbox counts as the server's uid); without isolation
   every worker and the server share one uid, so each worker's RLIMIT_NPROC
   is what all workers may run together. Root is not subject to it.

Past the limit, ``fork``, ``clone`` and thread starts fail with EAGAIN
("Resource temporarily unavailable"); nothing else in the worker changes.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import platform
import re
import signal
from pathlib import Path

from .cgroups import Cgroups, WorkerCgroup, own_group, read_counter, write_value

__all__ = ["DEFAULT_PER_SLOT", "MIN_PIDS", "NprocCounting", "ProcessControl", "ProcessLimits", "WorkerProcesses",
           "fair_pids", "host_capacity", "nproc_counting", "parse_pids"]

#: ``--worker-pids auto``: processes and threads per slot, where the host has room for them.
DEFAULT_PER_SLOT = 4096
#: The least a worker is given: an idle one runs about 15 threads.
MIN_PIDS = 32
#: Of the host's process table, the share the workers divide among themselves.
HOST_SHARE = 0.9
#: The flag, as the messages name it.
FLAG = "--worker-pids"


class ProcessControl(enum.Enum):
    CGROUP_V2 = "cgroup v2 pids"
    CGROUP_V1 = "cgroup v1 pids"
    RLIMIT = "RLIMIT_NPROC"
    NONE = "none"


def host_capacity(proc: Path = Path("/proc")) -> int:
    """How many tasks this host lets the server's processes have: the least of
    ``pid_max``, ``threads-max`` and any ``pids.max`` on the server's cgroup or
    its ancestors."""
    found = []
    for name in ("pid_max", "threads-max"):
        try:
            found.append(int((proc / "sys" / "kernel" / name).read_text()))
        except (OSError, ValueError):
            pass
    for version in (2, 1):
        try:
            group = own_group(version, proc / "self", "pids")
        except (OSError, ValueError):
            continue
        for folder in (group, *group.parents):
            try:
                found.append(int((folder / "pids.max").read_text()))
            except (OSError, ValueError):  # "max", or no such file above the mount
                continue
    return min(found) if found else 1 << 22


def fair_pids(slots: int, capacity: int | None = None) -> int:
    """``--worker-pids auto``: :data:`DEFAULT_PER_SLOT`, or each slot's share of
    :data:`HOST_SHARE` of the host's capacity where that is less (never below
    :data:`MIN_PIDS`)."""
    capacity = host_capacity() if capacity is None else capacity
    return max(MIN_PIDS, min(DEFAULT_PER_SLOT, int(capacity * HOST_SHARE / max(1, slots))))


def parse_pids(text: str, slots: int) -> int | None:
    """Processes and threads per slot in ``--worker-pids``: ``auto``, a number, or
    ``none`` (None). Raises ValueError naming what is wrong."""
    value = text.strip().lower()
    if value == "auto":
        return fair_pids(slots)
    if value in ("none", "off", "unlimited"):
        return None
    if not value.isdigit():
        raise ValueError(f"{text!r} is not a number of processes: write it like 4096, auto or none")
    if int(value) < MIN_PIDS:
        raise ValueError(f"{text!r} is too few for a worker (an idle one runs about 15 threads): give it "
                         f"at least {MIN_PIDS}")
    return int(value)


def _kernel_version(release: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


@dataclasses.dataclass(frozen=True)
class NprocCounting:
    """How RLIMIT_NPROC counts a worker's tasks here; see :func:`nproc_counting`."""

    #: In words; None where it cannot limit them.
    how: str | None
    #: Why it cannot, where it cannot.
    why_not: str = ""
    #: Every worker's tasks and the server's count together: a worker's
    #: RLIMIT_NPROC is then what all workers may run together.
    shared: bool = False


def nproc_counting(mode: str, euid: int | None = None, release: str | None = None) -> NprocCounting:
    """How RLIMIT_NPROC counts a worker's tasks under isolation ``mode`` (an
    :class:`.isolation.IsolationMode` value)."""
    euid = os.geteuid() if euid is None else euid
    release = platform.release() if release is None else release
    if mode == "uids":
        return NprocCounting("per user, over all of their workers")
    if mode == "bubblewrap":
        if _kernel_version(release) >= (5, 14):
            return NprocCounting("per worker: each sandbox is a user namespace of its own")
        return NprocCounting(None, f"Linux {release} counts RLIMIT_NPROC per uid, not per user namespace as "
                                   "5.14 and later do, and every sandbox runs as the server's uid")
    if euid == 0:
        return NprocCounting(None, "workers run as root, which RLIMIT_NPROC does not limit")
    return NprocCounting("over every process of the server's uid, the server's own included, so for all "
                         "workers together", shared=True)


class WorkerProcesses:
    """One worker's process limit; made by :meth:`ProcessLimits.for_worker`.

    ``events`` is its cgroup's ``pids.events`` (None where no cgroup holds it);
    ``nproc`` the RLIMIT_NPROC the worker sets on itself where none does.
    """

    def __init__(self, limit: int | None, events: Path | None = None, nproc: int | None = None) -> None:
        self.limit = limit
        self.events = events
        self.nproc = nproc

    def refusals(self) -> int:
        """How many forks and thread starts its cgroup refused (0 without one)."""
        return read_counter(self.events, "max") if self.events is not None else 0

    def explain(self, returncode: int | None) -> str | None:
        """Why the worker ended, where it had reached its limit before it did."""
        if self.limit is None or returncode in (0, None) or not self.refusals():
            return None
        if returncode is not None and returncode < 0:
            try:
                how = f"signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"signal {-returncode}"
        else:
            how = f"exit code {returncode}"
        return (f"{how}, after it reached its process limit ({self.limit} processes and threads, "
                f"{FLAG}): it could not start another process or thread")


class ProcessLimits:
    """The server's way to limit its workers' processes; see the module docstring.

    Make it with :meth:`choose`; call :meth:`for_worker` for each worker.
    """

    def __init__(self, control: ProcessControl, per_slot: int | None, reason: str = "",
                 counting: NprocCounting = NprocCounting(None), slots: int = 1) -> None:
        self.control = control
        self.per_slot = per_slot
        self.reason = reason  # why there is no pids cgroup, where there is none
        #: How RLIMIT_NPROC counts here (also for a worker whose cgroup could not be made).
        self.counting = counting
        #: The server's slots: what all workers together may hold.
        self.slots = slots

    @classmethod
    def choose(cls, per_slot: int | None, cgroups: Cgroups, counting: NprocCounting,
               slots: int = 1) -> ProcessLimits:
        """The pids controller where ``cgroups`` has it, else RLIMIT_NPROC where it
        can fence (``counting``, from :func:`nproc_counting`), else none; ``slots``:
        the server's."""
        if per_slot is None:
            return cls(ProcessControl.NONE, None, f"{FLAG} none", counting, slots)
        version = cgroups.version("pids")
        if version:
            return cls(ProcessControl.CGROUP_V2 if version == 2 else ProcessControl.CGROUP_V1, per_slot,
                       counting=counting, slots=slots)
        reason = cgroups.reasons.get("pids", "")
        control = ProcessControl.RLIMIT if counting.how is not None else ProcessControl.NONE
        return cls(control, per_slot, reason, counting, slots)

    def describe(self) -> str:
        """One line for the log and ``/api/status``."""
        if self.per_slot is None:
            return "no process limit"
        if self.control is ProcessControl.NONE:
            return f"no process limit: no pids cgroup ({self.reason or 'unknown'}), and {self.counting.why_not}"
        text = f"{self.per_slot} processes and threads per slot ({self.control.value}"
        if self.control is ProcessControl.RLIMIT:
            return f"{text}, {self.counting.how}; no pids cgroup: {self.reason or 'unknown'})"
        return text + ")"

    def crowding(self, capacity: int | None = None) -> str | None:
        """A warning where all workers together may take more than :data:`HOST_SHARE`
        of the host's process table (an explicit ``--worker-pids``), else None."""
        if self.per_slot is None or self.control is ProcessControl.NONE:
            return None
        capacity = host_capacity() if capacity is None else capacity
        total = self.per_slot * self.slots
        if total <= capacity * HOST_SHARE:
            return None
        return (f"{FLAG} {self.per_slot}: the workers of {self.slots} slot(s) may run {total} processes and "
                f"threads together, more than {HOST_SHARE:.0%} of the {capacity} this host lets the server "
                f"have; fork bombs in them could leave the server unable to start a thread ({FLAG} auto "
                "divides the host's share)")

    def for_worker(self, cgroup: WorkerCgroup, slots: int) -> WorkerProcesses:
        """The limit of a worker on ``slots`` slots, in ``cgroup``'s pids group where it
        has one, else as RLIMIT_NPROC where that fences; raises OSError if the group
        refuses the limit."""
        if self.per_slot is None:
            return WorkerProcesses(None)
        limit = self.per_slot * max(1, slots)
        group = cgroup.path("pids")
        if group is not None:
            write_value(group / "pids.max", str(limit))
            return WorkerProcesses(limit, events=group / "pids.events")
        if self.counting.how is not None:
            return WorkerProcesses(limit, nproc=self.per_slot * self.slots if self.counting.shared else limit)
        return WorkerProcesses(None)
