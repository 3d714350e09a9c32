"""The messages that move a session's variables, and what their answers give.

A push or a pull names large buffers by content and may compress what it
carries (see :mod:`.buffers` and :mod:`.compressing`); these functions build
such a :class:`~m.Push` or :class:`~m.Pull` and take a pull's answer apart.
:class:`~.session.AsyncSession` sends them on its own (``push``, ``pull``)
or back to back with a cell (``run``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from remote_gpu_core.fingerprint import explain_unpickling, versions_of
from remote_gpu_core.protocol import dump_values, load_values
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.compression import CODEC
from remote_gpu_core.protocol.content import nbytes
from remote_gpu_core.protocol.serialization import BufferLike

from .buffers import CutPull, PushPlan, SessionBuffers
from .compressing import CompressionPolicy, decompressed

__all__ = ["Dumped", "dump", "next_have", "pull_request", "push_request", "take_pull", "take_push"]


@dataclasses.dataclass(frozen=True)
class Dumped:
    """Values pickled for a push: ``counts[i]`` of ``buffers`` are ``names[i]``'s;
    ``versions``: this end's versions of the packages the pickles name."""

    names: list[str]
    counts: list[int]
    buffers: list[BufferLike]
    versions: dict[str, str]


def dump(values: Mapping[str, Any]) -> Dumped:
    """Pickle ``values`` for a push; SerializationError names one that cannot be."""
    modules: set[str] = set()
    names, counts, buffers = dump_values(values, modules)
    return Dumped(names, counts, buffers, versions_of(modules))


def push_request(compression: CompressionPolicy, dumped: Dumped,
                 plan: PushPlan) -> tuple[Callable[[int], m.Message], int]:
    """A push of ``plan`` (made for request id ``req`` when called), and the
    bytes it carries over the wire (compressed where the policy says; not
    one that resumes a push cut short, whose buffers go on from their offsets)."""
    if plan.offsets:
        carried = [memoryview(b).cast("B")[n:] if n else b for b, n in zip(plan.carried, plan.offsets)]
        packed: list[int] = []
        raw_sizes: list[int] = []
    else:
        carried, packed, raw_sizes = compression.compress(plan.carried)

    def make(req: int) -> m.Message:
        return m.Push(req, dumped.names, dumped.counts, tuple(carried), digests=plan.digests,
                      cached=plan.cached, codec=CODEC if packed else "", compressed=packed,
                      raw_sizes=raw_sizes, versions=dumped.versions, offsets=plan.offsets)

    return make, sum(nbytes(b) for b in carried)


def take_push(buffers: SessionBuffers, compression: CompressionPolicy, plan: PushPlan, values: Sequence[Any],
              done: m.PushDone, wire: int, seconds: float) -> bool:
    """Whether the push of ``plan`` (the buffers ``values``; ``wire`` bytes that
    took ``seconds``) set its variables; False where the worker no longer held
    a buffer it named, and then set nothing (``done.missing``)."""
    compression.observe(wire, seconds)
    buffers.counts.wire_pushed += wire
    if done.missing:
        buffers.missed(plan, values, done.missing)
        return False
    buffers.pushed(plan, values)
    return True


def pull_request(compression: CompressionPolicy, names: Sequence[str], have: Sequence[str],
                 after: int = 0, cut: CutPull | None = None) -> Callable[[int], m.Message]:
    """A pull of ``names`` that offers the buffers ``have`` (digests held here),
    what came of a pull ``cut`` short, and the codecs the policy takes;
    ``after``: the request it follows."""
    partial = cut.offer() if cut is not None else {}
    return lambda req: m.Pull(req, list(names), after=after, have=list(have), codecs=compression.codecs(),
                              partial=partial)


def take_pull(buffers: SessionBuffers, compression: CompressionPolicy, reply: m.PullReply,
              seconds: float, cut: CutPull | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The values a pull's answer gives (it took ``seconds``; it may go on from
    what came of a pull ``cut`` short), or None and the digests it named
    that this client no longer holds as they were."""
    wire = sum(nbytes(b) for b in reply.buffers)
    compression.observe(wire, seconds)
    buffers.counts.wire_pulled += wire
    whole = (cut or CutPull({}, [])).joined(reply.digests, reply.cached, reply.offsets, reply.buffers)
    carried = decompressed(whole, reply.compressed, reply.raw_sizes)
    whole, gone = buffers.pulled(reply.digests, reply.cached, carried)
    if gone:
        return None, list(gone)
    return load_values(reply.names, reply.counts, whole, explain_unpickling(reply.versions, from_notebook=False)), []


def next_have(have: Sequence[str], gone: Sequence[str]) -> list[str]:
    """What to offer when asking again, after ``gone`` changed here since: the
    rest of ``have``, or nothing where the answer named what was not offered."""
    changed = set(gone)
    return [d for d in have if d not in changed] if changed.issubset(have) else []
