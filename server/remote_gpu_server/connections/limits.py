"""What one client may send the server and make it hold: deliberate, configurable limits.

:class:`Limits` is filled from ``rgpu serve`` flags (``--max-push``,
``--max-upload``, ``--max-message``, ``--max-requests``,
``--connection-memory``, ``--max-connections-per-user``). Each limit
refuses what exceeds it with a one-line error that names the flag, and the
connection and its session go on; except that a refused message whose
bytes are still arriving (a push over ``--max-push`` announces its size in
its header) closes the connection with code 1009 and a reason naming the
flag, as its session waits for a reconnect: the server cannot tell the rest
of it from the client's next messages (see :mod:`.connection`):

- ``max_push``: the buffers of one push. A push streams through the server
  to its worker, so this bounds a worker's intake, not the server's memory.
- ``max_upload``: the files of one upload (``%gpu upload``), which stream
  to the session's folder the same way.
- ``max_message``: any other message whole (a cell's code, a widget's
  message with its binary buffers), and the header of a push. A header
  over it cannot be skipped (the lengths of what follows are in it): the
  connection is closed with code 1009, and its session waits for a
  reconnect as after any disconnect. Clients learn both limits in
  ``Welcome.limits`` and refuse such a message before sending it.
- ``max_requests``: requests one connection has in flight (waiting their
  turn or running).
- ``max_connections``: websockets one user holds open at once (``rgpu
  serve --max-connections-per-user``, see :mod:`.user_connections`); one
  more is refused at its handshake.
- ``connection_memory``: bytes of a connection's messages the server holds
  at once (see :mod:`.connection_memory`): a push streaming to its worker
  makes the server stop reading that client while it is ahead by this much;
  a message that would go past it while others wait is refused.

So one connection makes the server hold at most about
``connection_memory + 2 × max_message`` of its data, plus
:data:`FRAMES_QUEUED` websocket frames of :data:`CHUNK_SIZE` read ahead by
the websockets library and one frame that has half arrived; one user, at
most ``max_connections`` times that.
"""

from __future__ import annotations

import dataclasses

from remote_gpu_core.protocol import CHUNK_SIZE, Reader
from remote_gpu_core.protocol import messages as m

from remote_gpu_core.sizes import format_size

__all__ = ["FRAMES_QUEUED", "Limits", "SESSION_CACHE"]

#: ``--session-cache auto``: a session's worker keeps up to this much of what
#: was pushed (or a quarter of its memory limit, where that is less). The
#: cached buffers are mostly the same pages as the variables made from them
#: (copy-on-write mappings), so it costs memory only for what the session
#: dropped or changed since; a quarter leaves the user's cells the rest.
SESSION_CACHE = 2 << 30

#: Frames the websockets library reads ahead of the server per connection
#: (its ``max_queue``), each at most :data:`CHUNK_SIZE`.
FRAMES_QUEUED = 16



@dataclasses.dataclass(frozen=True)
class Limits:
    """See the module docstring; sizes in bytes."""

    max_push: int = 16 << 30
    max_upload: int = 1 << 30
    max_message: int = 16 << 20
    max_requests: int = 64
    connection_memory: int = 128 << 20
    max_connections: int = 32
    #: Bytes of pushed buffers each session's worker keeps by digest, so that
    #: an unchanged one is never sent again (``--session-cache``; 0: none).
    #: None: :meth:`resolve` picks :data:`SESSION_CACHE`, or a quarter of a
    #: worker's memory limit where that is less.
    session_cache: int | None = None
    #: Offer clients a bulk stream for their pushes' and pulls' bytes (``--no-bulk-stream``: not).
    bulk_stream: bool = True

    def resolve(self, worker_memory: int | None) -> Limits:
        """These limits with ``session_cache`` decided, for workers of ``worker_memory`` bytes."""
        if self.session_cache is not None:
            return self
        cache = SESSION_CACHE if worker_memory is None else min(SESSION_CACHE, worker_memory // 4)
        return dataclasses.replace(self, session_cache=cache)

    def __post_init__(self) -> None:
        # A message must hold a request's header; a connection must be able
        # to have one request in flight and hold a frame.
        if self.max_requests < 1:
            raise ValueError("--max-requests must be 1 or more")
        if self.max_connections < 1:
            raise ValueError("--max-connections-per-user must be 1 or more")
        if self.max_message < 64 << 10:
            raise ValueError("--max-message must be at least 64K")
        if self.max_push < 1:
            raise ValueError("--max-push must be more than 0")
        if self.max_upload < 1:
            raise ValueError("--max-upload must be more than 0")
        if self.connection_memory < CHUNK_SIZE:
            raise ValueError("--connection-memory must be at least 1M")
        if self.session_cache is not None and self.session_cache < 0:
            raise ValueError("--session-cache must be 0 or more")

    def welcome(self, bulk: bool = False) -> dict[str, int]:
        """What a client is told, to refuse an oversized message before sending it;
        ``resume``: this server resumes a push cut short (see :class:`~m.Holding`);
        ``bulk``: it opens a bulk stream (``bulk``; see :mod:`.bulk`)."""
        return {"max_push": self.max_push, "max_upload": self.max_upload, "max_message": self.max_message,
                "session_cache": self.session_cache or 0, "resume": 1, **({"bulk": 1} if bulk else {})}

    def reader(self) -> Reader:
        """A reader of one client's frames: pushes and uploads handed out at their header, others whole."""
        return Reader(assemble=False, early={m.MessageType.PUSH, m.MessageType.UPLOAD},
                      max_header=self.max_message, max_message=self.max_message,
                      max_early={m.MessageType.PUSH: self.max_push, m.MessageType.UPLOAD: self.max_upload})

    def push_refusal(self, size: int) -> str:
        return (f"this push is {format_size(size)}, more than this server takes in one push "
                f"({format_size(self.max_push)}, rgpu serve --max-push): push the variables "
                "in smaller groups, or save large data where the worker can read it")

    def upload_refusal(self, size: int) -> str:
        return (f"the upload of {format_size(size)} is over this server's limit of "
                f"{format_size(self.max_upload)} per upload (rgpu serve --max-upload); nothing was written")

    def message_refusal(self, kind: str, size: int) -> str:
        return (f"this {kind} message is {format_size(size)}, more than this server takes "
                f"({format_size(self.max_message)}, rgpu serve --max-message); send large data "
                "as pushed variables")
