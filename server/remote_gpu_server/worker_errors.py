"""What a worker adds to its user's errors, and the report it leaves when it dies.

This module runs inside the worker (see :mod:`.worker_kernel`) and imports
only the standard library at module level (torch where it is installed,
lazily).

- :func:`enable_fault_report` points :mod:`faulthandler` at the file the
  server named in ``$RGPU_FAULTS``: on a fatal signal Python writes the
  signal and every thread's frames there, and the server reads it when the
  worker is gone (:mod:`.death`).
- :func:`install` makes two errors say more, in the cell, without ending the
  session: a ``MemoryError`` that hit the worker's own memory limit says so
  with the limit; a CUDA out-of-memory error says how much GPU memory this
  session holds and how much is free on the GPU, so the user knows whether
  to free their own tensors or wait for the GPU.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["cuda_memory_summary", "enable_fault_report", "install"]

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


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


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
            parts.append(f"this session holds {_size(held)} of GPU {device} (PyTorch's cache included); "
                         f"{_size(free)} of {_size(total)} are free on it")
        return "; ".join(parts)
    except Exception:  # reading the memory must never hide the user's error
        return ""


def _cuda_oom_type() -> type[BaseException] | None:
    try:
        import torch
    except ImportError:
        return None
    return getattr(torch.cuda, "OutOfMemoryError", None)


def install(shell: Any, limit_text: str | None) -> None:
    """Make ``shell`` explain host and CUDA out-of-memory errors (see the module docstring).

    ``limit_text``: the worker's own host memory limit as people read it
    (``4 GiB``) where the worker limits itself (RLIMIT_DATA), else None.
    """
    cuda_oom = _cuda_oom_type()
    types: list[type[BaseException]] = []
    if limit_text:
        types.append(MemoryError)
    if cuda_oom is not None:
        types.append(cuda_oom)
    if not types:
        return

    def handler(shell: Any, etype: type[BaseException], value: BaseException, tb: Any,
                tb_offset: int | None = None) -> Any:
        text = str(value)
        if cuda_oom is not None and isinstance(value, cuda_oom):
            summary = cuda_memory_summary()
            if summary:
                value.args = (f"CUDA out of memory: {summary}. The session goes on: free memory "
                              "(del the tensors you no longer need, then torch.cuda.empty_cache()) "
                              f"and run the cell again. {text}",)
        elif limit_text and isinstance(value, MemoryError):
            value.args = (f"out of host memory (limit {limit_text})" + (f": {text}" if text else ""),)
        return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)

    shell.set_custom_exc(tuple(types), handler)
