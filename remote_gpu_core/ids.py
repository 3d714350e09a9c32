"""Type aliases shared by the client, the server and the protocol."""

from __future__ import annotations

from typing import NewType

__all__ = ["JobId", "RequestId", "SessionId", "SlotId", "UserId"]

#: A user's name as stored with their token.
UserId = NewType("UserId", str)
#: A session id: one lease of one client, survives reconnects within the grace.
SessionId = NewType("SessionId", str)
#: A job id: one executed cell or one submitted script.
JobId = NewType("JobId", int)
#: A request id, chosen by the client, unique within one connection.
RequestId = NewType("RequestId", int)
#: A slot's name: ``"gpu0"`` for a GPU, ``"cpu0"`` for a CPU slot.
SlotId = NewType("SlotId", str)
