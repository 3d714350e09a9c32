"""The messages that client and server exchange.

Each message is a small frozen dataclass with a :class:`MessageType`. A
message that carries binary payloads (pushed or pulled variables, comm
buffers) holds them in ``buffers``; they travel as raw bytes next to the JSON
header, never inside it (see :mod:`.framing`).

The conversation, in order:

1. client → :class:`Hello` (protocol version); server → :class:`Welcome` or
   :class:`Error` with ``ErrorCode.VERSION_MISMATCH``.
2. client → :class:`LeaseRequest`; server → :class:`QueuePosition` whenever
   the position changes, then :class:`LeaseGranted` (or :class:`Error`).
3. client → :class:`Execute` / :class:`Push` / :class:`Pull` /
   :class:`ShellRequest` / :class:`Upload` / :class:`Download`; server →
   :class:`Output` for every Jupyter message the worker publishes, then the
   request's reply (:class:`ExecuteDone`, :class:`PushDone`,
   :class:`PullReply`, :class:`ShellReply`, :class:`UploadDone`,
   :class:`DownloadReply`) or :class:`Error`. After a reconnect,
   :class:`Replay` fetches the outputs the client missed.
4. client → :class:`Interrupt` at any time, :class:`Release` at the end;
   server → :class:`Released` when the lease ends for any reason.
5. client → :class:`Park`: the server saves the namespace to disk and gives
   the GPU back; server → :class:`Parked` (also unasked, ``req = 0``, when
   the server parks an idle session). The next :class:`Execute`,
   :class:`Push`, :class:`Pull` or :class:`ShellRequest`, or a
   :class:`Resume`, waits for a lease (:class:`QueuePosition` with that
   request's id), restores the namespace, says what it restored in a
   :class:`Notice`, and goes on; a :class:`Resume` ends with
   :class:`LeaseGranted`.

Every request carries ``req``, an id the client chose; every answer names the
request it answers. Server-initiated messages use ``req = 0``: among them
the :class:`Output` of what the worker publishes outside any request of
this client (a thread that prints after its cell ended, a widget updated
from a timer), which names its Jupyter parent in ``parent``.

Jupyter ids travel whole. An :class:`Execute` or :class:`ShellRequest`
carries the header of the frontend's own request (``parent``); the server
sends the worker its request under that ``msg_id``, so every message the
worker publishes for it, and the ``msg_id`` an ``ipywidgets.Output``
records, are the frontend's own. An :class:`Output` carries the Jupyter
message's ``metadata`` (a widget's ``comm_open`` names its protocol
``version`` there) and its buffers.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, ClassVar, Union

from ..errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "ErrorCode",
    "Download",
    "DownloadReply",
    "Error",
    "Execute",
    "ExecuteDone",
    "Hello",
    "Input",
    "Interrupt",
    "LeaseGranted",
    "LeaseRequest",
    "Message",
    "MessageType",
    "Notice",
    "Output",
    "Park",
    "Parked",
    "Pull",
    "PullReply",
    "Push",
    "PushDone",
    "QueuePosition",
    "Release",
    "Released",
    "Replay",
    "ReplayDone",
    "Resume",
    "ShellReply",
    "ShellRequest",
    "Upload",
    "UploadDone",
    "Welcome",
    "message_from_fields",
]

#: Bumped whenever a message changes shape; sent in :class:`Hello`.
PROTOCOL_VERSION = 2


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
    PULL = "pull"
    PULL_REPLY = "pull_reply"
    SHELL_REQUEST = "shell_request"
    SHELL_REPLY = "shell_reply"
    UPLOAD = "upload"
    UPLOAD_DONE = "upload_done"
    DOWNLOAD = "download"
    DOWNLOAD_REPLY = "download_reply"
    INPUT = "input"
    REPLAY = "replay"
    REPLAY_DONE = "replay_done"
    INTERRUPT = "interrupt"
    RELEASE = "release"
    RELEASED = "released"
    PARK = "park"
    PARKED = "parked"
    RESUME = "resume"
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
    NAME_ERROR = "name_error"
    TIMEOUT = "timeout"
    PARK_REFUSED = "park_refused"
    #: A comm message for a comm the worker does not have (closed, or its worker died).
    NO_COMM = "no_comm"
    #: A file transfer refused: a path outside the session's folder, a missing
    #: file, more bytes than the server's upload limit.
    FILE = "file_error"
    INTERNAL = "internal"


#: bytes-like objects, or framing.Chunks where a relay keeps a buffer in pieces
Buffers = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Message:
    """Base class: ``type`` names the message on the wire."""

    type: ClassVar[MessageType]

    def fields(self) -> dict[str, Any]:
        """The JSON-able fields, without ``buffers``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "buffers"
        }


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    type = MessageType.HELLO
    protocol: int
    client: str = ""


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    """``limits``: what the server takes, in bytes, so that a client can refuse
    a message before sending it: ``max_push`` (a push's buffers),
    ``max_upload`` (an upload's files) and ``max_message`` (any other
    message, header and buffers); empty from a server that names none."""

    type = MessageType.WELCOME
    protocol: int
    server: str
    user: str
    limits: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LeaseRequest(Message):
    """Ask for a lease of ``gpus`` slots, or to resume session ``resume``.

    ``priority`` is ``high``, ``normal`` or ``low``; ``pool`` names a pool
    of slots configured on the server (``default``: the unnamed slots).
    ``notebook`` is the path of the notebook the lease is for, as Jupyter
    gives it to the kernel (``JPY_SESSION_NAME``), or None (a script); the
    server shows it to the lease's owner only.
    """

    type = MessageType.LEASE_REQUEST
    req: int
    gpus: int = 1
    resume: str | None = None
    priority: str = "normal"
    pool: str = "default"
    notebook: str | None = None


@dataclasses.dataclass(frozen=True)
class QueuePosition(Message):
    """The lease request ``req`` waits; ``position`` 1 is next in line."""

    type = MessageType.QUEUE_POSITION
    req: int
    position: int


@dataclasses.dataclass(frozen=True)
class LeaseGranted(Message):
    """``parked``: the session resumed by id is parked; it holds no slot
    (``slots`` are the ones it had) until its next request restores it."""

    type = MessageType.LEASE_GRANTED
    req: int
    session: str
    slots: list[str]
    resumed: bool = False
    waited: float = 0.0
    language_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    parked: bool = False

    def fields(self) -> dict[str, Any]:
        fields = super().fields()
        if not self.parked:  # what a client from before parking can read
            del fields["parked"]
        return fields


@dataclasses.dataclass(frozen=True)
class Execute(Message):
    """Run ``code``. ``parent`` is the header of the Jupyter request this cell
    answers (``msg_id``, ``session``, ``username``, ``date``, ``msg_type``,
    ``version``); the worker gets its request under ``parent["msg_id"]``.
    Empty: the server picks an id. ``execution_count``, where not 0, is the
    number the notebook shows for this cell: the worker's IPython takes it
    (its tracebacks say ``Cell In[N]``), whichever worker runs the cell."""

    type = MessageType.EXECUTE
    req: int
    code: str
    timeout: float | None = None
    silent: bool = False
    store_history: bool = True
    allow_stdin: bool = False
    parent: dict[str, Any] = dataclasses.field(default_factory=dict)
    execution_count: int = 0

    def fields(self) -> dict[str, Any]:
        fields = super().fields()
        if not self.execution_count:  # what a server from before the field can read
            del fields["execution_count"]
        return fields


@dataclasses.dataclass(frozen=True)
class Output(Message):
    """A Jupyter IOPub message the worker published for request ``req``.

    ``msg_type``, ``content``, ``metadata`` and ``buffers`` are the Jupyter
    message's own; ``parent`` is the ``msg_id`` of the request it answers
    (the frontend's, see :class:`Execute`); ``seq`` is its place in the
    session's output journal. With ``req = 0`` it answers no request of
    this client: ``parent`` says where it belongs.
    """

    type = MessageType.OUTPUT
    req: int
    seq: int
    msg_type: str
    content: dict[str, Any]
    buffers: Buffers = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent: str = ""


@dataclasses.dataclass(frozen=True)
class Notice(Message):
    """Something the user should read before the cell's output."""

    type = MessageType.NOTICE
    req: int
    text: str


@dataclasses.dataclass(frozen=True)
class ExecuteDone(Message):
    type = MessageType.EXECUTE_DONE
    req: int
    job: int
    status: str
    execution_count: int | None = None
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Push(Message):
    """Variables to set in the remote namespace.

    ``counts[i]`` buffers belong to ``names[i]``: a pickle first, then its
    out-of-band buffers (see :mod:`.serialization`).
    """

    type = MessageType.PUSH
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class PushDone(Message):
    type = MessageType.PUSH_DONE
    req: int
    names: list[str]


@dataclasses.dataclass(frozen=True)
class Pull(Message):
    type = MessageType.PULL
    req: int
    names: list[str]


@dataclasses.dataclass(frozen=True)
class PullReply(Message):
    type = MessageType.PULL_REPLY
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class ShellRequest(Message):
    """Any other Jupyter shell request (complete, inspect, comm_msg, ...).

    ``parent`` is the frontend's request header, as in :class:`Execute`.
    A comm message for a comm the worker does not have is answered with
    ``ErrorCode.NO_COMM``.
    """

    type = MessageType.SHELL_REQUEST
    req: int
    msg_type: str
    content: dict[str, Any]
    buffers: Buffers = ()
    parent: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ShellReply(Message):
    type = MessageType.SHELL_REPLY
    req: int
    msg_type: str
    content: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Upload(Message):
    """Files to write into the session's folder on the server.

    ``paths[i]`` is relative to that folder (no ``..``, not absolute) and
    ``buffers[i]`` is its content. The server refuses the whole upload when
    it is over its limit (``max_upload`` in :attr:`Welcome.limits`).
    """

    type = MessageType.UPLOAD
    req: int
    paths: list[str]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class UploadDone(Message):
    """``sizes[i]`` bytes were written to ``paths[i]``."""

    type = MessageType.UPLOAD_DONE
    req: int
    paths: list[str]
    sizes: list[int]


@dataclasses.dataclass(frozen=True)
class Download(Message):
    """Files to read from the session's folder, relative to it."""

    type = MessageType.DOWNLOAD
    req: int
    paths: list[str]


@dataclasses.dataclass(frozen=True)
class DownloadReply(Message):
    """``buffers[i]`` is the content of ``paths[i]``."""

    type = MessageType.DOWNLOAD_REPLY
    req: int
    paths: list[str]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class Input(Message):
    """The user's answer to an ``input_request`` Output of request ``req``."""

    type = MessageType.INPUT
    req: int
    value: str


@dataclasses.dataclass(frozen=True)
class Replay(Message):
    """Send again the session's journaled outputs with ``seq`` above ``after``.

    For a client that reconnected: what a cell printed while it was away.
    The server answers with :class:`Output` messages, then :class:`ReplayDone`.
    """

    type = MessageType.REPLAY
    req: int
    after: int


@dataclasses.dataclass(frozen=True)
class ReplayDone(Message):
    """``last`` is the session's latest sequence number."""

    type = MessageType.REPLAY_DONE
    req: int
    last: int


@dataclasses.dataclass(frozen=True)
class Interrupt(Message):
    """Interrupt the running cell (SIGINT). A cell that ignores it is said to
    in a :class:`Notice`; the next interrupt restarts the session's worker.
    ``restart``: restart the worker now, cell or not (its variables are lost).
    """

    type = MessageType.INTERRUPT
    req: int
    restart: bool = False

    def fields(self) -> dict[str, Any]:
        # A plain interrupt stays the same on the wire as before ``restart`` existed.
        return {"req": self.req, "restart": True} if self.restart else {"req": self.req}


@dataclasses.dataclass(frozen=True)
class Release(Message):
    type = MessageType.RELEASE
    req: int


@dataclasses.dataclass(frozen=True)
class Released(Message):
    """The session's lease ended; ``reason`` says why."""

    type = MessageType.RELEASED
    req: int
    session: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Park(Message):
    """Save the session's namespace to disk on the GPU machine and give its slots back.

    The session stays, holding no slot; answered with :class:`Parked`, or an
    :class:`Error` (``PARK_REFUSED``: nothing changed, the session goes on).
    """

    type = MessageType.PARK
    req: int


@dataclasses.dataclass(frozen=True)
class Parked(Message):
    """Session ``session`` is parked: ``names`` were saved (in ``seconds``),
    ``unsaved`` maps each name that could not be saved to why, ``nbytes`` is
    what the parked session holds on the server's disk (its session folder,
    the saved namespace in it), ``reason`` says why it was parked, and
    ``text`` says it all in one line for the user."""

    type = MessageType.PARKED
    req: int
    session: str
    names: list[str]
    unsaved: dict[str, Any]
    nbytes: int
    seconds: float
    reason: str
    text: str


@dataclasses.dataclass(frozen=True)
class Resume(Message):
    """Restore a parked session now rather than at its next request."""

    type = MessageType.RESUME
    req: int


@dataclasses.dataclass(frozen=True)
class Error(Message):
    type = MessageType.ERROR
    req: int
    code: ErrorCode
    message: str

    def fields(self) -> dict[str, Any]:
        return {"req": self.req, "code": self.code.value, "message": self.message}


_CLASSES: dict[MessageType, type[Message]] = {
    cls.type: cls
    for cls in (
        Hello, Welcome, LeaseRequest, QueuePosition, LeaseGranted, Execute,
        Output, Notice, ExecuteDone, Push, PushDone, Pull, PullReply,
        ShellRequest, ShellReply, Upload, UploadDone, Download, DownloadReply, Input, Replay,
        ReplayDone, Interrupt, Release, Released, Park, Parked, Resume, Error,
    )
}  # fmt: skip


#: Integers in a message fit a signed 64-bit integer (a store's INTEGER).
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def _check(value: Any, annotation: Any) -> bool:
    """Whether a decoded JSON value fits a field's annotation.

    Numbers must be finite (JSON decoders accept ``NaN`` and ``Infinity``)
    and integers must fit 64 bits, so that no field can carry a value that
    breaks arithmetic, a timer or a database query further on.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_check(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return INT_MIN <= value <= INT_MAX
        return isinstance(value, float) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and INT_MIN <= value <= INT_MAX
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_check(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _check(v, item) for k, v in value.items())
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation}
    return isinstance(annotation, type) and isinstance(value, annotation)


_HINTS: dict[type[Message], dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in _CLASSES.values()
}


def message_from_fields(fields: dict[str, Any], buffers: Buffers = ()) -> Message:
    """Build a message from its decoded JSON header; raise ProtocolError if off."""
    try:
        mtype = MessageType(fields.pop("t"))
    except (KeyError, ValueError, TypeError):
        raise ProtocolError(f"unknown message type {fields.get('t')!r}") from None
    cls = _CLASSES[mtype]
    hints = _HINTS[cls]
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in known or name == "buffers":
            raise ProtocolError(f"{mtype.value}: unexpected field {name!r}")
        if not _check(value, hints[name]):
            raise ProtocolError(f"{mtype.value}: field {name!r} has a bad value")
        kwargs[name] = value
    for name, f in known.items():
        if (
            name not in kwargs
            and name != "buffers"
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ProtocolError(f"{mtype.value}: missing field {name!r}")
    if cls is Error:
        kwargs["code"] = ErrorCode(kwargs["code"])
    if "buffers" in known:
        kwargs["buffers"] = tuple(buffers)
    elif buffers:
        raise ProtocolError(f"{mtype.value} carries no buffers")
    return cls(**kwargs)
