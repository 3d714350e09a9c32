"""The server's :class:`~remote_gpu_core.protocol.messages.Error` answers as
exceptions of the tree (:mod:`remote_gpu_core.errors`), by their code."""

from __future__ import annotations

from remote_gpu_core.errors import (
    FileTransferError,
    LeaseError,
    ParkError,
    ProtocolError,
    RemoteError,
    RemoteGpuError,
    RemoteTimeout,
    ServerError,
    SessionReleased,
    VersionDifference,
    VersionMismatch,
    WorkerDied,
)
from remote_gpu_core.protocol import messages as m

__all__ = ["error_from"]


def error_from(msg: m.Error) -> RemoteGpuError:
    code = msg.code
    if code is m.ErrorCode.VERSION_MISMATCH:
        return VersionMismatch(msg.message)
    if code is m.ErrorCode.PROTOCOL:
        return ProtocolError(msg.message)
    if code is m.ErrorCode.WORKER_DIED:
        return WorkerDied(msg.message, code=code.value)
    if code is m.ErrorCode.TIMEOUT:
        return RemoteTimeout(msg.message)
    if code in (m.ErrorCode.NO_LEASE, m.ErrorCode.RELEASED):
        return SessionReleased(msg.message, code=code.value)
    if code is m.ErrorCode.LEASE_REFUSED:
        return LeaseError(msg.message, code=code.value)
    if code is m.ErrorCode.PARK_REFUSED:
        return ParkError(msg.message)
    if code is m.ErrorCode.VERSION_DIFFERENCE:  # the worker's "VersionDifference: ..."
        return VersionDifference(msg.message.removeprefix(f"{VersionDifference.__name__}: "))
    if code in (m.ErrorCode.SERIALIZATION, m.ErrorCode.NAME_ERROR):
        ename, _, evalue = msg.message.partition(": ")
        return RemoteError.from_remote(ename, evalue, [])
    if code is m.ErrorCode.FILE:
        # The worker's refusal comes as "FileNotFoundError: no file ...": the
        # error's own name says it is about a file already.
        ename, sep, evalue = msg.message.partition(": ")
        plain = sep and ename.isidentifier() and ename.endswith("Error")
        return FileTransferError(evalue if plain else msg.message)
    return ServerError(msg.message, code=code.value)
