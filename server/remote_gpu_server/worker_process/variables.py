"""Inside the worker: the ``push`` and ``pull`` transfer ops, with buffers named by content.

``{"op": "push", "names", "counts", "digests", "cached", "cache"}``: the
buffers not ``cached`` come through the data channel; the ``cached`` ones
are taken from this session's :class:`~.buffer_cache.BufferCache` (whose
budget is ``cache`` bytes). If one of those is no longer held, nothing is
set and the reply names the ``missing`` digests: the client sends them
again with their bytes (what did come is kept, so it is not sent twice).

A push cut short (the connection dropped: the data channel aborts it)
leaves what came of its large named buffers in the cache's
:attr:`~.buffer_cache.BufferCache.cut`; ``{"op": "holding", "digests"}``
says how many bytes of each are held (whole or cut), and a push's
``offsets`` (one per buffer that comes) go on filling a cut one from there.
An offset that is no longer held is answered as ``missing``, like a
``cached`` buffer.

``{"op": "pull", "names", "have", "partial"}``: the reply names every large
buffer by digest and leaves out of the data channel those the client said
it has, and the first ``partial[digest]`` bytes of those it holds that much
of from a pull cut short (the reply's ``offsets``).

A push names the client's versions of the packages its pickles reference
(``versions``); a value that does not unpickle here, where one of them has
another version, fails with :class:`~remote_gpu_core.errors.VersionDifference`
naming it, not with what pickle raised. A pull's reply names the worker's
versions of the packages its pickles reference, for the client to do the same.

Either way, a large buffer may travel compressed (see
:mod:`remote_gpu_core.protocol.compression`): a push's ``compressed``
indices (into what comes) with their ``raw_sizes``; a pull's answer
compresses what its sample says shrinks, where the request says
``compress`` (the client's decision).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.fingerprint import explain_unpickling, versions_of
from remote_gpu_core.protocol.compression import compress, compressible, decompress_into
from remote_gpu_core.protocol.content import THRESHOLD, check_references, digests_of, nbytes
from remote_gpu_core.protocol.serialization import allocate_buffer, dump_values, load_values

from .buffer_cache import BufferCache, CacheFiller, ResumingFiller, copy_on_write, sealed

__all__ = ["holding", "pull", "push"]

#: Receives a transfer's buffers into a sink made from their sizes (see ``WorkerChannel.receive``).
Receive = Callable[[Callable[[list[int]], CacheFiller]], Any]


def push(user_ns: dict[str, Any], cache: BufferCache, data: dict[str, Any], receive: Receive) -> dict[str, Any]:
    """Do a push (see the module docstring); returns the reply."""
    names = [str(n) for n in data.get("names") or []]
    counts = [int(c) for c in data.get("counts") or []]
    digests = [str(d) for d in data.get("digests") or []]
    cached = [int(i) for i in data.get("cached") or []]
    cache.set_limit(int(data.get("cache") or 0))
    total = sum(counts)
    named_only = set(cached)
    carried = [i for i in range(total) if i not in named_only]
    keep = bool(digests) and cache.holdings.limit > 0
    compressed = dict(zip((int(i) for i in data.get("compressed") or []),
                          (int(n) for n in data.get("raw_sizes") or [])))  # by index into what came
    offsets = [int(n) for n in data.get("offsets") or []]  # checked by the server
    lost = {k for k, n in enumerate(offsets) if n and (not keep or cache.cut.received(digests[carried[k]]) < n)}
    fillers: list[CacheFiller] = []

    def sink(sizes: list[int]) -> CacheFiller:
        bad = check_references(total, digests, cached, len(sizes))
        if bad:
            raise ProtocolError(f"push: {bad}")
        named = [keep and bool(digests[i]) and k not in compressed and k not in lost for k, i in enumerate(carried)]
        resumed = {}
        for k, offset in enumerate(offsets):
            took = cache.cut.take(digests[carried[k]]) if offset and k not in lost else None
            if took is not None:
                resumed[k] = (took[0], offset)
        fillers.append(ResumingFiller(sizes, named, resumed) if resumed else CacheFiller(sizes, named))
        return fillers[-1]

    made: list[int] = []  # memfds of decompressed buffers
    try:
        receive(sink)
        arrived = fillers[-1].finish()
        for k, size in compressed.items():  # a corrupt one fails the push before anything is kept
            fd, buf = arrived[k] = _decompressed(arrived[k][1], size, keep and bool(digests[carried[k]]))
            if fd is not None:
                made.append(fd)
    except BaseException as exc:
        if isinstance(exc, (ConnectionError, TimeoutError)) and fillers and keep:
            # Cut short: what came stays for the client to send only the rest.
            cache.keep_cut([(digests[carried[k]], fd, n) for k, fd, n in fillers[-1].cut()])
        for filler in fillers:
            filler.abandon()
        for made_fd in made:
            os.close(made_fd)
        raise
    # What came, by index; a memfd that came is the cache's from here on,
    # mapped before the cache may let go of it.
    came: dict[int, Any] = {}
    for i, (fd, buf) in zip(carried, arrived):
        if fd is None:
            came[i] = buf
        else:
            size = os.fstat(fd).st_size
            came[i] = copy_on_write(fd, size)
            cache.add(digests[i], fd, size)
    missing = sorted({digests[i] for i in cached if cache.get(digests[i]) is None}
                     | {digests[carried[k]] for k in lost})
    if missing:
        return {"ok": True, "names": [], "missing": missing}
    buffers: list[Any] = []
    for i in range(total):
        if i in came:
            buffers.append(came[i])
            continue
        held = cache.get(digests[i])
        assert held is not None  # checked above, and nothing was added since
        buffers.append(copy_on_write(*held))
        cache.add(digests[i], *held)  # used now
    user_ns.update(load_values(names, counts, buffers, explain_unpickling(data.get("versions"), from_notebook=True)))
    return {"ok": True, "names": names}


def holding(cache: BufferCache, data: dict[str, Any]) -> dict[str, Any]:
    """The bytes held of each buffer ``data["digests"]`` names: all of one cached, what came of one cut."""
    sizes = []
    for key in (str(d) for d in data.get("digests") or []):
        held = cache.get(key)
        sizes.append(held[1] if held is not None else cache.cut.received(key))
    return {"ok": True, "sizes": sizes}


def _decompressed(data: Any, size: int, into_memfd: bool) -> tuple[int | None, Any]:
    """A compressed buffer that came, decompressed: ``(sealed memfd, None)`` or ``(None, buffer)``."""
    if into_memfd:
        fd = sealed(size, lambda view: decompress_into(data, view))
        if fd is not None:
            return fd, None
    out = allocate_buffer(size)
    decompress_into(data, out)
    return None, out


def pull(user_ns: dict[str, Any], data: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Pickle the variables of a pull: ``(reply, buffers to send)``."""
    names = [str(n) for n in data.get("names") or []]
    missing = [n for n in names if n not in user_ns]
    if missing:
        raise NameError(f"name {missing[0]!r} is not defined in the remote namespace")
    modules: set[str] = set()
    names, counts, bufs = dump_values({n: user_ns[n] for n in names}, modules)
    have = set(str(d) for d in data.get("have") or [])
    digests = digests_of(bufs) if data.get("name", True) else [""] * len(bufs)  # no cache: no names
    cached = [i for i, d in enumerate(digests) if d and d in have]
    skip = set(cached)
    send = [b for i, b in enumerate(bufs) if i not in skip]
    compressed, raw_sizes = [], []
    if data.get("compress"):  # the client's call: its link is slower than the codec
        for k, buf in enumerate(send):
            if nbytes(buf) >= THRESHOLD and compressible(buf).worth:
                compressed.append(k)
                raw_sizes.append(nbytes(buf))
                send[k] = compress(buf)
    # What the client holds of a pull cut short is left out (not of one compressed now).
    partial = {str(d): int(n) for d, n in (data.get("partial") or {}).items()}
    carried = [i for i in range(len(bufs)) if i not in skip]
    offsets = [0] * len(send)
    for k, i in enumerate(carried):
        held = partial.get(digests[i], 0) if digests[i] and k not in compressed else 0
        if 0 < held < nbytes(send[k]):
            offsets[k], send[k] = held, memoryview(send[k]).cast("B")[held:]
    sizes = [nbytes(b) for b in send]
    # The server streams the buffers on to its client as they come, and
    # needs the sizes first: the reply goes out before the bytes.
    return ({"ok": True, "names": names, "counts": counts, "sizes": sizes, "digests": digests,
             "cached": cached, "compressed": compressed, "raw_sizes": raw_sizes,
             "versions": versions_of(modules), "offsets": offsets if any(offsets) else []}, send)
