"""How many websockets each user holds open, and the refusal past the limit.

Every open websocket makes the server hold memory for it: a frame that has
half arrived (up to the protocol's frame size, 1 MiB), the frames the
websockets library reads ahead, and the connection's messages
(``--connection-memory``, see :mod:`.limits`). One user opening thousands
of them (one token is enough) made the server hold gigabytes and slowed
every other user's cells, so each user may hold at most ``limit`` at once
(``rgpu serve --max-connections-per-user``); one more is refused at the
handshake (HTTP 429) with a one-line reason, before it can send a frame.

:class:`UserConnections` only counts: the front door takes a place when it
accepts a websocket and gives it back when that connection is gone.
"""

from __future__ import annotations

__all__ = ["UserConnections"]


class UserConnections:
    """Open websockets per user, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("--max-connections-per-user must be 1 or more")
        self.limit = limit
        self._open: dict[str, int] = {}

    def __getitem__(self, user: str) -> int:
        """How many websockets ``user`` holds open now."""
        return self._open.get(user, 0)

    def take(self, user: str) -> str | None:
        """Count one more websocket of ``user``; or, at the limit, count
        nothing and return why it is refused."""
        held = self[user]
        if held >= self.limit:
            return (f"{user} already has {held} connections open to this server, its most per user "
                    "(rgpu serve --max-connections-per-user): close sessions or notebooks you no "
                    "longer use, or ask the server's admin for a higher limit")
        self._open[user] = held + 1
        return None

    def give_back(self, user: str) -> None:
        """One websocket of ``user`` that :meth:`take` counted is gone."""
        held = self[user] - 1
        if held > 0:
            self._open[user] = held
        else:
            self._open.pop(user, None)
