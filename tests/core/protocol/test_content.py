"""Buffers named by content: digests, the reference rule, the bookkeeping of
what one end holds, and the messages that carry them; no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.content import (
    MAX_ENTRIES, THRESHOLD, Holdings, check_references, digest, digests_of
)


def test_digests_name_large_buffers_by_content_only() -> None:
    big = np.arange(THRESHOLD // 8, dtype=np.int64)
    names = digests_of([b"pickle", memoryview(big), big.copy().data, b"x" * (THRESHOLD - 1)])
    assert names[0] == "" and names[3] == ""
    assert names[1] == names[2] and len(names[1]) == 32 and names[1] == digest(big.tobytes())
    big[7] += 1
    assert digest(big) != names[1]
    # A non-byte view (float32 data, 2-d) names the same bytes as its flat copy.
    f = np.ones((512, 1024), dtype=np.float32)
    assert digest(memoryview(f)) == digest(f.tobytes())


@pytest.mark.parametrize(("total", "digests", "cached", "carried", "why"), [
    (2, [], [], 2, None),
    (2, ["", "a" * 32], [1], 1, None),
    (2, ["", "a" * 32], [], 2, None),
    (2, ["a" * 32], [], 2, "1 digests for 2 buffers"),
    (2, ["", "A" * 32], [], 2, "not 32 hex digits"),
    (2, ["", "a" * 31], [], 2, "not 32 hex digits"),
    (2, ["", "a" * 32], [0], 1, "names no digest"),
    (2, ["", "a" * 32], [2], 1, "names no digest"),
    (2, ["", "a" * 32], [-1], 1, "names no digest"),
    (3, ["", "a" * 32, "b" * 32], [2, 1], 1, "not ascending"),
    (3, ["", "a" * 32, "b" * 32], [1, 1], 2, "not ascending"),
    (2, ["", "a" * 32], [1], 2, "2 buffers sent, 1 expected"),
])
def test_reference_lists_are_checked(total: int, digests: list[str], cached: list[int], carried: int,
                                     why: str | None) -> None:
    found = check_references(total, digests, cached, carried)
    assert found == why if why is None else why in (found or "")


def test_holdings_let_the_least_recently_used_go_first() -> None:
    held = Holdings(100)
    assert held.use("a", 40) == [] and held.use("b", 40) == []
    assert held.use("a", 40) == []  # used again: now b is the oldest
    assert held.use("c", 40) == ["b"]
    assert "a" in held and "c" in held and "b" not in held and held.held == 80
    assert held.use("huge", 101) == ["huge"] and "huge" not in held  # over the limit alone
    held.discard(["a", "nope"])
    assert held.held == 40 and list(held) == ["c"]
    assert held.clear() == ["c"] and held.held == 0
    assert Holdings(0).use("x", 1) == ["x"]


def test_holdings_keep_at_most_max_entries() -> None:
    held = Holdings(1 << 40)
    for i in range(MAX_ENTRIES):
        assert held.use(str(i), 1) == []
    assert held.use("one more", 1) == ["0"] and len(held) == MAX_ENTRIES


def test_the_new_fields_cross_the_wire_and_are_checked() -> None:
    push = m.Push(3, ["a"], [2], (b"pickle",), ["", "0" * 32], [1])
    reader = Reader()
    for frame in encode(push):
        reader.receive_data(frame)
    (got,) = reader.events_received()
    assert isinstance(got, m.Push) and got.digests == ["", "0" * 32] and got.cached == [1]
    assert bytes(got.buffers[0]) == b"pickle"
    # An old-style push (no digests) still decodes, with nothing named.
    plain = m.Push(4, ["a"], [1], (b"p",))
    reader.receive_data(encode(plain)[0])
    (old,) = reader.events_received()
    assert isinstance(old, m.Push) and old.digests == [] and old.cached == []
    reader.receive_data(encode(m.PushDone(3, [], ["0" * 32]))[0])
    reader.receive_data(encode(m.Pull(5, ["a"], ["1" * 32]))[0])
    done, pull = reader.events_received()
    assert isinstance(done, m.PushDone) and done.missing == ["0" * 32]
    assert isinstance(pull, m.Pull) and pull.have == ["1" * 32]
