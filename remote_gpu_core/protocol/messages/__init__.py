"""The messages that client and server exchange.

Each message is a small frozen dataclass with a :class:`MessageType`. A
message that carries binary payloads (pushed or pulled variables, comm
buffers) holds them in ``buffers``; they travel as raw bytes next to the JSON
header, never inside it (see :mod:`remote_gpu_core.protocol.framing`).

The messages live by family, and every name is re-exported here
(``from remote_gpu_core.protocol import messages as m``; ``m.Execute``):

- :mod:`.base`: :class:`Message`, :class:`MessageType`, :class:`Error` and
  its :class:`ErrorCode`, :data:`PROTOCOL_VERSION`;
- :mod:`.session`: the handshake, the lease, parking and the end;
- :mod:`.cells`: cells, outputs and the other Jupyter requests (comms);
- :mod:`.transfers`: variables and files;
- :mod:`.decoding`: a decoded header back into its message, checked.

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
   :class:`Replay` fetches the outputs the client missed, and a
   :class:`Holding` asks what the worker kept of a push cut short
   (:class:`Held`), so that the push sends only the rest. A client need
   not wait for an answer before its next request: requests that run in
   turn run in the order they came, and an :class:`Execute` or
   :class:`Pull` that names the request it follows (``after``) runs only
   if that one succeeded (else :class:`Error` ``NOT_RUN``). A
   ``%%gpu -i a -o b`` cell is a :class:`Push`, an :class:`Execute` and a
   :class:`Pull` sent back to back: one round trip.
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

from .base import PROTOCOL_VERSION, Error, ErrorCode, Message, MessageType
from .cells import (
    Execute, ExecuteDone, Input, Interrupt, Notice, Output, Replay, ReplayDone, ShellReply, ShellRequest
)
from .decoding import message_from_fields
from .session import (
    ENV_FIELD, Hello, LeaseGranted, LeaseRequest, Park, Parked, QueuePosition, Release, Released, Resume,
    Welcome,
)
from .transfers import (
    BulkOpen, BulkTicket, Download, DownloadReply, Fetch, FetchRefusal, FetchRefused, Held, Holding, Pull, PullReply, Push, PushDone,
    Upload,
    UploadDone,
)

__all__ = [
    "ENV_FIELD",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "BulkOpen",
    "BulkTicket",
    "Download",
    "DownloadReply",
    "Error",
    "Execute",
    "ExecuteDone",
    "Fetch",
    "FetchRefusal",
    "FetchRefused",
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
    "Held",
    "Holding",
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
