"""Cells and the rest of the Jupyter traffic: code in, outputs out.

:class:`Execute` runs a cell and :class:`ShellRequest` carries any other
Jupyter shell request (completion, inspection, a widget's comm messages);
what the worker publishes comes back as :class:`Output`, with
:class:`Notice` lines from the server, and the request ends with
:class:`ExecuteDone` or :class:`ShellReply`. :class:`Input` answers a
cell's ``input()``, :class:`Replay` fetches what a client missed and
:class:`Interrupt` stops a cell.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Buffers, Message, MessageType

__all__ = [
    "Execute", "ExecuteDone", "Input", "Interrupt", "Notice", "Output", "Replay",
    "ReplayDone", "ShellReply", "ShellRequest",
]


@dataclasses.dataclass(frozen=True)
class Execute(Message):
    """Run ``code``. ``parent`` is the header of the Jupyter request this cell
    answers (``msg_id``, ``session``, ``username``, ``date``, ``msg_type``,
    ``version``); the worker gets its request under ``parent["msg_id"]``.
    Empty: the server picks an id. ``execution_count``, where not 0, is the
    number the notebook shows for this cell: the worker's IPython takes it
    (its tracebacks say ``Cell In[N]``), whichever worker runs the cell.
    ``fetch``: the client serves files of its notebook's folder while the
    cell runs (:class:`~.transfers.Fetch`); without it the server asks nothing.
    ``refetch``: files it served this session that changed in the notebook's
    folder since (names as fetched): the worker drops its copies before the
    cell, where the cell left them as they came, so the next open fetches
    them again.

    ``after``, where not 0, is the id of an earlier request of this
    connection that runs in turn (the :class:`~.transfers.Push` of the
    cell's inputs): the cell runs only if that one succeeded, else it is
    answered with ``ErrorCode.NOT_RUN``. So a client sends a push, the cell
    and a :class:`~.transfers.Pull` of its results back to back, without
    waiting for each answer: one round trip."""

    type = MessageType.EXECUTE
    omitted_while_empty = ("execution_count", "fetch", "after", "refetch")
    req: int
    code: str
    timeout: float | None = None
    silent: bool = False
    store_history: bool = True
    allow_stdin: bool = False
    parent: dict[str, Any] = dataclasses.field(default_factory=dict)
    execution_count: int = 0
    fetch: bool = False
    after: int = 0
    refetch: list[str] = dataclasses.field(default_factory=list)


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
