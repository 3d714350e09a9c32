"""Use a shared GPU from a Jupyter notebook.

``%load_ext remote_gpu_kernel`` registers the ``%gpu`` / ``%%gpu`` magics;
:class:`Client` (sync) and :class:`AsyncClient` are the Python API.
"""

from __future__ import annotations

from typing import Any

from remote_gpu_core import __version__

from .client import AsyncClient, AsyncSession, ExecuteResult
from remote_gpu_core.errors import *
from remote_gpu_core.errors import __all__ as _errors_all
from .sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ExecuteResult",
    "Session",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
    *_errors_all,
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext remote_gpu_kernel``: register the %gpu magics."""
    from .magic import GpuMagics

    ipython.register_magics(GpuMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    from .magic import GpuMagics

    magics = ipython.magics_manager.registry.get(GpuMagics.__name__)
    if magics is not None:
        magics.close()
