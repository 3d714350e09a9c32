"""Whether each request of a connection succeeded, for the requests that follow one.

A client may send a push, a cell and a pull back to back (one round trip
for a ``%%gpu -i a -o b`` cell): the cell names the push it follows
(``after``), the pull names the cell. Requests that run in turn take the
session's lock in the order they came, so when a follower has its turn,
the request it follows has given its final answer; this table says what
that answer was. It is read from the answers themselves, as they are sent,
so every way a request can fail (refused at the door, an error it
answered, an exception, a cell that raised, a push that named buffers the
worker no longer holds and so set nothing) counts as failing.

No I/O: the connection calls :meth:`Outcomes.expect` when a request comes,
:meth:`Outcomes.answered` with every message it sends,
:meth:`Outcomes.failed` for a request it refuses, :meth:`Outcomes.settle`
when a request's handler has ended and :meth:`Outcomes.interrupt` when
the client interrupts; a follower asks :meth:`Outcomes.refusal` at its turn.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

from remote_gpu_core.protocol import messages as m

__all__ = ["KEEP", "Outcomes"]

#: How many requests' outcomes a connection remembers (a follower comes
#: right behind the request it follows; this bounds what a client can make
#: the server hold).
KEEP = 256

#: Final answers that say a request succeeded (an ExecuteDone says so in its status).
_SUCCEEDED = (m.PushDone, m.PullReply, m.UploadDone, m.DownloadReply, m.ReplayDone, m.Parked,
              m.LeaseGranted)


class Outcomes:
    """Request id → succeeded (True), failed (False) or not answered yet (None)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._outcomes: collections.OrderedDict[int, bool | None] = collections.OrderedDict()
        self._interrupted: set[int] = set()  # failed: an interrupt came before their answer

    def _set(self, req: int, outcome: bool | None) -> None:
        self._outcomes[req] = outcome
        self._outcomes.move_to_end(req)
        while len(self._outcomes) > self._keep:
            self._interrupted.discard(self._outcomes.popitem(last=False)[0])

    def interrupt(self) -> None:
        """The client interrupted: every request not answered yet counts as
        failed, so that nothing sent to follow it runs (an interrupt during the
        push of a cell's inputs stops the cell before it began)."""
        for req, outcome in self._outcomes.items():
            if outcome is None:
                self._outcomes[req] = False
                self._interrupted.add(req)

    def expect(self, req: int) -> None:
        """Request ``req`` came and will run in turn; its answer is to come."""
        if req:
            self._set(req, None)

    def failed(self, req: int) -> None:
        """Request ``req`` was refused, or failed without a final answer."""
        if req:
            self._set(req, False)

    def answered(self, message: m.Message) -> None:
        """``message`` is being sent: a final answer settles the request it answers."""
        req = getattr(message, "req", 0)
        if not req or self._outcomes.get(req, False) is not None:
            return  # not a request that runs in turn, or settled already
        if isinstance(message, m.Error):
            self._outcomes[req] = False
        elif isinstance(message, m.ExecuteDone):
            self._outcomes[req] = message.status == "ok"
        elif isinstance(message, m.PushDone) and message.missing:
            self._outcomes[req] = False  # it set nothing: the worker no longer held some of its buffers
        elif isinstance(message, _SUCCEEDED):
            self._outcomes[req] = True

    def settle(self, req: int) -> None:
        """The handler of ``req`` has ended: an answer it did not give is a failure."""
        if req and req in self._outcomes and self._outcomes[req] is None:
            self._outcomes[req] = False

    def refusal(self, after: int, req: int) -> str | None:
        """Why request ``req``, which follows request ``after``, must not run; None if it may."""
        if after == req or after not in self._outcomes:
            return (f"not run: it follows request {after}, which is not an earlier request of this "
                    "connection that runs in turn")
        outcome = self._outcomes[after]
        if outcome is None:
            return f"not run: request {after}, which it follows, has not finished"
        if after in self._interrupted:
            return f"not run: request {after}, which it follows, was interrupted"
        if not outcome:
            return f"not run: request {after}, which it follows, failed"
        return None

    def follows(self, after: int, req: int) -> Callable[[], str | None] | None:
        """For request ``req`` that follows request ``after`` (0: none): what its
        session asks at its turn (:meth:`refusal`); None for one that follows none."""
        if not after:
            return None
        return functools.partial(self.refusal, after, req)
