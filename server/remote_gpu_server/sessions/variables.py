"""Variables pushed into and pulled out of a session's worker.

:func:`push` and :func:`pull` serve the protocol's :class:`~m.Push` and
:class:`~m.Pull` as :mod:`.files` serves uploads and downloads: the bytes
stream through the worker's data channel, and the server checks only the
shape of what names them. It never unpickles, hashes or decompresses a
user's data: large buffers named by content (``digests``, ``cached``,
``have``; see :mod:`remote_gpu_core.protocol.content`) are looked up in the
session's own worker, and compressed ones are opened there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.fingerprint import from_wire
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.compression import CODEC, push_refusal
from remote_gpu_core.protocol.content import check_references

if TYPE_CHECKING:
    from .session import Follows, Replier, Session

__all__ = ["holding", "pull", "push"]


async def push(session: Session, msg: m.Push, conn: Replier) -> None:
    """Set variables; the buffers named in ``msg.cached`` come from the worker's
    own cache of this session. Answers PushDone (naming the digests it no
    longer held, if any: then it set nothing) or Error."""
    bad = push_refusal(msg)
    if bad:
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST,
                                f"push: names, counts and buffers do not match: {bad}"))
        return
    cache = session.context.session_cache
    data = {"op": "push", "names": msg.names, "counts": msg.counts, "digests": msg.digests,
            "cached": msg.cached, "cache": cache, "compressed": msg.compressed, "raw_sizes": msg.raw_sizes,
            "versions": msg.versions, "offsets": msg.offsets}
    await session.send_in(msg.req, conn, data, list(msg.buffers), "push", _refused,
                          lambda reply: m.PushDone(msg.req, list(reply.get("names") or []),
                                                   [str(d) for d in reply.get("missing") or []]))


async def holding(session: Session, msg: m.Holding, conn: Replier) -> None:
    """Answer how much of each buffer ``msg.digests`` names the worker holds
    (whole, or what came of a push cut short; see :class:`~m.Holding`)."""
    bad = check_references(len(msg.digests), msg.digests, [], len(msg.digests))
    if bad or not all(msg.digests):
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, f"holding: {bad or 'a digest is empty'}"))
        return
    async with session.lock:
        worker = await session.prepare(msg.req, conn)
        try:
            reply = await worker.transfers.op({"op": "holding", "digests": msg.digests})
        except WorkerDied as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
            return
    sizes = [int(n) for n in reply.get("sizes") or []]
    await conn.send(m.Held(msg.req, sizes if len(sizes) == len(msg.digests) else [0] * len(msg.digests)))


async def pull(session: Session, msg: m.Pull, conn: Replier, follows: Follows | None = None) -> None:
    """Send variables; buffers whose digest is in ``msg.have`` are named, not
    sent. ``follows``: as in :meth:`.Session.execute`."""
    def refused(reply: dict[str, Any]) -> m.ErrorCode:
        return m.ErrorCode.NAME_ERROR if reply.get("ename") == "NameError" else m.ErrorCode.SERIALIZATION

    partial = list(msg.partial)
    bad = (check_references(len(msg.have), msg.have, [], len(msg.have))
           or check_references(len(partial), partial, [], len(partial))
           or ("a partial size is below 0" if any(n < 0 for n in msg.partial.values()) else None))
    if bad:
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, f"pull: {bad}"))
        return
    cache = session.context.session_cache
    data = {"op": "pull", "names": msg.names, "have": msg.have if cache else [], "compress": CODEC in msg.codecs,
            "name": bool(cache), "partial": msg.partial if cache else {}}
    await session.send_out(msg.req, conn, data, refused, lambda reply: m.PullReply(
        msg.req, list(reply["names"]), list(reply["counts"]), digests=[str(d) for d in reply.get("digests") or []],
        cached=[int(i) for i in reply.get("cached") or []], codec=CODEC if reply.get("compressed") else "",
        compressed=[int(i) for i in reply.get("compressed") or []],
        raw_sizes=[int(n) for n in reply.get("raw_sizes") or []], versions=from_wire(reply.get("versions")),
        offsets=[int(n) for n in reply.get("offsets") or []]), follows)


def _refused(reply: dict[str, Any]) -> m.ErrorCode:
    """A push's refusal: a version difference the worker named, or a value that did not unpickle."""
    if reply.get("ename") == "VersionDifference":
        return m.ErrorCode.VERSION_DIFFERENCE
    return m.ErrorCode.SERIALIZATION
