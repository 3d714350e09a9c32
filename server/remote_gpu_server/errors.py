"""The server's errors: every one that a user or an operator can meet.

They join the one tree of :mod:`remote_gpu_core.errors` under its
:class:`~remote_gpu_core.errors.ServerError`, so one ``except
RemoteGpuError`` catches everything, and each has a stable ``code``. Those
that code catches as a builtin (``except OSError`` around the store,
``except ValueError`` around the scheduler, ``except PermissionError``
around a file) inherit that builtin as well::

    RemoteGpuError                              (remote_gpu_core.errors)
    ├── ServerError                             code
    │   ├── TokenError (PermissionError)        unauthorized
    │   │       a token is missing, wrong, expired or revoked; says which
    │   ├── StoreError                          store
    │   │       the store refused an operation (unknown id, conflicting name)
    │   ├── DatabaseUnavailable (ConnectionError)
    │   │                                       database_unavailable
    │   │       the database cannot be reached now; try again once it is back
    │   ├── SchemaTooNew (RuntimeError)         schema_too_new
    │   │       the store was written by a newer version of this program
    │   ├── IsolationError                      isolation
    │   │       workers cannot be isolated as asked, or a worker could not
    │   │       take on its user's identity; says why
    │   ├── UpError                             up_failed
    │   │       ``rgpu up`` cannot go on (a port taken, a server that did not start)
    │   ├── HeaderError (ValueError)            bad_request
    │   │       a header the server acts on came twice (answered with a 400)
    │   ├── HttpError                           http_error
    │   │       an HTTP API answer other than 200, with its status
    │   ├── TransferAborted (ConnectionError)   transfer_aborted
    │   │       a push or a pull broke off midway (client or worker gone)
    │   ├── LeaseError                          (the core's)
    │   │   └── QuotaExceeded (ValueError)      lease_refused
    │   │           a lease request would break a quota; names it
    │   ├── ParkError                           (the core's)
    │   │   └── ParkQuotaExceeded               park_refused
    │   │           saving a namespace would pass the park quota
    │   │           (:mod:`.worker_process.parked_namespace`)
    │   └── WorkerDied                          (the core's)
    └── FileTransferError                       (the core's) file_error
        ├── PathRefused (PermissionError)       file_error
        │       a path outside the session's folder (:mod:`.worker_process.files`)
        └── FetchNotSent (ConnectionError)      file_error
                a file a cell opened was not sent from the notebook's folder
                (:mod:`.worker_process.fetch`); the cell sees the core's
                FetchRefused, or the FileNotFoundError it would have had

``ParkQuotaExceeded``, ``PathRefused`` and ``FetchNotSent`` are raised inside a worker, whose
code imports only the shared core (see :mod:`.worker_process`): they live
there and derive from the core's classes. The store, the scheduler, the
front door and the workers re-export the classes they raise, so a module
imports an error from where it is raised or from here alike.
"""

from __future__ import annotations

from http import HTTPStatus

from remote_gpu_core.errors import LeaseError, RemoteGpuError, ServerError, WorkerDied

__all__ = [
    "DatabaseUnavailable", "HeaderError", "HttpError", "IsolationError", "QuotaExceeded", "RemoteGpuError",
    "SchemaTooNew", "ServerError", "StoreError", "TokenError", "TransferAborted", "UpError", "WorkerDied",
]


class TokenError(ServerError, PermissionError):
    """The token cannot be used; the message says why in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unauthorized")


class StoreError(ServerError):
    """The store refused an operation (unknown id, conflicting name)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="store")


class DatabaseUnavailable(ServerError, ConnectionError):
    """The database cannot be reached now (connection lost, server down).

    Not a :class:`StoreError`: code that turns a refusal into "no such job"
    must not say that of a database that is away.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code="database_unavailable")


class SchemaTooNew(ServerError, RuntimeError):
    """The store was written by a newer version of this program."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="schema_too_new")


class IsolationError(ServerError):
    """Workers cannot be isolated as configured, or one could not take on its
    user's identity; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="isolation")


class UpError(ServerError):
    """``rgpu up`` cannot go on; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="up_failed")


class HeaderError(ServerError, ValueError):
    """A header the server acts on is repeated; the message says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="bad_request")


class HttpError(ServerError):
    """An HTTP API answer other than 200: ``status`` and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message, code="http_error")
        self.status = status


class TransferAborted(ServerError, ConnectionError):
    """A push or pull stream broke before its end (client or worker gone).

    ``worker_stopped`` says the worker gave up itself and needs no notice.
    """

    def __init__(self, reason: str, worker_stopped: bool = False) -> None:
        super().__init__(reason, code="transfer_aborted")
        self.worker_stopped = worker_stopped


class QuotaExceeded(LeaseError, ValueError):
    """A request would break a quota; the message names the quota and its value."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="lease_refused")
