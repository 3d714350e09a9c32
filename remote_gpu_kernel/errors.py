"""Exceptions raised by remote-gpu-kernel.

Every error has one root, :class:`RemoteGpuError`, and inherits a builtin
where one fits so that ordinary ``except`` clauses keep working::

    RemoteGpuError
    ├── ProtocolError                 a peer sent bytes that break the protocol
    │   └── VersionMismatch           the peers speak different protocol versions
    ├── ConnectionLost (ConnectionError)
    │                                 the websocket closed under a request
    ├── AuthenticationError (PermissionError)
    │                                 the server refused the token
    ├── ServerError                   the server answered a request with an error
    │   ├── LeaseError                no lease could be granted (quota, no slots)
    │   ├── SessionReleased           the session's lease ended (release, idle)
    │   └── WorkerDied                the worker process died during a request
    ├── SerializationError (TypeError)
    │                                 a variable could not be pickled; names it
    ├── FileTransferError             a file could not be uploaded or downloaded
    │                                 (missing, outside the session's folder,
    │                                 over the server's upload limit)
    ├── RemoteError                   the remote cell raised; carries the remote
    │                                 traceback and renders it as IPython's own
    └── RemoteTimeout (TimeoutError)  a cell ran past its --timeout
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "FileTransferError",
    "LeaseError",
    "ProtocolError",
    "RemoteError",
    "RemoteGpuError",
    "RemoteTimeout",
    "SerializationError",
    "ServerError",
    "SessionReleased",
    "VersionMismatch",
    "WorkerDied",
]


class RemoteGpuError(Exception):
    """Root of every error this project raises.

    In IPython these show as one line that says what happened and what to
    do, without the client's own frames: they are about the service, not
    about the user's code (:class:`RemoteError` shows the remote traceback).
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ProtocolError(RemoteGpuError):
    """The bytes received do not follow the protocol (bad frame, bad field)."""


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions."""


class ConnectionLost(RemoteGpuError, ConnectionError):
    """The connection to the server closed while a request was pending."""


class AuthenticationError(RemoteGpuError, PermissionError):
    """The server refused the token at the handshake (HTTP 401)."""


class ServerError(RemoteGpuError):
    """The server answered a request with an error.

    ``code`` is the machine-readable error code from the protocol's
    :class:`~remote_gpu_kernel.protocol.ErrorCode`.
    """

    def __init__(self, message: str, code: str = "server_error") -> None:
        super().__init__(message)
        self.code = code


class LeaseError(ServerError):
    """No lease could be granted."""


class SessionReleased(ServerError):
    """The session no longer holds a lease (released, idle timeout, grace)."""


class WorkerDied(ServerError):
    """The worker died while running a request; its variables are gone."""


class SerializationError(RemoteGpuError, TypeError):
    """A value could not be serialized; ``name`` says which variable."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot send variable {name!r}: {reason}")
        self.name = name
        self.reason = reason


class FileTransferError(RemoteGpuError):
    """A file could not be moved to or from the session's folder; nothing was
    written. ``code`` is ``file_error``."""

    code = "file_error"


class RemoteTimeout(RemoteGpuError, TimeoutError):
    """A remote cell ran longer than its timeout and was interrupted."""


class RemoteError(RemoteGpuError):
    """The remote cell raised an exception.

    IPython calls :meth:`_render_traceback_` to show an exception; returning
    the remote traceback makes the remote error look like a local one.
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback)

    def _render_traceback_(self) -> list[str]:
        return self.traceback or [f"{self.ename}: {self.evalue}"]

    @classmethod
    def from_remote(cls, ename: str, evalue: str, traceback: list[str]) -> RemoteError:
        """A RemoteError whose class is named after the remote exception.

        A notebook then shows ``ZeroDivisionError``, not ``RemoteError``,
        while ``except RemoteError`` still catches it.
        """
        return _remote_class(ename)(ename, evalue, traceback)


_REMOTE_CLASSES: dict[str, type[RemoteError]] = {}


def _remote_class(ename: str) -> type[RemoteError]:
    if not ename.isidentifier():
        return RemoteError
    if ename not in _REMOTE_CLASSES:
        _REMOTE_CLASSES[ename] = type(ename, (RemoteError,), {"__module__": "remote"})
    return _REMOTE_CLASSES[ename]
