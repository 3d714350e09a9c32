"""Where the Remote GPU kernel publishes: on IOPub, under a notebook request.

:class:`IOPub` is the kernel's IOPub socket with the Jupyter session that
signs what goes out on it. :class:`CellOutput` publishes there as replies
to one request of the notebook (a cell, a widget's message), whatever task
runs: the worker's messages go out whole (content, metadata, buffers) under
that request, and the kernel's own lines (the lease, a transfer) are shown
in the words of :mod:`remote_gpu_kernel.notices`.
:class:`Parents` remembers recent requests, so that what the worker
publishes after its request ended (a thread, a timer) goes out under the
request that it names; :class:`AfterIdle` holds back what the worker
published after a request's idle until this kernel's idle for it is out.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from jupyter_client.session import Session

from remote_gpu_core.protocol import messages as m

from .. import notices
from ..progress import DisplayLines, ProgressCallback, ProgressLines, progress_wanted
from ..session import AsyncSession

__all__ = ["NOT_FORWARDED", "AfterIdle", "CellOutput", "IOPub", "Parents"]

#: Worker messages that this kernel publishes itself, or that mean nothing here.
NOT_FORWARDED = frozenset({"status", "execute_input", "input_request"})
#: How many recent notebook requests :class:`Parents` keeps.
PARENTS_KEPT = 256


def _red(text: str) -> str:
    return f"\x1b[0;31m{text}\x1b[0m"


class IOPub:
    """The kernel's IOPub socket; ``topic(msg_type)`` is the ZMQ topic of a message type."""

    def __init__(self, session: Session, socket: Any, topic: Callable[[str], bytes]) -> None:
        self.session = session
        self.socket = socket
        self.topic = topic

    def send(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any], buffers: Any = None,
             metadata: dict[str, Any] | None = None) -> None:
        """Publish one message as a reply to the notebook request ``parent``."""
        self.session.send(self.socket, msg_type, content, parent, metadata=metadata or {},
                          ident=self.topic(msg_type), buffers=list(buffers) if buffers else None)


class CellOutput:
    """Publishes on ``iopub`` as replies to the notebook request ``parent``.

    ``execution_count`` is the kernel's count while the request runs (an
    ``execute_result`` and an error reply carry it); ``comm_ids`` are the
    comms open between the notebook and the worker, which the worker's
    ``comm_open`` and ``comm_close`` passing here add to and take from.
    """

    def __init__(self, iopub: IOPub, parent: dict[str, Any], execution_count: int,
                 comm_ids: set[str]) -> None:
        self.iopub = iopub
        self.parent = parent
        self.execution_count = execution_count
        self.comm_ids = comm_ids
        self._line = notices.StatusLine(self.send)
        self._restoring = False  # the line says the cell waits to restore a parked session

    @property
    def header(self) -> dict[str, Any]:
        return dict(self.parent.get("header") or {})

    def send(self, msg_type: str, content: dict[str, Any], buffers: Any = None,
             metadata: dict[str, Any] | None = None) -> None:
        self.iopub.send(msg_type, content, self.parent, buffers, metadata)

    def forward(self, msg: m.Output) -> None:
        """A worker's message, whole; an ``execute_result`` takes this kernel's count."""
        if msg.msg_type in NOT_FORWARDED:
            return
        if msg.msg_type in ("comm_open", "comm_close"):
            comm_id = str(msg.content.get("comm_id", ""))
            if msg.msg_type == "comm_open":
                self.comm_ids.add(comm_id)
            else:
                self.comm_ids.discard(comm_id)
        content = msg.content
        if msg.msg_type == "execute_result":
            content = {**content, "execution_count": self.execution_count}
        self.send(msg.msg_type, content, msg.buffers, msg.metadata)

    def stream(self, text: str, name: str = "stderr") -> None:
        self.send("stream", {"name": name, "text": text})

    def error(self, ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
        """Publish an error; return the matching ``execute_reply`` content."""
        content = {"ename": ename, "evalue": evalue,
                   "traceback": traceback or [f"{_red(ename)}: {evalue}"]}
        self.send("error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def show(self, text: str) -> None:
        """A line of information for this request, updated in place by the next."""
        self._line.show(text)

    def inform(self, text: str) -> None:
        """A line of information of its own (a file fetched), kept as it is."""
        notices.StatusLine(self.send).show(f"{notices.PREFIX}{text}")

    def transfer_lines(self) -> ProgressCallback | None:
        """Where this request's pushes and pulls show their progress (see
        :mod:`..progress`): a line each in its output; None for a silent
        request or with ``RGPU_PROGRESS=0``."""
        content = self.parent.get("content") or {}
        if content.get("silent") or not progress_wanted():
            return None
        return ProgressLines(DisplayLines(self.send))

    # LeaseReporter
    def queued(self, position: int) -> None:
        self.show(notices.queued(position))

    def granted(self, session: AsyncSession, url: str) -> None:
        self.show(notices.granted(session.slots, url, session.id, session.waited, session.user,
                                  session.mismatch))

    def resumed(self, session: AsyncSession, url: str) -> None:
        if session.parked:
            self.show(notices.resumed_parked(session.id, "this cell"))
            return
        self.show(notices.resumed(session.slots, session.id))

    def restoring(self, position: int) -> None:
        self._restoring = True
        self.show(notices.restoring(position))

    def notice(self, text: str) -> None:
        if self._restoring:  # the server's next word after the wait is what it restored
            self._restoring = False
            self.show(f"{notices.PREFIX}{text}")
            return
        self.stream(f"{notices.PREFIX}{text}\n")

    def missed(self, outputs: list[m.Output]) -> None:
        self.notice("what the session printed while this notebook was disconnected:")
        for msg in outputs:
            self.forward(msg)


class Parents:
    """The most recent notebook requests, by ``msg_id``."""

    def __init__(self) -> None:
        self._parents: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def remember(self, parent: dict[str, Any]) -> None:
        msg_id = (parent.get("header") or {}).get("msg_id")
        if msg_id:
            self._parents[msg_id] = parent
            self._parents.move_to_end(msg_id)
            while len(self._parents) > PARENTS_KEPT:
                self._parents.popitem(last=False)

    def get(self, msg_id: str) -> dict[str, Any]:
        """The request ``msg_id``: the whole request if it is remembered, else a
        header with just that id (which is what frontends route by); ``{}``
        for no id, as the worker published it."""
        parent = self._parents.get(msg_id)
        if parent is not None:
            return parent
        return {"header": {"msg_id": msg_id}} if msg_id else {}


class AfterIdle:
    """What the worker published after one of this kernel's requests went idle
    there, held until this kernel's own idle for that request has gone out.

    ipykernel runs what a cell left behind (an asyncio task that fills an
    Output widget) after the cell's idle status, so a notebook runner
    (nbclient, papermill, ``nbconvert --execute``) has moved on and does not
    record it. The server relays it as output of no request, and that may
    overtake the request's own answer: without holding it, it would go out
    inside the cell here. Call :meth:`begin` when a request starts,
    :meth:`hold` with each such output, and :meth:`end` right after the
    request's idle, then publish what it returns.
    """

    def __init__(self) -> None:
        self._held: dict[str, list[m.Output]] = {}

    def begin(self, parent: dict[str, Any]) -> None:
        msg_id = (parent.get("header") or {}).get("msg_id")
        if msg_id:
            self._held[msg_id] = []

    def hold(self, msg: m.Output) -> bool:
        """Keep ``msg`` if the request it names has not gone idle here yet."""
        held = self._held.get(msg.parent) if msg.parent else None
        if held is None:
            return False
        held.append(msg)
        return True

    def end(self, parent: dict[str, Any] | None) -> list[m.Output]:
        """What was held for the request ``parent``, which has gone idle."""
        return self._held.pop(((parent or {}).get("header") or {}).get("msg_id") or "", [])
