"""The data channel's sealed records (:class:`~remote_gpu_server.worker_process.sealed.SealedStream`)
against someone on the wire.

Two streams are opened through a relay that the test controls: it passes
the handshake on, then the test carries each record itself and changes,
repeats, drops or reads it on the way, as an attacker between two hosts
could.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from remote_gpu_server.worker_process import sealed
from remote_gpu_server.worker_process.sealed import SealedStream, open_stream, pinned_context
from remote_gpu_server.worker_process.streams import read_note
from remote_gpu_server.workers.carriers import make_identity

_LENGTH, TAG = sealed._LENGTH, sealed._TAG  # the record's length field and tag, as the stream writes them


def _relay(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        ready, _, _ = select.select([a, b], [], [], 0.05)
        for sock in ready:
            try:
                data = sock.recv(65536)
                if data:
                    (b if sock is a else a).sendall(data)
            except OSError:  # an end gave up in the handshake
                return


class Wire:
    """A client stream and a server stream with the test in the middle."""

    def __init__(self, server_cert: bytes | None = None) -> None:
        server, client = make_identity("server"), make_identity("client")
        self.client_end, self.client_wire = socket.socketpair()
        self.server_end, self.server_wire = socket.socketpair()
        stop = threading.Event()
        relay = threading.Thread(target=_relay, args=(self.client_wire, self.server_wire, stop))
        relay.start()
        try:
            try:
                with ThreadPoolExecutor(2) as pool:
                    serving = pool.submit(open_stream, self.server_end,
                                          pinned_context(True, *server, client[1]), True, 10)
                    connecting = pool.submit(open_stream, self.client_end,
                                             pinned_context(False, *client, server_cert or server[1]), False, 10)
                    self.client: SealedStream = connecting.result()
                    self.server: SealedStream = serving.result()
            finally:
                stop.set()
                relay.join()
        except BaseException:
            for sock in (self.client_end, self.client_wire, self.server_end, self.server_wire):
                sock.close()
            raise

    def record(self, wire: socket.socket) -> bytes:
        """The next whole record the other end wrote, as it is on the wire."""
        head = _exactly(wire, _LENGTH.size)
        (size,) = _LENGTH.unpack(head)
        return head + _exactly(wire, size + TAG)

    def close(self) -> None:
        for sock in (self.client_wire, self.server_wire):
            sock.close()
        self.client.close()
        self.server.close()


def _exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, "the stream ended early"
        out += got
    return bytes(out)


def _read(stream: SealedStream, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        read = stream.recv_into(view[got:])
        if not read:
            raise ConnectionError("ended")
        got += read
    return bytes(buf)


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.close()


def test_records_carry_notes_both_ways_and_nothing_is_in_the_clear(wire: Wire) -> None:
    secret = b"model weights: the secret of user a " * 1000
    wire.client.send_parts([secret])
    on_wire = wire.record(wire.client_wire)
    assert b"the secret of user a" not in on_wire
    wire.server_wire.sendall(on_wire)
    assert _read(wire.server, len(secret)) == secret
    # A note, the way the channel writes them; read in small pieces from the record it came in.
    wire.server.send_parts([b"\x02\x00\x00\x00\x01D\x00\x00\x00\x03abc"])
    wire.client_wire.sendall(wire.record(wire.server_wire))
    assert read_note(wire.client.recv_into) == [bytearray(b"D"), bytearray(b"abc")]


@pytest.mark.parametrize("attack", ["flip a bit", "repeat a record", "drop a record", "swap two records",
                                    "add an empty record"])
def test_a_record_changed_on_the_way_ends_the_stream_and_is_never_delivered(wire: Wire, attack: str) -> None:
    wire.client.send_parts([b"first " * 100, b"second " * 100])
    first, second = wire.record(wire.client_wire), wire.record(wire.client_wire)
    if attack == "flip a bit":
        sent = [first[:20] + bytes([first[20] ^ 1]) + first[21:], second]
    elif attack == "repeat a record":
        sent = [first, first]
    elif attack == "drop a record":
        sent = [second]
    elif attack == "add an empty record":
        sent = [_LENGTH.pack(0), first, second]
    else:
        sent = [second, first]
    wire.server_wire.sendall(b"".join(sent))
    delivered = b""
    with pytest.raises(ConnectionError, match="failed authentication"):
        while True:
            delivered += _read(wire.server, 100)
    assert b"second" not in delivered
    assert delivered in (b"", (b"first " * 100)[:len(delivered)])


def test_each_direction_moves_to_a_new_key_and_never_reuses_a_nonce(wire: Wire,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealed, "_REKEY", 3000)
    piece = b"same bytes " * 100  # 1100 bytes: two records under the first key, the third under the next
    records = []
    for _ in range(4):
        wire.client.send_parts([piece])
        records.append(wire.record(wire.client_wire))
    wire.server_wire.sendall(b"".join(records))
    assert [_read(wire.server, len(piece)) for _ in records] == [piece] * 4
    # The third record has the first one's number, under another key: had the
    # key stayed, the same bytes would be sealed the same way, twice.
    assert records[2] != records[0] and records[3] != records[1]
    wire.server.send_parts([piece] * 4)  # the other way, on its own count
    back = b"".join(wire.record(wire.server_wire) for _ in range(4))
    wire.client_wire.sendall(back)
    assert _read(wire.client, 4 * len(piece)) == piece * 4


def test_a_record_that_fails_leaves_none_of_its_bytes_in_the_reader_s_memory(wire: Wire) -> None:
    secret = b"the secret of user a " * 50
    wire.client.send_parts([secret])
    record = bytearray(wire.record(wire.client_wire))
    record[-1] ^= 1  # the tag: the bytes open, but are not the peer's
    wire.server_wire.sendall(bytes(record))
    memory = bytearray(4096)
    assert wire.server.recv_into(memoryview(memory)[:0]) == 0  # an empty read takes nothing
    with pytest.raises(ConnectionError, match="failed authentication"):
        wire.server.recv_into(memoryview(memory))
    assert b"secret" not in memory


def test_a_length_beyond_a_record_is_refused_before_anything_is_read(wire: Wire) -> None:
    wire.server_wire.sendall(_LENGTH.pack(1 << 30))
    with pytest.raises(ConnectionError, match="larger than the data channel allows"):
        wire.server.recv_into(memoryview(bytearray(16)))


def test_the_end_of_the_stream_between_records_and_inside_one(wire: Wire) -> None:
    wire.client.send_parts([b"whole"])
    record = wire.record(wire.client_wire)
    wire.server_wire.sendall(record + record[:7])  # a second record cut short
    wire.server_wire.shutdown(socket.SHUT_WR)
    assert _read(wire.server, 5) == b"whole"
    with pytest.raises(ConnectionError):
        wire.server.recv_into(memoryview(bytearray(16)))
    other = Wire()
    try:
        other.server_wire.shutdown(socket.SHUT_WR)
        assert other.server.recv_into(memoryview(bytearray(16))) == 0  # a clean end
    finally:
        other.close()


def test_a_peer_without_the_pinned_certificate_gets_no_stream() -> None:
    with pytest.raises(ssl.SSLError):
        Wire(server_cert=make_identity("server")[1])  # the client pins someone else's certificate
