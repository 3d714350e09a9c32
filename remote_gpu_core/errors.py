"""Exceptions raised by remote-gpu-kernel.

Every error has one root, :class:`RemoteGpuError`, and inherits a builtin
where one fits so that ordinary ``except`` clauses keep working. Each class
has a stable ``code`` (the right-hand column below), for a program or a log to
match instead of a message or a class name; where the server names the same
failure on the wire (:class:`~remote_gpu_core.protocol.ErrorCode`) the two
codes are the same. A :class:`ServerError` built from the server's answer
carries that answer's code, which may be more precise than its class's
(``no_lease`` for a :class:`SessionReleased`)::

    RemoteGpuError                           remote_gpu_error
    ├── ProtocolError                        protocol_error
    │   │   a peer sent bytes that break the protocol
    │   ├── VersionMismatch                  version_mismatch
    │   │       the peers speak different protocol versions
    │   └── MessageTooLarge (ValueError)     message_too_large
    │           a message is larger than its receiver takes (a server's
    │           --max-push, --max-message); it was not used and the
    │           connection goes on
    ├── ConnectionLost (ConnectionError)     connection_lost
    │   │   the websocket closed under a request
    │   └── BulkStreamLost                   bulk_stream_lost
    │           the bulk stream beside the websocket broke during a
    │           transfer; the session goes on, and the next transfer
    │           goes on the websocket
    ├── AuthenticationError (PermissionError)  authentication_failed
    │       the server refused the token or the connection (HTTP 401 or 403)
    ├── TlsError (ConnectionError)           tls_error
    │   │   the connection cannot be made safe (a CA file that cannot be
    │   │   read, a TLS failure)
    │   ├── UntrustedCertificate             untrusted_certificate
    │   │       the server's certificate did not verify
    │   └── InsecureConnection (PermissionError)  insecure_connection
    │           a token would cross the network in clear
    ├── ServerError                          server_error
    │   │   the server answered a request with an error
    │   ├── LeaseError                       lease_refused
    │   │       no lease could be granted (quota, no slots)
    │   ├── SessionReleased                  released
    │   │       the session's lease ended (release, idle)
    │   ├── ParkError                        park_refused
    │   │       the session could not be parked (quota, disk); nothing
    │   │       was lost, it goes on
    │   ├── WorkerDied                       worker_died
    │   │       the worker process died during a request
    │   └── ApiError                         api_error
    │           the HTTP API (``rgpu``) answered with an error or could
    │           not be reached; ``status`` is the HTTP status (0: unreachable)
    ├── SerializationError (TypeError)       serialization
    │   │   a variable could not be pickled; names it
    │   └── VersionDifference                version_difference
    │           a pushed or pulled variable could not be unpickled, and a
    │           package it references has another version on the other
    │           end; names the package and both versions
    ├── FileTransferError                    file_error
    │   │   a file could not be uploaded or downloaded (missing, outside
    │   │   the session's folder, over the server's upload limit)
    │   └── FetchRefused (PermissionError)   fetch_refused
    │           a remote cell opened a file that the notebook's client
    │           does not send (outside its folder, hidden, too large, not
    │           a regular file); ``refusal`` says which kind of no
    ├── RemoteError                          remote_error
    │       the remote cell raised; carries the remote traceback and
    │       renders it as IPython's own
    ├── RemoteTimeout (TimeoutError)         timeout
    │       a cell ran past its --timeout
    └── CellSyntaxError (ValueError)         cell_syntax
            a Remote GPU kernel cell's ``%gpu`` line is malformed; says
            how to write it

The server's own errors extend this tree where the server defines them
(``remote_gpu_server.errors``).
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthenticationError",
    "CellSyntaxError",
    "BulkStreamLost",
    "ConnectionLost",
    "FetchRefused",
    "FileTransferError",
    "InsecureConnection",
    "LeaseError",
    "MessageTooLarge",
    "ParkError",
    "ProtocolError",
    "RemoteError",
    "RemoteGpuError",
    "RemoteTimeout",
    "SerializationError",
    "ServerError",
    "SessionReleased",
    "TlsError",
    "UntrustedCertificate",
    "VersionDifference",
    "VersionMismatch",
    "WorkerDied",
]


class RemoteGpuError(Exception):
    """Root of every error this project raises.

    In IPython these show as one line that says what happened and what to
    do, without the client's own frames: they are about the service, not
    about the user's code (:class:`RemoteError` shows the remote traceback).

    :attr:`code` names the kind of error and never changes (see the module
    docstring). Every class of this module sets its own as a class
    attribute; a :class:`ServerError` built from the server's answer carries
    the answer's, and a class elsewhere may compute it (the sidebar's error
    gives its reason).
    """

    @property
    def code(self) -> str:
        """This error's stable code: the root's, where a class sets none."""
        return "remote_gpu_error"

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ProtocolError(RemoteGpuError):
    """The bytes received do not follow the protocol (bad frame, bad field).

    ``req`` is the request id of the message at fault where it could be read
    (0 otherwise), so that a server can answer that request.
    """

    code = "protocol_error"

    def __init__(self, message: str, req: int = 0) -> None:
        super().__init__(message)
        self.req = req


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions."""

    code = "version_mismatch"


class MessageTooLarge(ProtocolError, ValueError):
    """A message is larger than its receiver takes; the message says which limit.

    Raised by the client before anything is sent when a push or a cell is
    larger than the server's limits, and by a server's reader for a message
    it refused whole (its bytes are skipped, the stream stays in step).
    """

    code = "message_too_large"

    def __init__(self, message: str, req: int = 0, *, size: int = 0, limit: int = 0,
                 what: str = "") -> None:
        super().__init__(message, req)
        self.size = size
        self.limit = limit
        #: The message's type (``push``, ``execute``), where it could be read.
        self.what = what


class ConnectionLost(RemoteGpuError, ConnectionError):
    """The connection to the server closed while a request was pending."""

    code = "connection_lost"


class BulkStreamLost(ConnectionLost):
    """The bulk stream broke during a transfer; the websocket and the session go on."""

    code = "bulk_stream_lost"


class AuthenticationError(RemoteGpuError, PermissionError):
    """The server refused the token (HTTP 401) or this connection (HTTP 403,
    for example a second user of a server that cannot isolate workers) at
    the handshake; the message gives its reason."""

    code = "authentication_failed"


class TlsError(RemoteGpuError, ConnectionError):
    """The connection to the server cannot be made safe; the message says why and what to do.

    ``what`` is what happened and ``hint`` what to do (may be empty); the
    message is both, on one line.
    """

    code = "tls_error"

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(f"{what}: {hint}" if hint else what)
        self.what = what
        self.hint = hint


class UntrustedCertificate(TlsError):
    """The server's certificate did not verify: unknown CA, self-signed, wrong host name, expired."""

    code = "untrusted_certificate"


class InsecureConnection(TlsError, PermissionError):
    """The client refused to send a token over plain ws:// or http:// to a host not on loopback."""

    code = "insecure_connection"


class ServerError(RemoteGpuError):
    """The server answered a request with an error.

    ``code`` is the machine-readable error code from the protocol's
    :class:`~remote_gpu_core.protocol.ErrorCode` that the answer carried;
    without one, the class's own.
    """

    code: str = "server_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LeaseError(ServerError):
    """No lease could be granted."""

    code = "lease_refused"


class SessionReleased(ServerError):
    """The session no longer holds a lease (released, idle timeout, grace)."""

    code = "released"


class ParkError(ServerError):
    """The session could not be parked; it goes on as it was, with its variables."""

    code = "park_refused"


class WorkerDied(ServerError):
    """The worker died while running a request; its variables are gone."""

    code = "worker_died"


class ApiError(ServerError):
    """The HTTP API answered with an error; ``status`` is its HTTP status (0: unreachable)."""

    code = "api_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class SerializationError(RemoteGpuError, TypeError):
    """A value could not be serialized; ``name`` says which variable."""

    code = "serialization"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot send variable {name!r}: {reason}")
        self.name = name
        self.reason = reason


class VersionDifference(SerializationError):
    """A variable could not be unpickled on one end, and a package it
    references has another version there than on the end that pickled it.

    ``package`` names the (first) package that differs, ``here`` its
    version in the notebook's Python and ``there`` on the GPU server's (""
    where it is not installed); the message says it all, with what
    unpickling raised, in one line. From the server's answer to a push only
    the message is known (the attributes are then empty).
    """

    code = "version_difference"

    def __init__(self, message: str, *, package: str = "", here: str = "", there: str = "") -> None:
        RemoteGpuError.__init__(self, message)
        self.name = ""
        self.reason = message
        self.package = package
        self.here = here
        self.there = there


class FileTransferError(RemoteGpuError):
    """A file could not be moved to or from the session's folder; nothing was
    written. ``code`` is ``file_error``."""

    code = "file_error"


class FetchRefused(FileTransferError, PermissionError):
    """A file a remote cell opened is not sent from the notebook's folder.

    ``refusal`` is a :class:`~remote_gpu_core.protocol.messages.FetchRefusal`
    value: ``missing`` (no such file), ``off`` (fetching is off) or
    ``refused`` (a file the client does not send; the message says why).
    A remote cell sees only ``refused`` ones as this error.
    """

    code = "fetch_refused"

    def __init__(self, message: str, refusal: str = "refused") -> None:
        super().__init__(message)
        self.refusal = refusal


class RemoteTimeout(RemoteGpuError, TimeoutError):
    """A remote cell ran longer than its timeout and was interrupted."""

    code = "timeout"


class RemoteError(RemoteGpuError):
    """The remote cell raised an exception.

    IPython calls :meth:`_render_traceback_` to show an exception; returning
    the remote traceback makes the remote error look like a local one.
    """

    code = "remote_error"

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


class CellSyntaxError(RemoteGpuError, ValueError):
    """A ``%gpu`` line the Remote GPU kernel cannot run; the message says how to fix it."""

    code = "cell_syntax"


_REMOTE_CLASSES: dict[str, type[RemoteError]] = {}


def _remote_class(ename: str) -> type[RemoteError]:
    if not ename.isidentifier():
        return RemoteError
    if ename not in _REMOTE_CLASSES:
        _REMOTE_CLASSES[ename] = type(ename, (RemoteError,), {"__module__": "remote"})
    return _REMOTE_CLASSES[ename]
