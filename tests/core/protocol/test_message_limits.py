"""Limits in the protocol, without sockets: values a field may hold, messages
refused whole while the stream stays in step, and a sender's check against a
receiver's limits."""

from __future__ import annotations

import json
import struct

import pytest

from remote_gpu_core.errors import MessageTooLarge, ProtocolError
from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import Chunks
from remote_gpu_core.protocol.limits import measure, refusal
from remote_gpu_core.sizes import format_size


def frame(body: bytes | dict[str, object], extra: bytes = b"") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack(">2sBBI", b"RG", 1, 0, len(data)) + data + extra


@pytest.mark.parametrize("header", [
    b'{"t":"execute","req":1,"code":"1","timeout":NaN}',
    b'{"t":"execute","req":1,"code":"1","timeout":Infinity}',
    b'{"t":"execute","req":1,"code":"1","timeout":-Infinity}',
    b'{"t":"replay","req":1,"after":99999999999999999999999}',
    b'{"t":"lease_request","req":1,"gpus":-99999999999999999999}',
    b'{"t":"welcome","protocol":1,"server":"s","user":"u","limits":{"max_push":"big"}}',
])
def test_numbers_must_be_finite_and_fit_64_bits(header: bytes) -> None:
    reader = Reader()
    with pytest.raises(ProtocolError, match="bad value") as bad:
        reader.receive_data(frame(header))
    assert bad.value.req == 1 or b'"req"' not in header
    reader.receive_data(encode(m.Hello(1))[0])  # the stream is in step
    assert reader.events_received() == [m.Hello(1)]


@pytest.mark.parametrize("header", [
    b'{"t":"replay","req":1,"after":' + b"9" * 5000 + b"}",  # Python refuses >4300 digits
    b'{"t":"hello","protocol":1,"client":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_json_this_side_cannot_read_is_a_protocol_error_not_a_crash(header: bytes) -> None:
    reader = Reader()
    with pytest.raises(ProtocolError, match="does not read"):
        reader.receive_data(frame(header))
    assert reader.broken


def test_every_bad_message_of_a_frame_is_reported_with_its_request() -> None:
    reader = Reader()
    data = (frame({"t": "execute", "req": 4, "code": 5}) + encode(m.Hello(1))[0]
            + frame({"t": "pull", "req": 9, "names": [1]}))
    with pytest.raises(ProtocolError) as first:
        reader.receive_data(data)
    assert first.value.req == 4
    assert [e.req for e in reader.errors_received()] == [4, 9]
    assert reader.events_received() == [m.Hello(1)]


def test_a_message_over_the_limit_is_skipped_whole_and_nothing_of_it_is_kept() -> None:
    reader = Reader(max_message=4096)
    big = encode(m.ShellRequest(3, "comm_msg", {}, (b"x" * 10_000,)), chunk_size=1000)
    with pytest.raises(MessageTooLarge, match="exceeds the limit of 4096") as refused:
        reader.receive_data(big[0])
    assert (refused.value.req, refused.value.limit, refused.value.what) == (3, 4096, "shell_request")
    assert refused.value.size > 10_000
    total = sum(len(piece) for piece in big)
    assert reader.skipping == total - len(big[0])  # what is still to come of it
    for piece in big[1:-1]:
        before = reader.skipping
        reader.receive_data(piece)  # skipped: no error, no event
        assert reader.events_received() == [] and reader.in_message
        assert reader.skipping == before - len(piece)
    reader.receive_data(big[-1])
    assert reader.events_received() == [] and not reader.in_message and reader.skipping == 0
    reader.receive_data(encode(m.Execute(4, "1"))[0])
    assert reader.events_received() == [m.Execute(4, "1")] and not reader.in_message


def test_an_early_message_has_a_limit_of_its_own() -> None:
    reader = Reader(assemble=False, early={m.MessageType.PUSH}, max_message=1 << 16, max_early=1 << 20)
    fits = encode(m.Push(1, ["a"], [1], (b"y" * (1 << 19),)), chunk_size=1 << 16)
    for piece in fits:
        reader.receive_data(piece)
    (push,) = reader.events_received()
    assert push.buffers[0].complete  # type: ignore[attr-defined]
    over = frame({"t": "push", "req": 2, "names": ["a"], "counts": [1], "b": [(1 << 20) + 1]})
    with pytest.raises(MessageTooLarge) as refused:
        reader.receive_data(over)
    assert (refused.value.req, refused.value.what, refused.value.limit) == (2, "push", 1 << 20)
    reader.receive_data(b"z" * ((1 << 20) + 1))
    reader.receive_data(encode(m.Hello(1))[0])
    assert reader.events_received() == [m.Hello(1)]


def test_a_message_with_too_many_buffers_is_refused_before_any_is_made() -> None:
    reader = Reader(max_buffers=10)
    with pytest.raises(MessageTooLarge, match="11 buffers"):
        reader.receive_data(frame({"t": "push", "req": 1, "names": ["a"], "counts": [11], "b": [1] * 11},
                                  extra=b"q" * 11))
    reader.receive_data(encode(m.Hello(1))[0])
    assert reader.events_received() == [m.Hello(1)]


def test_a_header_over_its_limit_breaks_the_stream() -> None:
    reader = Reader(max_header=100)
    with pytest.raises(MessageTooLarge, match="header of 101 bytes"):
        reader.receive_data(struct.pack(">2sBBI", b"RG", 1, 0, 101))
    assert reader.broken


def test_received_gives_each_message_with_its_header_size() -> None:
    reader = Reader()
    msg = m.Execute(1, "print(1)")
    (data,) = encode(msg)
    reader.receive_data(data)
    assert reader.received() == [(msg, len(data) - 8)]


def test_chunks_released_by_a_relay_and_failed_chunks_keep_nothing() -> None:
    chunks = Chunks(expected=30)
    released: list[int] = []
    chunks.on_release = lambda: released.append(chunks.held)
    chunks.append(b"a" * 10)
    chunks.append(b"b" * 10)
    assert chunks.held == 20
    assert bytes(chunks.release(0)) == b"a" * 10 and chunks.held == 10 and released == [10]
    chunks.fail("refused")
    assert chunks.held == 0 and chunks.parts == [] and released == [10, 0]
    chunks.append(b"c" * 10)  # what still arrives is counted, not kept
    assert chunks.held == 0 and chunks.nbytes == 30 and not chunks.complete


def test_a_sender_checks_a_message_against_the_receivers_limits() -> None:
    limits = {"max_push": 1000, "max_message": 200}
    assert refusal(m.Push(1, ["a"], [1], (b"x" * 1000,)), limits) is None  # buffers stream
    push = refusal(m.Push(1, ["a"], [1], (b"x" * 1001,)), limits)
    assert isinstance(push, MessageTooLarge) and "--max-push" in str(push) and push.what == "push"
    cell = refusal(m.Execute(1, "x" * 300), limits)
    assert isinstance(cell, MessageTooLarge) and "this cell is" in str(cell) and "--max-message" in str(cell)
    assert refusal(m.Execute(1, "x" * 300), {}) is None  # a server that names no limits
    assert measure(m.Push(1, ["a"], [1], (b"x" * 5,))) == (len(json.dumps(
        {"req": 1, "names": ["a"], "counts": [1], "digests": [], "cached": [], "codec": "",
             "compressed": [], "raw_sizes": [], "t": "push", "b": [5]}, separators=(",", ":"))), 5)
    assert format_size(16 << 30) == "16 GiB" and format_size(1536) == "1.5 KiB" and format_size(9) == "9 bytes"
