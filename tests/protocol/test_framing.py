"""Framing without sockets: messages in, frames out, and back."""

from __future__ import annotations

import json
import struct

import pytest

from remote_gpu_kernel.errors import ProtocolError
from remote_gpu_kernel.protocol import Reader, encode
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.protocol.framing import Chunks


def roundtrip(msgs: list[m.Message], chunk: int = 1 << 20, **kw: object) -> list[m.Message]:
    reader = Reader(**kw)  # type: ignore[arg-type]
    out: list[m.Message] = []
    for msg in msgs:
        for frame in encode(msg, chunk):
            reader.receive_data(bytes(frame))
            out.extend(reader.events_received())
    reader.receive_eof()
    return out


def test_small_messages_are_one_frame_each_and_roundtrip() -> None:
    msgs: list[m.Message] = [
        m.Hello(1, "test"),
        m.Execute(3, "print('é')", timeout=2.5),
        m.Output(3, 1, "stream", {"name": "stdout", "text": "hi\n"}),
        m.Error(4, m.ErrorCode.TIMEOUT, "too slow"),
    ]
    assert all(len(encode(msg)) == 1 for msg in msgs)
    assert roundtrip(msgs) == msgs


def test_large_buffers_are_sliced_not_joined_and_reassembled() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    msg = m.Push(7, ["a"], [2], (b"pickle", payload))
    frames = encode(msg, chunk_size=64 * 1024)
    assert len(frames) > 16
    assert all(len(memoryview(f)) <= 64 * 1024 for f in frames)
    # the slices are views of the caller's buffer, not copies
    assert any(isinstance(f, memoryview) and f.obj is payload for f in frames)
    (back,) = roundtrip([msg], chunk=64 * 1024)
    assert isinstance(back, m.Push)
    assert [bytes(b) for b in back.buffers] == [b"pickle", payload]


def test_relay_mode_keeps_buffers_as_received_chunks() -> None:
    payload = b"x" * 300_000
    msg = m.Push(1, ["a"], [1], (payload,))
    (back,) = roundtrip([msg], chunk=100_000, assemble=False)
    assert isinstance(back, m.Push)
    (chunks,) = back.buffers
    assert isinstance(chunks, Chunks)
    assert len(chunks.parts) == 3 and chunks.nbytes == len(payload)
    assert bytes(chunks.join()) == payload
    # and a relay can send the chunks on without joining them
    (again,) = roundtrip([m.Push(1, ["a"], [1], (chunks,))], chunk=100_000)
    assert bytes(again.buffers[0]) == payload  # type: ignore[attr-defined]


def test_empty_buffers_and_several_messages_in_a_row() -> None:
    msgs = [m.PullReply(1, ["a", "b"], [1, 1], (b"", b"abc")), m.PushDone(2, ["x"])]
    back = roundtrip(msgs)
    assert back[1] == msgs[1]
    assert [bytes(b) for b in back[0].buffers] == [b"", b"abc"]  # type: ignore[attr-defined]


def test_message_split_at_every_byte_boundary() -> None:
    msg = m.Push(1, ["a"], [1], (b"0123456789",))
    data = b"".join(bytes(f) for f in encode(msg))
    for cut in range(1, len(data)):
        reader = Reader()
        reader.receive_data(data[:cut])
        assert reader.events_received() == []
        reader.receive_data(data[cut:])
        (back,) = reader.events_received()
        assert bytes(back.buffers[0]) == b"0123456789"  # type: ignore[attr-defined]


def frame(header: object, version: int = 1, magic: bytes = b"RG", extra: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">2sBBI", magic, version, 0, len(body)) + body + extra


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "magic"),
        (frame({"t": "hello", "protocol": 1}, version=9), "framing version"),
        (frame(b"{not json"), "not valid JSON"),
        (frame([1, 2]), "not a JSON object"),
        (frame({"t": "hello", "protocol": 1, "b": [-1]}), "non-negative"),
        (frame({"t": "hello", "protocol": 1, "b": "x"}), "non-negative"),
        (struct.pack(">2sBBI", b"RG", 1, 0, 0), "out of bounds"),
        (struct.pack(">2sBBI", b"RG", 1, 0, 1 << 31), "exceeds the limit"),
    ],
)
def test_broken_framing_is_a_protocol_error_and_stops_the_reader(data: bytes, reason: str) -> None:
    reader = Reader()
    with pytest.raises(ProtocolError, match=reason):
        reader.receive_data(data)
    with pytest.raises(ProtocolError):
        reader.receive_data(encode(m.Hello(1))[0])


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"t": "nonsense"}, "unknown message type"),
        ({"protocol": 1}, "unknown message type"),
        ({"t": "hello"}, "missing field 'protocol'"),
        ({"t": "hello", "protocol": "1"}, "bad value"),
        ({"t": "hello", "protocol": True}, "bad value"),
        ({"t": "hello", "protocol": 1, "evil": 1}, "unexpected field"),
        ({"t": "execute", "req": 1, "code": 5}, "bad value"),
        ({"t": "pull", "req": 1, "names": ["a", 3]}, "bad value"),
        ({"t": "error", "req": 1, "code": "nope", "message": ""}, "bad value"),
        ({"t": "hello", "protocol": 1, "b": [1]}, "carries no buffers"),
    ],
)
def test_bad_fields_raise_but_leave_the_stream_in_step(header: dict[str, object], reason: str) -> None:
    reader = Reader()
    extra = b"x" * sum(header.get("b", []))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=reason):
        reader.receive_data(frame(header, extra=extra))
    reader.receive_data(encode(m.Hello(1, "next"))[0])
    assert reader.events_received() == [m.Hello(1, "next")]


def test_truncated_message_is_reported_at_eof() -> None:
    frames = encode(m.Push(1, ["a"], [1], (b"y" * 5000,)), chunk_size=1024)
    reader = Reader()
    for f in frames[:-1]:
        reader.receive_data(f)
    assert reader.in_message
    with pytest.raises(ProtocolError, match="truncated"):
        reader.receive_eof()


def test_text_and_empty_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="text frames"):
        Reader().receive_data("hello")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="empty frame"):
        Reader().receive_data(b"")


def test_oversized_message_is_refused_before_allocation() -> None:
    reader = Reader(max_message=1000)
    with pytest.raises(ProtocolError, match="exceeds") as refused:
        reader.receive_data(frame({"t": "push", "req": 1, "names": ["a"], "counts": [1], "b": [10**12]}))
    assert refused.value.req == 1  # the request it answers
    assert not reader.broken  # its bytes are skipped as they come


def test_binary_data_in_a_header_field_is_refused_at_encode() -> None:
    with pytest.raises(TypeError, match="buffers"):
        encode(m.Output(1, 1, "stream", {"text": b"raw"}))


def test_early_messages_are_handed_out_at_their_header_and_fill_in() -> None:
    payload = bytes(range(256)) * 1000
    frames = encode(m.Push(5, ["a"], [1], (payload,)), chunk_size=50_000)
    reader = Reader(assemble=False, early={m.MessageType.PUSH})
    reader.receive_data(frames[0])
    (msg,) = reader.events_received()
    assert isinstance(msg, m.Push) and msg.req == 5
    (chunks,) = msg.buffers
    seen: list[int] = []
    chunks.listener = lambda: seen.append(chunks.nbytes)
    assert not chunks.complete and chunks.expected == len(payload)
    for f in frames[1:]:
        reader.receive_data(f)
    assert chunks.complete and bytes(chunks.join()) == payload
    assert seen == sorted(seen) and seen[-1] == len(payload)
    assert reader.events_received() == []  # not handed out a second time
    reader.receive_data(encode(m.Hello(1))[0])  # and the stream goes on
    assert reader.events_received() == [m.Hello(1)]


def test_an_early_message_cut_short_fails_its_chunks() -> None:
    frames = encode(m.Push(5, ["a"], [1], (b"z" * 10_000,)), chunk_size=4096)
    reader = Reader(assemble=False, early={m.MessageType.PUSH})
    reader.receive_data(frames[0])
    reader.receive_data(frames[1])
    (msg,) = reader.events_received()
    reader.abort("client went away")
    assert msg.buffers[0].failed == "client went away"  # type: ignore[attr-defined]
    assert not msg.buffers[0].complete  # type: ignore[attr-defined]


def test_encode_head_then_raw_pieces_is_a_whole_message() -> None:
    from remote_gpu_kernel.protocol.framing import encode_head

    parts = [b"p" * 10, b"q" * 20000, b"r" * 5]
    reader = Reader()
    for frame in encode_head(m.PullReply(9, ["a", "b"], [1, 1]), [10, 20005], chunk_size=4096):
        reader.receive_data(frame)
    for piece in parts:
        reader.receive_data(piece)
    (msg,) = reader.events_received()
    assert [bytes(b) for b in msg.buffers] == [b"p" * 10, b"q" * 20000 + b"r" * 5]  # type: ignore[attr-defined]
