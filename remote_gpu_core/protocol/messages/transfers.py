"""Variables and files that move between the notebook and the worker.

:class:`Push` sets variables in the remote namespace and :class:`Pull`
fetches them (pickles and their out-of-band buffers, see
:mod:`remote_gpu_core.protocol.serialization`); :class:`Upload` writes
files into the session's folder on the server and :class:`Download` reads
them. Their payloads travel as buffers beside the JSON header, never
inside it.

A running cell that opens a relative path for reading which is not in the
session's folder makes the server ask the client that runs the cell for
it (:class:`Fetch`, only when the cell's :class:`~.cells.Execute` said
``fetch``). The client answers with an :class:`Upload` of that one file
under a request id of its own, naming the fetch in ``Upload.fetch`` (so
the upload's limits apply to it), or with :class:`FetchRefused` and a
:class:`FetchRefusal` code. Neither gets an answer: the cell goes on,
opening the file or failing as the refusal says.

Large buffers are named by content (see
:mod:`remote_gpu_core.protocol.content`): ``digests`` has one entry per
buffer of the value list (``""`` for a small one), and ``cached`` the
indices of those left out of ``buffers`` because the receiver holds them.
Of the buffers carried, the ``compressed`` ones (indices into ``buffers``)
are one frame each of ``codec``, ``raw_sizes`` bytes before (see
:mod:`remote_gpu_core.protocol.compression`); a pull names the ``codecs``
its answer may use.

A push cut short by a dropped connection leaves what arrived of its large
buffers with the session's worker. A client that reconnects asks what is
there (:class:`Holding`, answered by :class:`Held`) and pushes only the
rest: ``offsets[k]`` bytes of carried buffer ``k`` are taken from what the
worker kept of its digest, and ``buffers[k]`` carries the bytes after them.
A pull cut short the same way leaves what arrived with the client: its
next :class:`Pull` offers it in ``partial`` (bytes held by digest), and the
answer's ``offsets[k]`` says how many bytes of carried buffer ``k`` it
leaves out, from the start, because the client holds them.
A server that says ``resume`` in its :attr:`~.session.Welcome.limits` reads these.

A server that says ``bulk`` there takes the buffers' bytes of pushes and
pulls on a second connection beside the websocket (see
:mod:`remote_gpu_core.bulk_stream`): a client asks for a ticket
(:class:`BulkOpen`, answered by :class:`BulkTicket`) and opens that stream
with it. The messages themselves do not change: only their framing says
where their buffers' bytes travel.
"""

from __future__ import annotations

import dataclasses
import enum

from .base import Buffers, Message, MessageType

__all__ = [
    "BulkOpen", "BulkTicket", "Download", "DownloadReply", "Fetch", "FetchRefusal", "FetchRefused", "Held",
    "Holding", "Pull", "PullReply", "Push", "PushDone", "Upload", "UploadDone", "Variables",
]


@dataclasses.dataclass(frozen=True)
class Variables(Message):
    """Named values and their buffers, one way or the other: see :class:`Push`
    and :class:`PullReply`, which are this with their own ``type``."""

    omitted_while_empty = ("versions", "offsets")  # nothing but Python and ours; no transfer cut short
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()
    digests: list[str] = dataclasses.field(default_factory=list)
    cached: list[int] = dataclasses.field(default_factory=list)
    codec: str = ""
    compressed: list[int] = dataclasses.field(default_factory=list)
    raw_sizes: list[int] = dataclasses.field(default_factory=list)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    offsets: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Push(Variables):
    """Variables to set in the remote namespace.

    ``counts[i]`` buffers belong to ``names[i]``: a pickle first, then its
    out-of-band buffers (see :mod:`.serialization`). ``buffers`` carries
    them all but the ``cached`` ones, which the worker is asked to take from
    what it holds by their ``digests``. ``versions``: the client's version of
    each package the pickles reference (see :mod:`remote_gpu_core.fingerprint`),
    which the worker names if one differs where a value fails to unpickle.
    ``offsets`` (empty, or one per carried buffer): the bytes of each that
    the worker holds from a push cut short, which it carries not (see the
    module docstring).
    """

    type = MessageType.PUSH


@dataclasses.dataclass(frozen=True)
class Holding(Message):
    """How many bytes of each buffer named by ``digests`` the session's worker
    holds: all of one it holds whole, those that arrived of one whose push
    was cut short, or none. Answered by :class:`Held`."""

    type = MessageType.HOLDING
    req: int
    digests: list[str]


@dataclasses.dataclass(frozen=True)
class Held(Message):
    """``sizes[i]`` bytes of :class:`Holding`'s ``digests[i]`` are held."""

    type = MessageType.HELD
    req: int
    sizes: list[int]


@dataclasses.dataclass(frozen=True)
class PushDone(Message):
    """The variables were set; or, when ``missing`` names digests the worker
    no longer held, nothing was set: push again with their bytes."""

    type = MessageType.PUSH_DONE
    req: int
    names: list[str]
    missing: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pull(Message):
    """The values of remote variables. ``after``, where not 0: pull only if
    that earlier request (the cell that makes them) succeeded, as in
    :class:`~.cells.Execute`; else the answer is ``ErrorCode.NOT_RUN``.
    ``have``: digests of buffers the client holds, which the answer names
    instead of carrying; ``codecs``: those the answer may be compressed with;
    ``partial``: bytes held, by digest, of buffers a pull cut short began."""

    type = MessageType.PULL
    omitted_while_empty = ("after", "partial")
    req: int
    names: list[str]
    have: list[str] = dataclasses.field(default_factory=list)
    codecs: list[str] = dataclasses.field(default_factory=list)
    after: int = 0
    partial: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PullReply(Variables):
    """As :class:`Push`, the other way: the ``cached`` buffers are the client's
    own, ``versions`` the worker's, and ``offsets`` the bytes of each carried
    one left out because the client holds them from a pull cut short (see
    :attr:`Pull.partial`)."""

    type = MessageType.PULL_REPLY


@dataclasses.dataclass(frozen=True)
class Upload(Message):
    """Files to write into the session's folder on the server.

    ``paths[i]`` is relative to that folder (no ``..``, not absolute) and
    ``buffers[i]`` is its content. The server refuses the whole upload when
    it is over its limit (``max_upload`` in :attr:`Welcome.limits`).

    ``fetch``, where not 0, names the :class:`Fetch` this upload answers:
    one file, written where the cell asked for it, whatever ``paths`` says.
    """

    type = MessageType.UPLOAD
    omitted_while_empty = ("fetch",)
    req: int
    paths: list[str]
    buffers: Buffers = ()
    fetch: int = 0


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
class Fetch(Message):
    """The running cell ``req`` opened ``path`` (relative to the session's folder,
    as the worker asked: it may try to go out) and it is not there: send it
    from the notebook's folder, as an :class:`Upload` with ``fetch`` set to
    this ``fetch``, or refuse with :class:`FetchRefused`."""

    type = MessageType.FETCH
    req: int
    fetch: int
    path: str


class FetchRefusal(str, enum.Enum):
    """Why a :class:`Fetch` got no file."""

    #: No such file in the notebook's folder: the cell's open fails as it would have.
    MISSING = "missing"
    #: Not a file the client serves (outside the folder, too large, not a
    #: regular file, hidden): the cell's open fails with the message.
    REFUSED = "refused"
    #: The user turned fetching off: the cell's open fails as it would have.
    OFF = "off"


@dataclasses.dataclass(frozen=True)
class FetchRefused(Message):
    """The client does not send the file of :class:`Fetch` ``fetch``; ``code`` is a
    :class:`FetchRefusal` value and ``message`` says why, for the cell's error."""

    type = MessageType.FETCH_REFUSED
    req: int
    fetch: int
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class BulkOpen(Message):
    """Ask for a ticket that opens a bulk stream beside this connection; only
    to a server that says ``bulk`` in its limits. Answered by :class:`BulkTicket`."""

    type = MessageType.BULK_OPEN
    req: int


@dataclasses.dataclass(frozen=True)
class BulkTicket(Message):
    """Open the bulk stream within ``seconds`` with ``ticket``: a second
    websocket handshake to the same URL with the same token, carrying the
    ticket in the ``X-RGPU-Bulk`` header. It opens one stream, for this
    connection only."""

    type = MessageType.BULK_TICKET
    req: int
    ticket: str
    seconds: float
