"""Where a request's answers go: the connection that sent it, as the session's
parts see it (:class:`Replier`), apart from :mod:`.session` so that its
collaborators (:mod:`.fetching`) need not import the session itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from remote_gpu_core.protocol import messages as m

__all__ = ["Replier"]


class Replier(Protocol):
    """Where a request's answers go: the connection that sent it.

    Both methods swallow a closed connection: what a cell printed is in the
    journal whether or not its client is still there.
    """

    async def send(self, message: m.Message) -> None: ...

    async def send_stream(self, message: m.Message, lengths: list[int],
                          pieces: AsyncIterator[Any]) -> None: ...
