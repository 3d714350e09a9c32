"""The link emulator of the network benchmark (``bench/link.py``) is the link it claims to be.

Through a link of 40 ms and 100 Mbit/s in a process of its own, as the
benchmark runs it: small exchanges take one round trip (none shorter, the
median well under one and a half), the first exchange on a new connection
two (the TCP handshake's and its own), and a bulk send goes at the link's
rate (never faster, at least three quarters of it). The message taps
count websocket and ZMTP messages through a link in a thread, and read the
same from a stream cut at every byte. Delays and a rate cap only ever make things slower, so the lower
bounds are exact; the other bounds leave room for a loaded 2-core machine
(they catch a delay or a cap applied twice, or not at all).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from link import Link, LinkProcess, LinkProxy, link_loop  # noqa: E402
from link_probe import EchoServer, bulk_rate, first_exchange, round_trips  # noqa: E402
from message_taps import WebSocketMessages, ZmtpMessages  # noqa: E402

LINK = Link(rtt=0.040, rate=100e6)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def far_echo(echo: EchoServer) -> Iterator[int]:
    """A port that reaches the echo server across :data:`LINK`."""
    with LinkProcess(LINK) as net:
        yield net.proxy("127.0.0.1", echo.port)


def test_a_round_trip_takes_the_links(far_echo: int) -> None:
    seconds = round_trips(far_echo, 15)
    assert min(seconds) >= LINK.rtt
    assert statistics.median(seconds) <= 1.5 * LINK.rtt, seconds


def test_a_new_connection_pays_the_tcp_handshake(far_echo: int) -> None:
    seconds = [first_exchange(far_echo) for _ in range(3)]
    assert min(seconds) >= 2 * LINK.rtt
    assert statistics.median(seconds) <= 2.5 * LINK.rtt, seconds


def test_a_bulk_send_goes_at_the_links_rate(far_echo: int) -> None:
    assert LINK.rate is not None
    rate = bulk_rate(far_echo, 5 << 20, LINK.rtt)  # 0.42 s at 100 Mbit/s
    assert 0.75 * LINK.rate <= rate <= 1.0001 * LINK.rate, f"{rate / 1e6:.1f} Mbit/s"


def test_the_process_counts_the_bytes_each_way(echo: EchoServer) -> None:
    with LinkProcess(Link(rtt=0.002, rate=None)) as net:
        port = net.proxy("127.0.0.1", echo.port)
        round_trips(port, 3)
        up, down = net.traffic()[port]
    assert (up.bytes, down.bytes) == (1 + 4 * 64, 4 * 64)
    assert up.connections == down.connections == 1


# -- the message taps --------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A :func:`link_loop` running in a thread."""
    loop = link_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def started_proxy(loop: asyncio.AbstractEventLoop, port: int, tap: str) -> LinkProxy:
    link = Link(rtt=0.002, rate=1e9)
    proxy = LinkProxy(link, ("127.0.0.1", port), LinkProxy.bottlenecks(link), tap)
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
    return proxy


def test_websocket_messages_are_counted_through_a_link(loop: asyncio.AbstractEventLoop) -> None:
    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, compression=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy = started_proxy(loop, server.socket.getsockname()[1], "websocket")
        try:
            with connect(f"ws://127.0.0.1:{proxy.port}", compression=None) as ws:
                ws.send("text")
                ws.recv()
                ws.send(bytes(70_000))  # a 64-bit length
                ws.recv()
                ws.send(iter([b"frag", b"mented", b"message"]))  # three frames, one message
                ws.recv()
                ws.ping().wait(10)  # control frames are not messages
        finally:
            asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
            server.shutdown()
    assert (proxy.up.messages, proxy.down.messages) == (3, 3)


def test_zmtp_messages_are_counted_through_a_link(loop: asyncio.AbstractEventLoop) -> None:
    context = zmq.Context()
    rep = context.socket(zmq.ROUTER)
    req = context.socket(zmq.DEALER)
    try:
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        proxy = started_proxy(loop, port, "zmtp")
        req.connect(f"tcp://127.0.0.1:{proxy.port}")
        for body in (b"one", bytes(300)):  # a short and a long frame
            req.send_multipart([b"", b"header", body])
            rep.send_multipart(rep.recv_multipart())
            req.recv_multipart()
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
    finally:
        req.close(linger=0)
        rep.close(linger=0)
        context.term()
    assert (proxy.up.messages, proxy.down.messages) == (2, 2)


def every_split(stream: bytes) -> Iterator[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every point."""
    yield [stream]
    yield [stream[i:i + 1] for i in range(len(stream))]
    for i in range(1, len(stream)):
        yield [stream[:i], stream[i:]]


def test_websocket_tap_reads_headers_cut_anywhere() -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frames = [Frame(Opcode.TEXT, b"a"), Frame(Opcode.BINARY, bytes(200)), Frame(Opcode.BINARY, bytes(70_000)),
              Frame(Opcode.PING, b""), Frame(Opcode.TEXT, b"first", fin=False), Frame(Opcode.CONT, b"last")]
    stream = upgrade + b"".join(f.serialize(mask=True, extensions=[]) for f in frames)
    # Every cut in the upgrade, the first two frames and the third's 14-byte header:
    for pieces in every_split(stream[:len(upgrade) + 300]):
        tap = WebSocketMessages()
        assert sum(tap.feed(p) for p in pieces) == 2
    for pieces in [[stream], [stream[i:i + 1000] for i in range(0, len(stream), 1000)]]:
        tap = WebSocketMessages()
        assert sum(tap.feed(p) for p in pieces) == 4


def test_websocket_tap_counts_nothing_in_plain_http() -> None:
    tap = WebSocketMessages()
    assert tap.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\x81\x00") == 0


def test_zmtp_tap_reads_headers_cut_anywhere() -> None:
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
    ready = b"\x04\x05\x05READY"  # a command
    message = b"\x01\x00" + b"\x01\x03abc" + b"\x02" + (300).to_bytes(8, "big") + bytes(300)
    stream = greeting + ready + message + b"\x00\x01z"  # two messages: three frames, then one
    for pieces in every_split(stream):
        tap = ZmtpMessages()
        assert sum(tap.feed(p) for p in pieces) == 2
