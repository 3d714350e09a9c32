"""Which Jupyter comms a worker has open, from the traffic that passes the server.

A client's comm messages (a widget moved in the browser) are forwarded to
the worker only for comms the worker has: the ones it opened (``comm_open``
on its IOPub) and the ones a client opened and it did not refuse, until
either side closes them. Everything else is answered at once with a reason
the user can act on, rather than sent to a kernel that would drop it
silently: a comm that was closed, a comm of a worker that died (its
session has a fresh worker now), or the server's own variable-transfer
comm, which no client may touch.

No I/O: the worker feeds :meth:`CommTable.published` with what it
publishes; the session asks :meth:`CommTable.refusal` before it forwards a
client's comm message and reports it with :meth:`CommTable.sent`.
"""

from __future__ import annotations

from typing import Any

from ..worker_process.kernel import COMM_TARGET

__all__ = ["COMM_MESSAGES", "CommTable"]

COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})


class CommTable:
    """The open comms of one worker; ``reserved`` is the server's own comm id."""

    def __init__(self, reserved: str = "", reserved_target: str = COMM_TARGET) -> None:
        self.reserved = reserved
        self.reserved_target = reserved_target
        self.open: set[str] = set()
        #: Comms of this session's earlier workers, which died with them.
        self.dead: dict[str, str] = {}

    def published(self, msg_type: str, content: dict[str, Any]) -> None:
        """The worker published ``msg_type`` (any message; comms are noted)."""
        comm_id = content.get("comm_id") if msg_type in COMM_MESSAGES else None
        if not isinstance(comm_id, str) or comm_id == self.reserved:
            return
        if msg_type == "comm_open":
            self.open.add(comm_id)
        elif msg_type == "comm_close":
            self.open.discard(comm_id)

    def refusal(self, msg_type: str, content: dict[str, Any]) -> str | None:
        """Why a client's comm message must not reach the worker; None if it may."""
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str) or not comm_id:
            return f"{msg_type} without a comm_id"
        if comm_id == self.reserved or (msg_type == "comm_open"
                                        and content.get("target_name") == self.reserved_target):
            return f"comm {comm_id!r} belongs to the GPU server and cannot be used from a notebook"
        if msg_type == "comm_open":
            if comm_id in self.open:
                return f"a comm with id {comm_id!r} is already open on the remote worker"
            return None
        if comm_id in self.open:
            return None
        if comm_id in self.dead:
            return (f"this widget's remote worker {self.dead[comm_id]}; its widgets stopped working "
                    "with it: run the cell that made it again")
        return f"comm {comm_id!r} is not open on the remote worker (it was closed)"

    def sent(self, msg_type: str, content: dict[str, Any]) -> None:
        """A client's comm message (that :meth:`refusal` let through) went to the worker."""
        comm_id = content.get("comm_id")
        if msg_type == "comm_open":
            self.open.add(str(comm_id))  # a target the worker lacks answers with comm_close
        elif msg_type == "comm_close":
            self.open.discard(str(comm_id))

    def inherit(self, old: CommTable, how: str) -> None:
        """This worker replaces ``old``, which ended ``how`` ('died (signal SIGKILL)')."""
        self.dead.update(old.dead)
        self.dead.update({comm_id: how for comm_id in old.open})
