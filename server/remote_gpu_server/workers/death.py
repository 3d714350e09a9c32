"""Why a worker died, in one line, with the user's line of code where it can be known.

The worker enables :mod:`faulthandler` at start into a file of its runtime
folder (``$RGPU_FAULTS``, see :mod:`~remote_gpu_server.worker_process.kernel`): on a fatal signal
(SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) Python writes the signal and every
thread's Python frames there before the process dies. When a worker dies, its
launcher reads the file (:func:`read_report`), and :func:`describe` turns the
return code, the report and what else is known into the one line users see:

- a fatal signal, with the line of the cell that was running when a frame of
  a cell is in the report: ``Segmentation fault (signal SIGSEGV) at line 3 of
  the cell: ctypes.string_at(0)``;
- out of host memory: the isolation's memory limit says so with the limit
  (:meth:`.memory_limits.WorkerMemory.explain`); a SIGKILL while the host's
  own OOM killer killed something (``oom_kill`` of ``/proc/vmstat`` grew) says
  the host most likely ran out of memory;
- a plain exit (``os._exit(N)``, ``exit()`` in a C extension): the exit code.

The GPU's part (an Xid error NVML reported while the worker ran) is added by
the caller (see :mod:`.xid`). The report is written by the user's own
process, so only the parsed signal, file names, line numbers and function
names are ever shown, and the file is opened without following links.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import stat
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FAULT_FILE", "FAULT_VAR", "Fault", "Frame", "describe", "host_oom", "host_oom_kills",
           "parse_report", "read_report"]

#: The environment variable that tells a worker where to write its fault report.
FAULT_VAR = "RGPU_FAULTS"
#: The report's file name in the worker's runtime folder.
FAULT_FILE = "faults"
#: The most of a report that is read.
MAX_REPORT = 64 * 1024
#: The longest line of code quoted in a cause.
MAX_CODE = 100

_FATAL = re.compile(r"^Fatal Python error: (.+?)\s*$", re.MULTILINE)
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+", re.IGNORECASE)
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<function>\S+)')
#: A cell's file name: ipykernel's ``.../ipykernel_PID/HASH.py``, IPython's ``<ipython-input-N-...>``.
_IPYKERNEL_CELL = re.compile(r"ipykernel_\d+[/\\](?P<hash>\d+)\.py$")
_IPYTHON_CELL = re.compile(r"^<ipython-input-(?P<count>\d+)-")
_ERRORS = {"Segmentation fault": signal.SIGSEGV, "Aborted": signal.SIGABRT, "Bus error": signal.SIGBUS,
           "Floating point exception": signal.SIGFPE, "Illegal instruction": signal.SIGILL}


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str


@dataclasses.dataclass(frozen=True)
class Fault:
    """A parsed faulthandler report: the error (``Segmentation fault``), the
    crashing thread's frames and then the other threads', innermost first."""

    error: str
    frames: tuple[Frame, ...]
    other_frames: tuple[Frame, ...] = ()


def read_report(path: Path) -> str | None:
    """The report at ``path`` (at most :data:`MAX_REPORT` bytes), or None if
    there is none; a link or anything but a regular file is not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: not a report
            return None
        text = os.read(fd, MAX_REPORT).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return text if text.strip() else None


def parse_report(text: str | None) -> Fault | None:
    """The fault in a faulthandler report; None when it holds none."""
    if not text:
        return None
    found = _FATAL.search(text)
    if found is None:
        return None
    error = found.group(1)[:80]
    current: list[Frame] = []
    others: list[Frame] = []
    target: list[Frame] | None = None
    for line in text[found.end():].splitlines():
        thread = _THREAD.match(line)
        if thread is not None:
            target = current if thread.group(1).lower().startswith("current") and not current else others
            continue
        frame = _FRAME.match(line)
        if frame is not None and target is not None:
            target.append(Frame(frame.group("file")[-300:], int(frame.group("line")),
                                frame.group("function")[:100]))
    return Fault(error, tuple(current), tuple(others))


def host_oom_kills() -> int | None:
    """How many processes the host's OOM killer has killed since boot (None: unknown)."""
    try:
        with open("/proc/vmstat") as vmstat:
            for line in vmstat:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def host_oom(returncode: int | None, kills_at_start: int | None) -> str | None:
    """What a SIGKILL most likely was when the host's OOM killer killed something
    while the worker ran (its count in ``/proc/vmstat`` grew), else None."""
    if returncode != -signal.SIGKILL or kills_at_start is None:
        return None
    now = host_oom_kills()
    if now is None or now <= kills_at_start:
        return None
    return "signal SIGKILL, most likely from the host's OOM killer: the host ran out of memory"


def _cell_hash(code: str) -> str | None:
    """The number in the file name ipykernel gives a cell of ``code``."""
    try:
        from ipykernel.compiler import get_tmp_hash_seed, murmur2_x86
    except ImportError:
        return None
    return str(murmur2_x86(code, get_tmp_hash_seed()))


def _quote(line: str) -> str:
    line = line.strip()
    return line if len(line) <= MAX_CODE else line[: MAX_CODE - 1] + "…"


def _where(fault: Fault, cells: Sequence[tuple[int | None, str]]) -> str:
    """``at line 3 of the cell: CODE``, or where else the fault happened."""
    frames = fault.frames + fault.other_frames
    hashes: dict[str, tuple[int, int | None, str]] = {}
    for index, (count, code) in enumerate(reversed(cells)):
        digest = _cell_hash(code)
        if digest is not None:
            hashes.setdefault(digest, (index, count, code))
    for frame in frames:
        known: tuple[int, int | None, str] | None = None
        ipykernel_cell = _IPYKERNEL_CELL.search(frame.file)
        if ipykernel_cell is not None:
            known = hashes.get(ipykernel_cell.group("hash"))
        ipython_cell = _IPYTHON_CELL.match(frame.file)
        if ipython_cell is not None:
            known = next(((i, c, code) for i, (c, code) in enumerate(reversed(cells))
                          if c == int(ipython_cell.group("count"))), None)
        if known is None and (ipykernel_cell or ipython_cell):
            return f"at line {frame.line} of an earlier cell"
        if known is None:
            continue
        index, count, code = known
        lines = code.splitlines()
        text = _quote(lines[frame.line - 1]) if 0 < frame.line <= len(lines) else ""
        which = "the cell" if index == 0 else (f"cell [{count}]" if count else "an earlier cell")
        return f"at line {frame.line} of {which}" + (f": {text}" if text else "")
    if fault.frames:
        inner = fault.frames[0]
        return f"in {inner.function} ({os.path.basename(inner.file)}, line {inner.line})"
    return ""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def describe(returncode: int | None, *, explained: str | None = None, report: str | None = None,
             cells: Sequence[tuple[int | None, str]] = ()) -> str:
    """How a worker ended, in one line (no final period).

    ``explained``: what its launcher or isolation knows better (out of host
    memory, a node that went away); ``report``: its faulthandler report;
    ``cells``: ``(execution count, code)`` of the cells it ran, oldest first,
    the running one last.
    """
    if explained:
        return explained
    fault = parse_report(report)
    if fault is not None:
        signum = -returncode if returncode is not None and returncode < 0 else _ERRORS.get(fault.error)
        what = fault.error + (f" (signal {_signal_name(signum)})" if signum else "")
        where = _where(fault, cells)
        return f"{what} {where}" if where else what
    if returncode is None:
        return "an unknown cause"
    if returncode < 0:
        name = _signal_name(-returncode)
        if -returncode == signal.SIGKILL:
            return f"signal {name}: something outside the worker killed it"
        return f"signal {name}"
    return f"exit code {returncode} (os._exit, or exit() in C code)"
