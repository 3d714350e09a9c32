"""An emulated network link: a TCP proxy with a one-way delay and a rate cap, both ways.

This machine's kernel has no ``sch_netem``, so a link is emulated in user
space, between a client and the servers it reaches::

    link = Link(rtt=0.020, rate=1e9)             # 20 ms round trip, 1 Gbit/s each way
    with LinkProcess(link) as net:
        port = net.proxy("127.0.0.1", server_port, tap="websocket")
        ...                                      # the client connects to 127.0.0.1:port
        net.traffic()                            # bytes and messages each way, per proxy

How a chunk of bytes crosses, in each direction:

1. **The bottleneck.** A chunk read at time *t* leaves the sending end at
   ``max(t, when the previous chunk left) + size / rate``: serialised at
   the link's rate, one after another. One bottleneck per direction is
   shared by every connection through the link, as one cable is. The queue
   in front of it is bounded: once its backlog exceeds ``queue`` bytes,
   the proxy stops reading from the sender until it has drained, so the
   sender's socket buffers fill and TCP's flow control meets the
   bottleneck, as at a router whose buffer is full. (Nothing is dropped:
   TCP's congestion control and slow start are not emulated, so a bulk
   transfer gets the best a well-tuned TCP would get.)
2. **The delay line.** Each chunk comes out of the far end, in order, at
   its departure plus ``rtt / 2``.
3. **The receiver.** A far end that does not take what is written (its
   reader does not read) pauses reading from the sender too.

A direction therefore holds at most about a bandwidth-delay product on the
wire plus ``queue`` in the bottleneck's buffer.

**The TCP handshake** costs what it costs on a real link: the client's
``connect`` returns at once (the proxy's kernel answers the SYN), but its
first bytes do not leave before one round trip has passed (when the
SYN-ACK would have come back), and the connection to the target opens
half a round trip later (when the final ACK would arrive). So the first
bytes of a protocol where the client speaks first (HTTP, TLS, websocket)
arrive at 1.5 round trips, those of one where the server speaks first at
2, as on a real link.

**Timers.** asyncio's default (epoll) selector rounds every wait up to a
whole millisecond, which would add up to 1 ms to each delay of a 1 ms
link; the link's loop uses ``select()``, whose timeout is in microseconds
(a 0.5 ms sleep took 0.6 ms here, against 1.1 ms with epoll). With few
connections, ``select()`` costs nothing more.

:class:`LinkProcess` runs the link in a process of its own, so that it
never waits for the measured client's GIL; :class:`LinkProxy` runs in any
asyncio loop (the tests run it in a thread, :func:`link_loop`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import selectors
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from message_taps import TAPS, Tap

__all__ = ["Link", "LinkProcess", "LinkProxy", "Traffic", "link_loop"]

#: The least bottleneck queue (bytes), whatever the bandwidth-delay product.
MIN_QUEUE = 64 << 10


@dataclasses.dataclass(frozen=True)
class Link:
    """A symmetric link: ``rtt`` seconds of round trip, ``rate`` bit/s each way (``None``: no cap).

    ``queue`` is the bottleneck's buffer in bytes; by default one
    bandwidth-delay product (the classic rule for a router's buffer), at
    least :data:`MIN_QUEUE`.
    """

    rtt: float
    rate: float | None
    queue: int | None = None

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.rate is None else self.rate / 8

    @property
    def bdp(self) -> int:
        """The bandwidth-delay product, in bytes (0 without a cap)."""
        return 0 if self.bytes_per_second is None else int(self.bytes_per_second * self.rtt)

    @property
    def queue_bytes(self) -> int:
        return self.queue if self.queue is not None else max(self.bdp, MIN_QUEUE)

    @property
    def chunk(self) -> int:
        """Bytes serialised as one piece: about 1 ms of the link (16 KiB to 1 MiB)."""
        if self.bytes_per_second is None:
            return 1 << 20
        return min(1 << 20, max(16 << 10, int(self.bytes_per_second / 1000)))

    def transfer_time(self, nbytes: int) -> float:
        """Seconds to serialise ``nbytes`` at the link's rate (0 without a cap)."""
        return 0.0 if self.bytes_per_second is None else nbytes / self.bytes_per_second

    @property
    def label(self) -> str:
        rate = ("unlimited" if self.rate is None else f"{self.rate / 1e9:g} Gbit/s" if self.rate >= 1e9
                else f"{self.rate / 1e6:g} Mbit/s")
        return f"{self.rtt * 1000:g} ms, {rate}"


@dataclasses.dataclass
class Traffic:
    """What crossed one direction of a proxy: bytes, messages (where tapped) and connections."""

    bytes: int = 0
    messages: int = 0
    connections: int = 0


class _Bottleneck:
    """One direction's serialisation queue, shared by every connection that crosses it."""

    def __init__(self, link: Link) -> None:
        self.rate = link.bytes_per_second
        self.free_at = 0.0
        #: Seconds of backlog past which the sender is no longer read.
        self.queue_seconds = 0.0 if self.rate is None else link.queue_bytes / self.rate

    def depart(self, now: float, nbytes: int) -> float:
        """When ``nbytes`` that come now will have left."""
        if self.rate is None:
            return now
        self.free_at = max(now, self.free_at) + nbytes / self.rate
        return self.free_at


class _Side(asyncio.Protocol):
    """One of a proxied pair of TCP connections: the client's, or the one to the target.

    What it receives crosses ``bottleneck`` and leaves through its peer's
    transport from the peer's delay line (:attr:`line`).
    """

    def __init__(self, link: Link, bottleneck: _Bottleneck, traffic: Traffic, tap: Tap | None) -> None:
        self.link = link
        self.bottleneck = bottleneck
        self.traffic = traffic
        self.tap = tap
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        #: What is on its way out of this side: (when it arrives, bytes); ``None`` ends it.
        self.line: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        #: Nothing is read before this (the TCP handshake's round trip).
        self.hold_until = 0.0
        self._pauses: set[str] = set()
        self.ended = self.sender_ended = False

    # -- reading: into the bottleneck and the peer's delay line ----------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * self.link.chunk)
        if self.hold_until > self.loop.time():
            self.pause("handshake")
            self.loop.call_at(self.hold_until, self.resume, "handshake")
        if self.line:
            self._schedule()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.traffic.bytes += len(data)
        if self.tap is not None:
            self.traffic.messages += self.tap.feed(data)
        now = self.loop.time()
        chunk = self.link.chunk
        view = memoryview(data)
        for start in range(0, len(data), chunk):
            piece = bytes(view[start:start + chunk]) if len(data) > chunk else data
            left = self.bottleneck.depart(now, len(piece))
            self.peer.send_at(left + self.link.one_way, piece)
        backlog = self.bottleneck.free_at - now - self.bottleneck.queue_seconds
        if backlog > 0:
            self.pause("queue")
            self.loop.call_later(backlog, self.resume, "queue")

    def eof_received(self) -> bool:
        self._end()
        self._close_when_done()
        return True  # keep writing what comes the other way

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        if self.timer is not None:
            self.timer.cancel()

    def _end(self) -> None:
        """The sender is done: its peer ends too, once what it sent before has crossed."""
        if not self.sender_ended and self.peer is not None:
            self.sender_ended = True
            self.peer.send_at(self.loop.time() + self.link.one_way, None)

    def _close_when_done(self) -> None:
        if self.ended and self.sender_ended and self.transport is not None:
            self.transport.close()

    def pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        self._pauses.discard(why)
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- writing: from this side's delay line ---------------------------------

    def send_at(self, when: float, data: bytes | None) -> None:
        self.line.append((when, data))
        if self.timer is None and self.transport is not None:
            self._schedule()

    def _schedule(self) -> None:
        self.timer = self.loop.call_at(self.line[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        transport = self.transport
        assert transport is not None
        now = self.loop.time()
        while self.line and self.line[0][0] <= now:
            _, data = self.line.popleft()
            if transport.is_closing():
                continue
            if data is None:
                self.ended = True
                if self.sender_ended or not transport.can_write_eof():
                    transport.close()
                else:
                    transport.write_eof()
            else:
                transport.write(data)
        self._close_when_done()
        if self.line:
            self._schedule()

    def pause_writing(self) -> None:  # the far end does not take what comes
        if self.peer is not None:
            self.peer.pause("receiver")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume("receiver")


class LinkProxy:
    """Connections to ``127.0.0.1:``:attr:`port` reach ``target`` across ``link``'s two bottlenecks.

    Call :meth:`start` in the loop that is to run it, :meth:`close` at the
    end; ``tap`` names a :data:`message_taps.TAPS` entry that counts the
    messages each way.
    """

    def __init__(self, link: Link, target: tuple[str, int], bottlenecks: tuple[_Bottleneck, _Bottleneck],
                 tap: str | None = None) -> None:
        self.link = link
        self.target = target
        self.tap = TAPS[tap] if tap is not None else None
        self._bottlenecks = bottlenecks
        #: Client to target, and back.
        self.up, self.down = Traffic(), Traffic()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sides: list[_Side] = []

    @classmethod
    def bottlenecks(cls, link: Link) -> tuple[_Bottleneck, _Bottleneck]:
        """A link's two directions, to share between its proxies."""
        return _Bottleneck(link), _Bottleneck(link)

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _new_side(self, up: bool) -> _Side:
        self._sides = [s for s in self._sides if s.transport is None or not s.transport.is_closing()]
        bottleneck = self._bottlenecks[0 if up else 1]
        side = _Side(self.link, bottleneck, self.up if up else self.down,
                     self.tap() if self.tap is not None else None)
        self._sides.append(side)
        return side

    def _accepted(self) -> _Side:
        client, upstream = self._new_side(up=True), self._new_side(up=False)
        client.peer, upstream.peer = upstream, client
        loop = client.loop
        client.hold_until = loop.time() + self.link.rtt
        self.up.connections += 1
        self.down.connections += 1
        loop.call_later(1.5 * self.link.rtt, lambda: loop.create_task(self._open(client, upstream)))
        return client

    async def _open(self, client: _Side, upstream: _Side) -> None:
        try:
            await client.loop.create_connection(lambda: upstream, *self.target)
        except OSError:
            if client.transport is not None:
                client.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for side in self._sides:
            if side.transport is not None:
                side.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


def link_loop() -> asyncio.AbstractEventLoop:
    """A new event loop whose timers keep microseconds (``select()``; see the module docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


# -- the link in a process of its own ------------------------------------------


async def _serve(link: Link) -> None:
    """Answer one JSON command per line of stdin on stdout (see :class:`LinkProcess`) until stdin ends."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    bottlenecks = LinkProxy.bottlenecks(link)
    proxies: list[LinkProxy] = []
    try:
        while line := await reader.readline():
            command = json.loads(line)
            answer: Any
            if command["do"] == "proxy":
                proxy = LinkProxy(link, (command["host"], command["port"]), bottlenecks, command.get("tap"))
                proxies.append(proxy)
                answer = await proxy.start()
            elif command["do"] == "traffic":
                answer = {p.port: {"up": dataclasses.asdict(p.up), "down": dataclasses.asdict(p.down)}
                          for p in proxies}
            else:
                raise ValueError(f"the link has no command {command['do']!r}")
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for proxy in proxies:
            await proxy.close()


def serve(rtt: float, rate: float | None, queue: int | None) -> None:
    """The link process's main: :func:`_serve` in a :func:`link_loop`."""
    loop = link_loop()
    try:
        loop.run_until_complete(_serve(Link(rtt, rate, queue)))
    finally:
        loop.close()


class LinkProcess:
    """``link`` in a child process: :meth:`proxy` adds a port that reaches a target across it.

    Every proxy of one process shares the link's two bottlenecks. Use it as
    a context manager, or call :meth:`close`.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"import link; link.serve({link.rtt!r}, {link.rate!r}, {link.queue!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, **command: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the link process ended (exit code {self._proc.wait()}); its error is above")
        return json.loads(line)

    def proxy(self, host: str, port: int, tap: str | None = None) -> int:
        """A new port on 127.0.0.1 whose connections reach ``host:port`` across the link."""
        if tap is not None and tap not in TAPS:
            raise ValueError(f"no tap {tap!r}: choose one of {', '.join(TAPS)}")
        return int(self._ask(do="proxy", host=host, port=port, tap=tap))

    def traffic(self) -> dict[int, tuple[Traffic, Traffic]]:
        """Per proxy port, what crossed it so far: (client to target, target to client)."""
        return {int(port): (Traffic(**ways["up"]), Traffic(**ways["down"]))
                for port, ways in self._ask(do="traffic").items()}

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> LinkProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
