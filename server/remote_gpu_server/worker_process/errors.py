"""What a worker adds to its user's errors, and the report it leaves when it dies.

This module runs inside the worker (see :mod:`.kernel`) and imports
only the standard library at module level (torch where it is installed,
lazily).

- :func:`enable_fault_report` points :mod:`faulthandler` at the file the
  server named in ``$RGPU_FAULTS``: on a fatal signal Python writes the
  signal and every thread's frames there, and the server reads it when the
  worker is gone (:mod:`.death`).
- :func:`install` makes three errors say more, in the cell, without ending
  the session: a ``MemoryError`` that hit the worker's own memory limit says
  so with the limit; a CUDA out-of-memory error says how much GPU memory
  this session holds and how much is free on the GPU, so the user knows
  whether to free their own tensors or wait for the GPU; a process or thread
  that could not start ("Resource temporarily unavailable") says that the
  worker reached its process limit (:class:`ProcessLimit`). Where the
  worker's cgroup counts the refusals, a cell that reached the limit in a
  child process (a shell's fork bomb) gets a line saying so too.
"""

from __future__ import annotations

import importlib.util
import errno
import os
import sys
import traceback
from typing import Any

from remote_gpu_core.sizes import format_size

__all__ = ["ProcessLimit", "cuda_memory_summary", "enable_fault_report", "install"]

#: The environment variable naming the fault report's file (the server's :data:`.death.FAULT_VAR`).
FAULT_VAR = "RGPU_FAULTS"

_report: Any = None  # the open report file: faulthandler writes to its descriptor


def enable_fault_report() -> None:
    """Send faulthandler's report of a fatal signal to ``$RGPU_FAULTS``, if set.

    Call after ipykernel's initialisation (which redirects faulthandler to
    its own default) and before any user code: the file is opened now, while
    the worker still may (it may lose the right to its runtime folder when it
    becomes its user's).
    """
    global _report
    path = os.environ.pop(FAULT_VAR, None)
    if not path:
        return
    import faulthandler

    try:
        _report = open(path, "w", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o600))
    except OSError:
        return
    faulthandler.enable(file=_report, all_threads=True)


def cuda_memory_summary() -> str:
    """``this session holds 12 GiB of GPU 0 (PyTorch's cache included); 1.2 GiB of
    80 GiB are free on it``, one clause per visible GPU; "" without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
        parts = []
        for device in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(device)
            held = torch.cuda.memory_reserved(device)
            parts.append(f"this session holds {format_size(held)} of GPU {device} (PyTorch's cache included); "
                         f"{format_size(free)} of {format_size(total)} are free on it")
        return "; ".join(parts)
    except Exception:  # reading the memory must never hide the user's error
        return ""


def _cuda_oom_type() -> type[BaseException] | None:
    """torch's CUDA out-of-memory error, where the worker has imported torch
    (a worker that has not cannot meet one; torch is not imported for this)."""
    torch = sys.modules.get("torch")
    return None if torch is None else getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)


#: Where in a traceback a process is started: its innermost frame's function
#: (subprocess, multiprocessing), or a call in its line (``os.fork()`` is C code).
_START_FUNCTIONS = {"_execute_child", "_launch", "spawnv_passfds"}
_START_CALLS = ("fork(", "forkpty(", "posix_spawn")


class ProcessLimit:
    """What the worker knows of its process limit: ``limit`` processes and
    threads, and its cgroup's ``events`` file (``pids.events``), where one
    counts the refusals.

    Make it before the worker becomes its user's: the file is opened now,
    while the worker still may (its cgroup's folder is the server's).
    """

    def __init__(self, limit: int, events: str | None = None) -> None:
        self.limit = limit
        self.events: int | None = None  # the open file
        if events is not None:
            try:
                self.events = os.open(events, os.O_RDONLY)
            except OSError:
                pass
        self._seen = self._refusals()

    def _refusals(self) -> int:
        if self.events is None:
            return 0
        try:
            for line in os.pread(self.events, 4096, 0).decode().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def refused_since(self) -> bool:
        """Whether the cgroup refused a fork or thread start since the last call."""
        now = self._refusals()
        refused, self._seen = now > self._seen, now
        return refused

    @property
    def text(self) -> str:
        return (f"this worker reached its process limit ({self.limit} processes and threads, "
                "rgpu serve --worker-pids)")

    def explains(self, value: BaseException, tb: Any) -> bool:
        """Whether ``value`` is a process or thread that could not start for the limit.

        Where the cgroup counts refusals, only if it refused one during the
        cell; elsewhere (RLIMIT_NPROC), if the error came from starting one.
        """
        if isinstance(value, RuntimeError) and "can't start new thread" in str(value):
            started = True
        elif isinstance(value, OSError) and value.errno == errno.EAGAIN:
            frames = traceback.extract_tb(tb)
            started = bool(frames) and (frames[-1].name in _START_FUNCTIONS
                                        or any(call in (frames[-1].line or "") for call in _START_CALLS))
        else:
            return False
        if self.events is not None:
            return self.refused_since()
        return started


def install(shell: Any, limit_text: str | None, processes: ProcessLimit | None = None) -> None:
    """Make ``shell`` explain host and CUDA out-of-memory errors and the process
    limit (see the module docstring).

    ``limit_text``: the worker's own host memory limit as people read it
    (``4 GiB``) where the worker limits itself (RLIMIT_DATA), else None;
    ``processes``: its process limit, if it has one.
    """
    types: list[type[BaseException]] = []
    if limit_text:
        types.append(MemoryError)
    if importlib.util.find_spec("torch") is not None:
        types.append(RuntimeError)  # torch.cuda.OutOfMemoryError's base, once a cell imported torch
    if processes is not None:
        types += [OSError, RuntimeError]
        if processes.events is not None:
            def after_cell(result: Any) -> None:
                if processes.refused_since():
                    print(f"[remote-gpu] {processes.text}: a process or thread this cell tried to start "
                          "failed with 'Resource temporarily unavailable'. Processes it left running keep "
                          "counting; restart the worker to end them.", file=sys.stderr, flush=True)

            shell.events.register("post_run_cell", after_cell)
    if not types:
        return

    def handler(shell: Any, etype: type[BaseException], value: BaseException, tb: Any,
                tb_offset: int | None = None) -> Any:
        text = str(value)
        cuda_oom = _cuda_oom_type()
        if cuda_oom is not None and isinstance(value, cuda_oom):
            summary = cuda_memory_summary()
            if summary:
                value.args = (f"CUDA out of memory: {summary}. The session goes on: free memory "
                              "(del the tensors you no longer need, then torch.cuda.empty_cache()) "
                              f"and run the cell again. {text}",)
        elif limit_text and isinstance(value, MemoryError):
            value.args = (f"out of host memory (limit {limit_text})" + (f": {text}" if text else ""),)
        elif processes is not None and processes.explains(value, tb):
            if isinstance(value, OSError):
                value.strerror = f"{value.strerror}: {processes.text}"
            else:
                value.args = (f"{text}: {processes.text}",)
        return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)

    shell.set_custom_exc(tuple(types), handler)
