"""Framing without sockets: messages in, frames out, and back."""

from __future__ import annotations

import json
import struct

import pytest

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import Chunks


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
        m.Execute(4, "1 / 0", execution_count=16),
        m.Execute(5, "b = a + 1", after=4),
        m.Pull(6, ["b"], after=5),
        m.Output(3, 1, "stream", {"name": "stdout", "text": "hi\n"}),
        m.Error(4, m.ErrorCode.TIMEOUT, "too slow"),
    ]
    assert all(len(encode(msg)) == 1 for msg in msgs)
    assert roundtrip(msgs) == msgs


def test_an_execute_without_a_count_is_the_same_on_the_wire_as_before() -> None:
    assert "execution_count" not in m.Execute(1, "1").fields()
    assert m.Execute(1, "1", execution_count=7).fields()["execution_count"] == 7


def test_an_execute_or_pull_that_follows_none_is_the_same_on_the_wire_as_before() -> None:
    assert "after" not in m.Execute(2, "1").fields() and "after" not in m.Pull(3, ["b"]).fields()
    assert m.Execute(2, "1", after=1).fields()["after"] == 1
    assert m.Pull(3, ["b"], after=2).fields()["after"] == 2


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
    from remote_gpu_core.protocol.framing import encode_head

    parts = [b"p" * 10, b"q" * 20000, b"r" * 5]
    reader = Reader()
    for frame in encode_head(m.PullReply(9, ["a", "b"], [1, 1]), [10, 20005], chunk_size=4096):
        reader.receive_data(frame)
    for piece in parts:
        reader.receive_data(piece)
    (msg,) = reader.events_received()
    assert [bytes(b) for b in msg.buffers] == [b"p" * 10, b"q" * 20000 + b"r" * 5]  # type: ignore[attr-defined]


# -- protocol 2: Jupyter ids, metadata and files ------------------------------

PARENT = {"msg_id": "nb-42", "session": "s1", "username": "alice", "date": "2026-12-01T10:00:00Z",
          "msg_type": "execute_request", "version": "5.4"}


def test_requests_carry_the_frontends_header_and_outputs_their_metadata_whole() -> None:
    buffer = b"\x00\x01binary"
    msgs: list[m.Message] = [
        m.Execute(1, "w = IntSlider()", parent=PARENT),
        m.ShellRequest(2, "comm_msg", {"comm_id": "c1", "data": {"method": "update"}}, (buffer,),
                       parent={**PARENT, "msg_type": "comm_msg"}),
        m.Output(1, 7, "comm_open", {"comm_id": "c1", "target_name": "jupyter.widget", "data": {}},
                 (buffer,), metadata={"version": "2.1.0"}, parent="nb-42"),
        m.Output(0, 8, "stream", {"name": "stdout", "text": "late\n"}, parent="nb-41"),
        m.ShellReply(2, "comm_info_reply", {"comms": {}}, metadata={"status": "ok"}),
        m.Welcome(2, "0.1.0", "alice", {"max_upload": 1 << 30}),
    ]
    back = roundtrip(msgs)
    assert [type(b) for b in back] == [type(x) for x in msgs]
    assert back[0] == msgs[0] and back[0].parent["msg_id"] == "nb-42"  # type: ignore[attr-defined]
    assert back[1].parent == msgs[1].parent  # type: ignore[attr-defined]
    assert [bytes(b) for b in back[1].buffers] == [buffer]  # type: ignore[attr-defined]
    opened = back[2]
    assert isinstance(opened, m.Output)
    assert opened.metadata == {"version": "2.1.0"} and opened.parent == "nb-42"
    assert [bytes(b) for b in opened.buffers] == [buffer]
    assert back[3] == msgs[3] and back[4] == msgs[4] and back[5] == msgs[5]


def test_protocol_1_messages_still_parse_with_the_new_fields_defaulted() -> None:
    header = {"t": "output", "req": 3, "seq": 1, "msg_type": "stream", "content": {"text": "x"}}
    reader = Reader()
    raw = json.dumps(header).encode()
    reader.receive_data(struct.pack(">2sBBI", b"RG", 1, 0, len(raw)) + raw)
    (out,) = reader.events_received()
    assert isinstance(out, m.Output) and out.metadata == {} and out.parent == ""


@pytest.mark.parametrize("header, reason", [
    ({"t": "execute", "req": 1, "code": "1", "parent": "nb-1"}, "'parent' has a bad value"),
    ({"t": "output", "req": 1, "seq": 1, "msg_type": "x", "content": {}, "metadata": []},
     "'metadata' has a bad value"),
    ({"t": "upload", "req": 1, "paths": [1]}, "'paths' has a bad value"),
    ({"t": "download", "req": 1}, "missing field 'paths'"),
])
def test_bad_new_fields_are_refused(header: dict[str, object], reason: str) -> None:
    raw = json.dumps(header).encode()
    reader = Reader()
    with pytest.raises(ProtocolError, match=reason):
        reader.receive_data(struct.pack(">2sBBI", b"RG", 1, 0, len(raw)) + raw)


def test_uploads_and_downloads_carry_files_as_buffers_not_json() -> None:
    content = bytes(range(256)) * 1024
    upload = m.Upload(5, ["images/x.png", "empty.txt"], (content, b""))
    frames = encode(upload, chunk_size=64 * 1024)
    assert b"images/x.png" in bytes(frames[0]) and content[:64] not in bytes(frames[0])
    (back,) = roundtrip([upload], chunk=64 * 1024)
    assert isinstance(back, m.Upload) and back.paths == upload.paths
    assert [bytes(b) for b in back.buffers] == [content, b""]
    (reply,) = roundtrip([m.DownloadReply(6, ["out/r.csv"], (b"a,b\n",))])
    assert isinstance(reply, m.DownloadReply) and bytes(reply.buffers[0]) == b"a,b\n"
    assert roundtrip([m.UploadDone(5, ["images/x.png"], [len(content)]), m.Download(6, ["out"])]) == [
        m.UploadDone(5, ["images/x.png"], [len(content)]), m.Download(6, ["out"])]


def test_partial_reports_the_bytes_of_a_message_still_arriving() -> None:
    payload = b"y" * 250_000
    frames = encode(m.DownloadReply(9, ["big.bin"], (payload,)), chunk_size=100_000)
    reader = Reader()
    assert reader.partial is None
    seen = []
    for frame in frames:
        reader.receive_data(bytes(frame))
        if reader.partial is not None:
            fields, done, total = reader.partial
            seen.append((fields["req"], done, total))
    assert seen and all(req == 9 and total == len(payload) for req, _, total in seen)
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    assert reader.partial is None and len(reader.events_received()) == 1
