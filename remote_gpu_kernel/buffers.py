"""The client's side of buffers named by content (see
:mod:`remote_gpu_core.protocol.content`): what this session's worker holds,
and the bytes this client holds, so that neither is sent twice.

:class:`SessionBuffers` belongs to one :class:`~.session.AsyncSession` and
goes with it; nothing is shared between sessions.

- ``remote`` mirrors the worker's cache: the digests pushed, in the order
  the worker used them, under the budget the server named
  (``session_cache`` in its limits). A push leaves out what it holds.
- ``local`` keeps what this client pushed or pulled, by digest: references
  to the buffers themselves, not copies, under the same budget. A user may
  change such an array in place after the push, so a buffer taken from
  ``local`` is hashed again first and, if it changed, asked for again; and
  it is copied, so the pulled variable shares no memory with the local one.

After a reconnect this client knows nothing of what the worker holds:
before a large push, the session asks (see :class:`~m.Holding`) about the
buffers of :func:`worth_asking`, and :func:`resumed_plan` leaves out those
held whole and sends only the rest of those a push cut short left there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol.content import Holdings, digest, digests_of, nbytes
from remote_gpu_core.protocol.serialization import allocate_buffer

__all__ = ["ASK_FROM", "CutPull", "PushPlan", "SessionBuffers", "TransferCounts", "resumed_plan", "worth_asking"]

#: A push carrying at least this many bytes of named buffers asks what the worker holds of them first.
ASK_FROM = 8 << 20


@dataclasses.dataclass
class TransferCounts:
    """Bytes of variables this session moved, and those it did not have to."""

    #: Bytes of buffers a push carried, and those it named by digest instead.
    pushed: int = 0
    push_skipped: int = 0
    #: Bytes of buffers a pull's answer carried, and those taken from this client's own.
    pulled: int = 0
    pull_skipped: int = 0
    #: Pushes sent again because the worker no longer held a buffer, and
    #: pulls asked again because a buffer held here had changed.
    push_misses: int = 0
    pull_misses: int = 0
    #: Bytes of buffers as they crossed, compressed where they were.
    wire_pushed: int = 0
    wire_pulled: int = 0


@dataclasses.dataclass(frozen=True)
class PushPlan:
    """One attempt at a push: each buffer's digest, those left out, those carried
    (``offsets``: none, or the bytes of each carried one that the worker holds
    from a push cut short, which are not sent)."""

    digests: list[str]
    cached: list[int]
    carried: list[Any]
    offsets: list[int] = dataclasses.field(default_factory=list)


class CutPull:
    """What came of a pull cut short by a dropped connection: each large,
    named buffer it had begun, by digest, with the bytes of it that came.

    The next pull of the session offers them (:meth:`offer`); its answer
    carries only the rest, which :meth:`joined` puts after them.
    """

    def __init__(self, fields: dict[str, Any], came: Sequence[tuple[Any, int]]) -> None:
        digests = [str(d) for d in fields.get("digests") or []]
        skip = set(int(i) for i in fields.get("cached") or [])
        squeezed = set(int(k) for k in fields.get("compressed") or [])
        carried = [i for i in range(len(digests)) if i not in skip]
        self.parts: dict[str, tuple[Any, int]] = {}
        for k, (buf, received) in enumerate(came):
            key = digests[carried[k]] if k < len(carried) else ""
            if key and k not in squeezed and 0 < received < nbytes(buf):
                self.parts[key] = (buf, received)

    def offer(self) -> dict[str, int]:
        return {key: received for key, (_, received) in self.parts.items()}

    def joined(self, digests: Sequence[str], cached: Sequence[int], offsets: Sequence[int],
               carried: Sequence[Any]) -> list[Any]:
        """``carried`` (a pull's answer's buffers) with each that left out its
        first ``offsets[k]`` bytes put after those held here."""
        if not offsets:
            return list(carried)
        skip = set(cached)
        sent = [d for i, d in enumerate(digests) if i not in skip]
        out = list(carried)
        for k, offset in enumerate(offsets):
            if not offset:
                continue
            held = self.parts.get(sent[k] if k < len(sent) else "")
            head = memoryview(held[0]).cast("B") if held is not None else None
            if held is None or head is None or held[1] != offset or nbytes(carried[k]) != head.nbytes - offset:
                raise ProtocolError("the pull's answer left out bytes this client does not hold")
            head[offset:] = memoryview(carried[k]).cast("B")
            out[k] = held[0]
        return out


def worth_asking(plan: PushPlan, buffers: Sequence[Any]) -> list[int]:
    """The indices of ``plan``'s carried, named buffers, if they come to
    :data:`ASK_FROM` bytes or more (else none: asking costs a round trip)."""
    skip = set(plan.cached)
    named = [i for i, d in enumerate(plan.digests) if d and i not in skip]
    return named if sum(nbytes(buffers[i]) for i in named) >= ASK_FROM else []


def resumed_plan(plan: PushPlan, buffers: Sequence[Any], asked: Sequence[int], held: Sequence[int]) -> PushPlan:
    """``plan`` once the worker said it holds ``held[j]`` bytes of buffer
    ``asked[j]``: left out where it holds all, sent from there where some."""
    have = dict(zip(asked, held))
    cached = sorted(set(plan.cached) | {i for i in asked if have[i] >= nbytes(buffers[i])})
    carried = [i for i in range(len(buffers)) if i not in set(cached)]
    offsets = [have.get(i, 0) for i in carried]
    return PushPlan(plan.digests, cached, [buffers[i] for i in carried], offsets if any(offsets) else [])


class SessionBuffers:
    """See the module docstring. ``limit``: the server's ``session_cache`` (0: off)."""

    def __init__(self, limit: int) -> None:
        self.remote = Holdings(limit)
        self.local = Holdings(limit)
        self._bytes: dict[str, Any] = {}
        self.counts = TransferCounts()

    @property
    def enabled(self) -> bool:
        return self.remote.limit > 0

    def plan_push(self, buffers: Sequence[Any], digests: list[str] | None = None,
                  trust_remote: bool = True) -> PushPlan:
        """What to send of ``buffers``: those the worker is thought to hold
        (``trust_remote``) are named only. ``digests`` from an earlier attempt."""
        if not self.enabled:
            return PushPlan([], [], list(buffers))
        if digests is None:
            digests = digests_of(buffers)
        cached = [i for i, d in enumerate(digests) if trust_remote and d and d in self.remote]
        skip = set(cached)
        return PushPlan(digests, cached, [b for i, b in enumerate(buffers) if i not in skip])

    def pushed(self, plan: PushPlan, buffers: Sequence[Any]) -> None:
        """The push of ``plan`` was done: the worker holds all of its buffers."""
        skip = set(plan.cached)
        for i, (d, buf) in enumerate(zip(plan.digests, buffers)):
            size = nbytes(buf)
            if i in skip:
                self.counts.push_skipped += size
            else:
                self.counts.pushed += size
            if d:
                self.remote.use(d, size)
                self._keep(d, buf)
        if not plan.digests:
            self.counts.pushed += sum(nbytes(b) for b in buffers)

    def missed(self, plan: PushPlan, buffers: Sequence[Any], missing: Sequence[str]) -> None:
        """The worker held none of ``missing`` and set nothing; what the push carried it keeps."""
        self.counts.push_misses += 1
        self.remote.discard(missing)
        skip = set(plan.cached)
        for i, (d, buf) in enumerate(zip(plan.digests, buffers)):
            if i not in skip:
                self.counts.pushed += nbytes(buf)
                if d and d not in missing:
                    self.remote.use(d, nbytes(buf))

    def have(self) -> list[str]:
        """The digests a pull may name instead of sending."""
        return list(self.local) if self.enabled else []

    def pulled(self, digests: Sequence[str], cached: Sequence[int],
               carried: Sequence[Any]) -> tuple[list[Any], list[str]]:
        """``(buffers, [])``: the buffers of a pull's answer, the ``cached`` ones
        from this client's own (checked, copied); or ``([], changed)`` where one
        of those changed here or is gone: the digests to ask for again."""
        skip = set(cached)
        changed = [digests[i] for i in cached if not self._intact(digests[i])]
        if changed:
            self.counts.pull_misses += 1
            return [], changed
        out: list[Any] = []
        rest = iter(carried)
        for i, d in enumerate(digests or [""] * len(carried)):
            if i in skip:
                held = self._bytes[d]
                copy = allocate_buffer(nbytes(held))
                memoryview(copy).cast("B")[:] = memoryview(held).cast("B")
                self.counts.pull_skipped += nbytes(copy)
                self.local.use(d, nbytes(copy))
                out.append(copy)
                continue
            buf = next(rest)
            self.counts.pulled += nbytes(buf)
            if d:
                self._keep(d, buf)
            out.append(buf)
        return out, []

    def _intact(self, key: str) -> bool:
        held = self._bytes.get(key)
        if held is not None and digest(held) == key:
            return True
        self.local.discard([key])
        self._bytes.pop(key, None)
        return False

    def _keep(self, key: str, buf: Any) -> None:
        self._bytes[key] = buf
        for gone in self.local.use(key, nbytes(buf)):
            self._bytes.pop(gone, None)
