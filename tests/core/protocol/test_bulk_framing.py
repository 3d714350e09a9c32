"""Messages whose buffers travel on the bulk stream: their framing flag, the
reader's handler, and a :class:`BulkStream` filling them over a real socket pair."""

from __future__ import annotations

import asyncio
import socket
import weakref
from typing import Any

import numpy as np
import pytest

from remote_gpu_core.bulk_stream import PIECE, BulkStream, PiecePool, Target
from remote_gpu_core.errors import MessageTooLarge, ProtocolError
from remote_gpu_core.protocol import Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.chunks import Chunks
from remote_gpu_core.protocol.framing import FLAG_BULK, encode_head

Seen = list[tuple[m.Message | None, list[Any], list[int]]]


def bulk_reader(seen: Seen, deliver: bool, **kw: Any) -> Reader:
    reader = Reader(**kw)

    def on_bulk(msg: m.Message | None, buffers: list[Any], lengths: list[int], header: int) -> bool:
        seen.append((msg, buffers, lengths))
        return deliver

    reader.on_bulk = on_bulk
    return reader


def test_a_bulk_message_is_handed_over_at_its_header_in_its_turn_and_the_next_is_read_at_once() -> None:
    seen: Seen = []
    reader = bulk_reader(seen, deliver=True, assemble=False, early={m.MessageType.PUSH})
    push = m.Push(2, ["x"], [2])
    frames = [*encode(m.Execute(1, "a")), *encode_head(push, [5, 7], flags=FLAG_BULK), *encode(m.Execute(3, "b"))]
    reader.receive_data(b"".join(bytes(f) for f in frames))
    received = reader.events_received()
    assert [getattr(msg, "req", None) for msg in received] == [1, 2, 3]  # the push in its turn
    (msg, buffers, lengths), = seen
    assert msg == received[1] and lengths == [5, 7]
    assert all(isinstance(b, Chunks) and not b.complete for b in buffers) and msg.buffers == tuple(buffers)
    reader.receive_eof()  # nothing of it is awaited on this stream


def test_a_handler_that_delivers_itself_keeps_the_message_out_of_the_events() -> None:
    seen: Seen = []
    reader = bulk_reader(seen, deliver=False)
    reply = m.PullReply(4, ["y"], [1])
    reader.receive_data(b"".join(bytes(f) for f in encode_head(reply, [3], flags=FLAG_BULK)))
    assert reader.events_received() == [] and len(seen) == 1
    assert isinstance(seen[0][1][0], bytearray) and len(seen[0][1][0]) == 3  # allocated, to fill


def test_a_refused_bulk_message_tells_the_handler_what_to_skip() -> None:
    seen: Seen = []
    reader = bulk_reader(seen, deliver=True, assemble=False, early={m.MessageType.PUSH},
                         max_early={m.MessageType.PUSH: 10})
    with pytest.raises(MessageTooLarge):
        reader.receive_data(b"".join(bytes(f) for f in encode_head(m.Push(5, ["x"], [1]), [11], flags=FLAG_BULK)))
    assert seen == [(None, [], [11])]
    reader.receive_data(b"".join(bytes(f) for f in encode(m.Execute(6, "c"))))  # still in step
    assert [msg.req for msg in reader.events_received()] == [6]  # type: ignore[attr-defined]


def test_a_reader_with_no_bulk_stream_refuses_the_flag() -> None:
    reader = Reader()
    with pytest.raises(ProtocolError, match="bulk stream"):
        reader.receive_data(b"".join(bytes(f) for f in encode_head(m.Push(1, ["x"], [1]), [3], flags=FLAG_BULK)))


async def stream_pair() -> tuple[BulkStream, socket.socket]:
    """A receiving BulkStream on one end of a socket pair, the other end to write raw bytes to."""
    ours, theirs = socket.socketpair()
    stream = BulkStream()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, ours)
    theirs.setblocking(False)
    return stream, theirs


def test_bytes_fill_buffers_and_chunks_in_order_even_when_they_come_before_their_header() -> None:
    async def main() -> None:
        stream, peer = await stream_pair()
        loop = asyncio.get_running_loop()
        payload = bytes(range(256)) * ((2 * PIECE + 100) // 256 + 1)
        first, chunks, skipped = bytearray(10), Chunks(expected=2 * PIECE + 100), 5
        await loop.sock_sendall(peer, payload[:10])
        while stream.received_bytes < 10:  # nothing expected yet: they wait
            await asyncio.sleep(0.01)
        done: list[str | None] = []
        sending = asyncio.ensure_future(loop.sock_sendall(peer, payload[: 2 * PIECE + 100] + b"s" * skipped + b"last"))
        stream.expect(Target([first, chunks], [10, 2 * PIECE + 100], done.append))
        stream.expect(Target([], [skipped]))  # a refused message's bytes
        last = bytearray(4)
        filled = loop.create_future()
        stream.expect(Target([last], [4], filled.set_result))
        assert await asyncio.wait_for(filled, 30) is None
        await sending
        assert done == [None] and bytes(first) == payload[:10] and bytes(last) == b"last"
        assert chunks.complete and b"".join(bytes(p) for p in chunks.parts) == payload[: 2 * PIECE + 100]
        assert max(p.nbytes for p in chunks.parts) <= PIECE
        stream.close()
        peer.close()

    asyncio.run(main())


def test_a_stream_that_ends_fails_what_it_was_to_fill_and_what_is_expected_after() -> None:
    async def main() -> None:
        stream, peer = await stream_pair()
        loop = asyncio.get_running_loop()
        chunks = Chunks(expected=100)
        reasons: list[str | None] = []
        stream.expect(Target([chunks], [100], reasons.append))
        await loop.sock_sendall(peer, b"x" * 40)
        peer.close()
        reason = await asyncio.wait_for(stream.wait_closed(), 30)
        assert "closed" in reason and chunks.failed is not None and reasons == [reason]
        late: list[str | None] = []
        stream.expect(Target([bytearray(1)], [1], late.append))
        assert late == [reason]
        with pytest.raises(ConnectionError):
            await stream.write_piece(memoryview(b"y"))

    asyncio.run(main())


def test_a_relay_piece_handed_back_is_the_next_one_taken_and_nothing_else_is_kept() -> None:
    pool = PiecePool(kept=2)
    first = pool.take(PIECE)
    under = weakref.ref(first.obj)  # a strong reference would keep it from coming back
    first[:3] = b"old"
    pool.give(first)
    again = pool.take(PIECE)
    assert again.obj is under() and again.nbytes == PIECE  # warm memory, its bytes to be overwritten
    assert (pool.fresh, pool.reused) == (1, 1)
    short = pool.take(100)  # the last piece of a buffer: never kept
    pool.give(short)
    pool.give(memoryview(bytearray(PIECE)))  # not the pool's own: left alone
    pool.give(memoryview(b"x" * PIECE))
    assert pool.take(PIECE).obj is not under()
    kept = [pool.take(PIECE) for _ in range(3)]
    given = [weakref.ref(piece.obj) for piece in kept]
    for piece in kept:
        pool.give(piece)
    taken = [pool.take(PIECE).obj for _ in range(3)]
    assert sum(any(t is g() for g in given) for t in taken) == 2  # at most 2 kept


@pytest.mark.parametrize("reader", [lambda piece: piece[:10], lambda piece: np.frombuffer(piece, dtype=np.uint8),
                                    lambda piece: memoryview(piece).cast("B")])
def test_a_piece_something_still_reads_is_not_handed_out_again(reader: Any) -> None:
    pool = PiecePool()
    piece = pool.take(PIECE)
    under = weakref.ref(piece.obj)
    still = reader(piece)
    pool.give(piece)
    assert pool.take(PIECE).obj is not under()
    del still
