"""What every message shares: its type, the error codes, the base class.

:class:`Message` is the base of every message; :class:`MessageType` names
each on the wire and :class:`Error`, with an :class:`ErrorCode`, is the
answer any request may get instead of its own.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

__all__ = ["PROTOCOL_VERSION", "Buffers", "Error", "ErrorCode", "Message", "MessageType"]

#: Bumped whenever a message changes shape; sent in :class:`Hello`.
#: 3: an :class:`~.cells.Execute` or :class:`~.transfers.Pull` may name the
#: request it follows (``after``), and is answered ``NOT_RUN`` if that failed;
#: large buffers named by digest (``Push.digests``/``cached``,
#: ``PushDone.missing``, ``Pull.have``, ``PullReply.digests``/``cached``) and
#: compressed (``codec``, ``compressed``, ``raw_sizes``; ``Pull.codecs``).
#: 4: both ends' versions: ``LeaseGranted.fingerprint`` (the worker's),
#: ``Push.versions`` and ``PullReply.versions`` (the sender's, of the
#: packages its pickles reference), ``ErrorCode.VERSION_DIFFERENCE``.
#: 5: ``Execute.refetch``: fetched files that changed in the notebook's folder;
#: ``BulkOpen``/``BulkTicket`` and the framing's bulk flag, for a server that offers ``bulk``.
PROTOCOL_VERSION = 5


class MessageType(str, enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    LEASE_REQUEST = "lease_request"
    QUEUE_POSITION = "queue_position"
    LEASE_GRANTED = "lease_granted"
    EXECUTE = "execute"
    OUTPUT = "output"
    NOTICE = "notice"
    EXECUTE_DONE = "execute_done"
    PUSH = "push"
    PUSH_DONE = "push_done"
    HOLDING = "holding"
    HELD = "held"
    PULL = "pull"
    PULL_REPLY = "pull_reply"
    SHELL_REQUEST = "shell_request"
    SHELL_REPLY = "shell_reply"
    UPLOAD = "upload"
    UPLOAD_DONE = "upload_done"
    DOWNLOAD = "download"
    DOWNLOAD_REPLY = "download_reply"
    FETCH = "fetch"
    FETCH_REFUSED = "fetch_refused"
    INPUT = "input"
    REPLAY = "replay"
    REPLAY_DONE = "replay_done"
    INTERRUPT = "interrupt"
    RELEASE = "release"
    RELEASED = "released"
    PARK = "park"
    PARKED = "parked"
    RESUME = "resume"
    BULK_OPEN = "bulk_open"
    BULK_TICKET = "bulk_ticket"
    ERROR = "error"


class ErrorCode(str, enum.Enum):
    PROTOCOL = "protocol_error"
    VERSION_MISMATCH = "version_mismatch"
    BAD_REQUEST = "bad_request"
    NO_LEASE = "no_lease"
    LEASE_REFUSED = "lease_refused"
    RELEASED = "released"
    WORKER_DIED = "worker_died"
    SERIALIZATION = "serialization"
    #: A pushed value did not unpickle, and a package it references has
    #: another version on the worker than on the client; the message names it.
    VERSION_DIFFERENCE = "version_difference"
    NAME_ERROR = "name_error"
    TIMEOUT = "timeout"
    PARK_REFUSED = "park_refused"
    #: A comm message for a comm the worker does not have (closed, or its worker died).
    NO_COMM = "no_comm"
    #: A file transfer refused: a path outside the session's folder, a missing
    #: file, more bytes than the server's upload limit.
    FILE = "file_error"
    #: A request that follows another (``after``) was not run: that one failed.
    NOT_RUN = "not_run"
    INTERNAL = "internal"


#: bytes-like objects, or framing.Chunks where a relay keeps a buffer in pieces
Buffers = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Message:
    """Base class: ``type`` names the message on the wire; the fields named in
    ``omitted_while_empty`` (added after the message first existed) are left
    off the wire while they are empty, false or 0, so that the message is as
    it was before them and a peer from before them reads it."""

    type: ClassVar[MessageType]
    omitted_while_empty: ClassVar[tuple[str, ...]] = ()

    def fields(self) -> dict[str, Any]:
        """The JSON-able fields, without ``buffers``."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name != "buffers"
            and ((value := getattr(self, f.name)) or f.name not in self.omitted_while_empty)
        }


@dataclasses.dataclass(frozen=True)
class Error(Message):
    type = MessageType.ERROR
    req: int
    code: ErrorCode
    message: str

    def fields(self) -> dict[str, Any]:
        return {"req": self.req, "code": self.code.value, "message": self.message}
