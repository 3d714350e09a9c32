"""Server-side errors.

They extend the client's hierarchy (see :mod:`remote_gpu_core.errors`), so
one ``except RemoteGpuError`` catches everything::

    RemoteGpuError
    └── ServerError
        ├── TokenError (PermissionError)   a token is missing, wrong, expired
        │                                  or revoked; says which
        ├── StoreError                      the store refused an operation
        ├── IsolationError                  workers cannot be isolated as asked,
        │                                  or a worker could not take on its
        │                                  user's identity; says why
        └── WorkerDied                      (the client's) the worker exited
"""

from __future__ import annotations

from remote_gpu_core.errors import RemoteGpuError, ServerError, WorkerDied

__all__ = ["IsolationError", "RemoteGpuError", "ServerError", "StoreError", "TokenError", "WorkerDied"]


class TokenError(ServerError, PermissionError):
    """The token cannot be used; the message says why in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unauthorized")


class StoreError(ServerError):
    """The store refused an operation (unknown id, conflicting name)."""


class IsolationError(ServerError):
    """Workers cannot be isolated as configured, or one could not take on its
    user's identity; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="isolation")
