"""The websocket receive buffer that keeps socket reads as they came: it reads
what websockets' own reader reads, at every split point, with no sockets."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import SERVER, Protocol, State
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from remote_gpu_core.protocol.piece_reader import PieceReader, install

Reads = Callable[[Any], list[Any]]


def drive(reader: Any, chunks: list[bytes], reads: Reads, eof: bool = True) -> list[Any]:
    """Feed ``chunks`` one by one into ``reader`` while the reads of ``reads(reader)`` go on."""
    results: list[Any] = []

    def run() -> Generator[None, None, None]:
        for read in reads(reader):
            try:
                results.append(bytes((yield from read)))
            except (EOFError, RuntimeError, ValueError) as exc:
                results.append((type(exc), str(exc)))
                return

    gen = run()
    try:
        next(gen)
        for chunk in chunks:
            reader.feed_data(chunk)
            next(gen)
        if eof:
            reader.feed_eof()
            next(gen)
    except StopIteration:
        pass
    return results


def every_split(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:i], data[i:j], data[j:]] for i in range(len(data) + 1)
                       for j in range(i, len(data) + 1, 7)]


STREAM = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(40)) + b"tail"


@pytest.mark.parametrize("reads", [
    lambda r: [r.read_line(64), r.read_line(64), r.read_line(64), r.read_exact(0), r.read_exact(2),
               r.read_exact(38), r.at_eof(), r.read_to_eof(100)],
    lambda r: [r.read_line(10)],  # too long
    lambda r: [r.read_exact(len(STREAM) + 1)],  # the stream ends first
    lambda r: [r.read_line(64), r.read_to_eof(5)],  # too long to the end
], ids=["lines, exact, eof", "line too long", "short", "to eof too long"])
def test_reads_what_websockets_own_reader_reads_at_every_split_point(reads: Reads) -> None:
    for chunks in every_split(STREAM):
        assert drive(PieceReader(), chunks, reads) == drive(StreamReader(), chunks, reads), chunks


def test_a_line_never_ending_is_refused_before_eof_as_websockets_does() -> None:
    def reads(r: Any) -> list[Any]:
        return [r.read_line(8)]

    chunks = [b"abcd", b"efgh", b"ijkl"]
    assert drive(PieceReader(), chunks, reads, eof=False) == drive(StreamReader(), chunks, reads, eof=False)


def test_a_frame_that_came_as_one_read_is_handed_on_without_a_copy() -> None:
    reader = PieceReader()
    data = os.urandom(1 << 16)
    reader.feed_data(data)
    gen = reader.read_exact(len(data))
    with pytest.raises(StopIteration) as done:
        next(gen)
    assert done.value.value is data and len(reader) == 0


def test_nothing_is_fed_after_eof_and_discard_keeps_the_stream_open() -> None:
    reader = PieceReader()
    reader.feed_data(b"abc")
    reader.discard()
    assert len(reader) == 0 and not reader.eof
    reader.feed_eof()
    with pytest.raises(EOFError):
        reader.feed_data(b"x")
    with pytest.raises(EOFError):
        reader.feed_eof()


def frames_received(protocol: Protocol, wire: bytes, cut: int) -> list[tuple[Opcode, bytes]]:
    out: list[tuple[Opcode, bytes]] = []
    for i in range(0, len(wire), cut):
        protocol.receive_data(wire[i : i + cut])
        out.extend((event.opcode, bytes(event.data)) for event in protocol.events_received())
    return out


@pytest.mark.parametrize("cut", [7, 100, 4096, 1 << 20])
def test_a_server_protocol_given_the_reader_parses_masked_frames_as_before(cut: int) -> None:
    payloads = [os.urandom(n) for n in (0, 1, 125, 126, 65535, 65536, 300_000)]
    wire = b"".join(Frame(Opcode.BINARY, p).serialize(mask=True) for p in payloads)
    plain, pieces = Protocol(SERVER, state=State.OPEN), Protocol(SERVER, state=State.OPEN)
    install(pieces)
    assert isinstance(pieces.reader, PieceReader)
    got = frames_received(pieces, wire, cut)
    assert got == frames_received(plain, wire, cut) == [(Opcode.BINARY, p) for p in payloads]


def test_a_client_protocol_given_the_reader_reads_the_handshake_then_frames() -> None:
    client = ClientProtocol(parse_uri("ws://example.com/"))
    install(client)
    request = client.connect()
    client.send_request(request)
    accept = client.key  # answered below as a server would
    from websockets.utils import accept_key

    response = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(accept).encode() + b"\r\n\r\n")
    wire = response + Frame(Opcode.BINARY, b"x" * 70_000).serialize(mask=False)
    for i in range(0, len(wire), 1000):
        client.receive_data(wire[i : i + 1000])
    events = client.events_received()
    assert client.state is State.OPEN
    assert [bytes(e.data) for e in events[1:]] == [b"x" * 70_000]


def test_a_protocol_that_has_received_bytes_keeps_its_reader() -> None:
    protocol = Protocol(SERVER, state=State.OPEN)
    protocol.receive_data(b"\x82")
    with pytest.raises(RuntimeError, match="too late"):
        install(protocol)
