"""Large buffers named by their content, so that a session never moves one twice.

Each end of a session remembers the large buffers (at least
:data:`THRESHOLD` bytes: numpy and torch data, a pickle that holds a large
``bytes``) it has moved, by their :func:`digest`. A push names every large
buffer by digest and leaves out those the worker holds (``cached``: their
indices); a pull names the digests the client holds (``have``) and the
worker leaves those out of its answer. :func:`check_references` is the one
rule both receivers check such a list against.

:class:`Holdings` is the bookkeeping of what one end holds: least recently
used first out, bounded by bytes and by :data:`MAX_ENTRIES`. The client
keeps one that mirrors the worker's (same rule, same order of use), so it
seldom names a buffer the worker let go of; when it does, the worker says
which were missing and the client sends their bytes after all.

Nothing here is shared between sessions: a digest only ever finds a buffer
that the same session moved, so a hash collision cannot reach another
user's data. No I/O.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

__all__ = [
    "MAX_ENTRIES", "THRESHOLD", "Holdings", "check_offsets", "check_references", "digest", "digests_of", "nbytes",
]

#: Buffers at least this large are named by digest; smaller ones always travel.
THRESHOLD = 1 << 20
#: The most buffers one end remembers: the worker keeps a file descriptor for each.
MAX_ENTRIES = 512

_DIGEST = re.compile(r"[0-9a-f]{32}")


def nbytes(buf: Any) -> int:
    """The bytes of a bytes-like object."""
    with memoryview(buf) as view:
        return view.nbytes


def digest(buf: Any) -> str:
    """The content's name: xxh3-128 of its bytes, 32 hex digits (≈18 GB/s here)."""
    return xxhash.xxh3_128_hexdigest(buf if isinstance(buf, (bytes, bytearray)) else memoryview(buf).cast("B"))


def digests_of(buffers: Sequence[Any]) -> list[str]:
    """A digest for each buffer of at least :data:`THRESHOLD` bytes, ``""`` for the others."""
    return [digest(b) if nbytes(b) >= THRESHOLD else "" for b in buffers]


def check_references(total: int, digests: Sequence[str], cached: Sequence[int], carried: int) -> str | None:
    """Why a list of ``total`` buffers, ``carried`` of them sent, with these
    ``digests`` and ``cached`` indices (left out, named by digest) does not
    add up; None when it does.

    ``digests`` is empty (no buffer named) or one per buffer, each ``""`` or
    32 hex digits; ``cached`` are distinct indices, ascending, of named buffers.
    """
    if digests and len(digests) != total:
        return f"{len(digests)} digests for {total} buffers"
    if any(d and not _DIGEST.fullmatch(d) for d in digests):
        return "a digest is not 32 hex digits"
    if any(b <= a for a, b in zip(cached, cached[1:])):
        return "cached indices are not ascending"
    if cached and not (0 <= cached[0] and cached[-1] < total and all(digests[i] for i in cached)):
        return "a cached index names no digest"
    if carried != total - len(cached):
        return f"{carried} buffers sent, {total - len(cached)} expected"
    return None


def check_offsets(total: int, digests: Sequence[str], cached: Sequence[int], compressed: Sequence[int],
                  offsets: Sequence[int], carried: int) -> str | None:
    """Why a resumed push's ``offsets`` (one per carried buffer, or none) do not
    fit: each is at least 0, and above 0 only for a named buffer that is not
    ``compressed`` (indices into the carried ones); None when they fit."""
    if not offsets:
        return None
    if len(offsets) != carried:
        return f"{len(offsets)} offsets for {carried} buffers sent"
    skip = set(cached)
    sent = [i for i in range(total) if i not in skip]
    squeezed = set(compressed)
    for k, offset in enumerate(offsets):
        if offset < 0:
            return "an offset is below 0"
        if offset and (k in squeezed or not digests or not digests[sent[k]]):
            return "an offset names a buffer that is compressed or has no digest"
    return None


class Holdings:
    """Digests one end holds, with their sizes: least recently used first out.

    At most ``limit`` bytes and :data:`MAX_ENTRIES` buffers; a buffer over
    ``limit`` alone is not kept. ``limit`` 0 keeps nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Any:
        return iter(list(self._sizes))

    def use(self, key: str, size: int) -> list[str]:
        """``key`` (of ``size`` bytes) was just used or added; returns the digests
        let go of to make room (``key`` itself, if it cannot be kept)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return []
        if size > self.limit:
            return [key]
        self._sizes[key] = size
        self.held += size
        evicted: list[str] = []
        while self.held > self.limit or len(self._sizes) > MAX_ENTRIES:
            old, old_size = self._sizes.popitem(last=False)
            self.held -= old_size
            evicted.append(old)
        return evicted

    def discard(self, keys: Iterable[str]) -> None:
        for key in keys:
            size = self._sizes.pop(key, None)
            if size is not None:
                self.held -= size

    def clear(self) -> list[str]:
        """Forget everything; returns what was held."""
        keys = list(self._sizes)
        self._sizes.clear()
        self.held = 0
        return keys
