"""The messages that resume a push or a pull cut short, on the wire and checked.

A resume adds two messages (:class:`~m.Holding`, :class:`~m.Held`) and
fields that stay off the wire unless used (``Push.offsets``,
``Pull.partial``, ``PullReply.offsets``), so a transfer that resumes
nothing reads as before; the server checks a push's offsets against its
other lists before a worker sees them. A reader cut short in a message's
buffers gives back what came of them (``Reader.salvage``).
"""

from __future__ import annotations

from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.compression import CODEC, push_refusal
from remote_gpu_core.protocol.content import THRESHOLD
from test_framing import roundtrip

D1, D2 = "a" * 32, "b" * 32


def test_holding_held_and_a_push_with_offsets_roundtrip() -> None:
    msgs: list[m.Message] = [
        m.Holding(4, [D1, D2]),
        m.Held(4, [1 << 20, 0]),
        m.Push(5, ["x"], [3], (b"pickle", b"rest of one", b"all of two"), digests=["", D1, D2],
               offsets=[0, 1 << 20, 0]),
    ]
    back = roundtrip(msgs)
    assert back[:2] == msgs[:2]
    push = back[2]
    assert isinstance(push, m.Push) and push.offsets == [0, 1 << 20, 0]
    assert [bytes(b) for b in push.buffers] == [b"pickle", b"rest of one", b"all of two"]


def test_a_push_that_resumes_nothing_is_the_same_on_the_wire_as_before() -> None:
    assert "offsets" not in m.Push(1, ["x"], [1], (b"p",)).fields()
    assert "partial" not in m.Pull(1, ["x"]).fields()
    assert "offsets" not in m.PullReply(1, ["x"], [1], (b"p",)).fields()


def test_a_pull_that_offers_what_came_and_its_answer_roundtrip() -> None:
    msgs: list[m.Message] = [
        m.Pull(6, ["x"], partial={D1: 1 << 20}),
        m.PullReply(6, ["x"], [2], (b"pickle", b"the rest"), digests=["", D1], offsets=[0, 1 << 20]),
    ]
    pull, reply = roundtrip(msgs)
    assert pull == msgs[0]
    assert isinstance(reply, m.PullReply) and reply.offsets == [0, 1 << 20]


def test_a_reader_cut_in_the_buffers_gives_back_what_came() -> None:
    frames = [bytes(f) for f in encode(m.PullReply(2, ["x"], [3], (b"p", b"0123456789", b"abc"),
                                                   digests=["", D1, D2]))]
    data = b"".join(frames)
    reader = Reader()
    assert reader.salvage() is None
    reader.receive_data(data[:len(data) - 8])  # all but "56789abc"
    salvaged = reader.salvage()
    assert salvaged is not None
    fields, came = salvaged
    assert fields["t"] == "pull_reply" and fields["digests"] == ["", D1, D2] and fields["req"] == 2
    assert [(bytes(buf[:n]), n) for buf, n in came] == [(b"p", 1), (b"01234", 5), (b"", 0)]


def push(offsets: list[int], **fields: object) -> m.Push:
    return m.Push(1, ["x"], [3], (b"p", b"one", b"two"), digests=["", D1, D2], offsets=offsets,
                  **fields)  # type: ignore[arg-type]


def test_offsets_that_fit_are_taken() -> None:
    assert push_refusal(push([0, 5, 0])) is None
    assert push_refusal(push([])) is None


def test_offsets_that_do_not_fit_are_refused_with_why() -> None:
    assert push_refusal(push([0, 5])) == "2 offsets for 3 buffers sent"
    assert push_refusal(push([0, -1, 0])) == "an offset is below 0"
    assert push_refusal(push([3, 0, 0])) == "an offset names a buffer that is compressed or has no digest"
    squeezed = push([0, 0, 9], codec=CODEC, compressed=[2], raw_sizes=[THRESHOLD])
    assert push_refusal(squeezed) == "an offset names a buffer that is compressed or has no digest"
    cached = m.Push(1, ["x"], [3], (b"p", b"two"), digests=["", D1, D2], cached=[1], offsets=[0, 7])
    assert push_refusal(cached) is None, "offsets count the buffers that come, not those cached"
