"""Server-side errors.

They extend the client's hierarchy (see :mod:`remote_gpu_kernel.errors`), so
one ``except RemoteGpuError`` catches everything::

    RemoteGpuError
    └── ServerError
        ├── TokenError (PermissionError)   a token is missing, wrong, expired
        │                                  or revoked; says which
        ├── StoreError                      the store refused an operation
        └── WorkerDied                      (the client's) the worker exited
"""

from __future__ import annotations

from remote_gpu_kernel.errors import RemoteGpuError, ServerError, WorkerDied

__all__ = ["RemoteGpuError", "ServerError", "StoreError", "TokenError", "WorkerDied"]


class TokenError(ServerError, PermissionError):
    """The token cannot be used; the message says why in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unauthorized")


class StoreError(ServerError):
    """The store refused an operation (unknown id, conflicting name)."""
