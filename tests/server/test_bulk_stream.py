"""The bulk stream beside a session's websocket: pushes and pulls carry their
bytes on it once both ends agree, a ticket opens one stream for its own
connection only, and a stream that breaks fails only the transfer under it.

One plain server for the module (cpu:2); the TLS test starts its own.
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from remote_gpu_core.bulk_stream import TICKET_HEADER
from remote_gpu_core.errors import BulkStreamLost
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import FLAG_BULK, encode_head
from remote_gpu_kernel import Client
from remote_gpu_kernel.link import BULK_ENV, Link
from remote_gpu_kernel.sync import Session
from remote_gpu_server.connections.bulk import BulkTickets, ConnectionBulk
from raw_client import RawClient
from servers import ServerProcess
from tcp_proxy import TcpProxy
from tls_certs import self_signed_cert, self_signed_server
from waiting import wait_for

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("bulk"), "cpu:2", "--grace", "120").start()
    yield proc
    proc.stop()


def link_of(session: Session) -> Link:
    return session._session._link  # noqa: SLF001 (what the link carries on is the point here)


def with_bulk(session: Session) -> Link:
    """The session's link once its bulk stream is open (a link opens one after its first
    large transfer; the test opens it first)."""
    link = link_of(session)
    assert run_on_link(session, link.open_bulk())
    return link


def carried(server: ServerProcess, cafile: Path | None = None) -> dict[str, float]:
    """The server's bulk counters from /metrics: streams opened, bytes received and sent."""
    import ssl

    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    url = server.url.replace("ws", "http", 1).rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=30, context=context) as answer:
        text = answer.read().decode()
    found = dict(re.findall(r'^rgpu_bulk_(streams_opened_total|bytes_total\{direction="\w+"\}) (\S+)$', text,
                            re.MULTILINE))
    return {"opened": float(found.get("streams_opened_total", 0)),
            "received": float(found.get('bytes_total{direction="received"}', 0)),
            "sent": float(found.get('bytes_total{direction="sent"}', 0))}


def test_pushes_and_pulls_of_numpy_and_torch_carry_their_bytes_on_the_bulk_stream(server: ServerProcess) -> None:
    torch = pytest.importorskip("torch")
    array = np.random.default_rng(1).random(4 * MIB // 8)  # 4 MiB of float64
    tensor = torch.arange(3 * MIB // 4, dtype=torch.float32)  # 3 MiB
    with Client(server.url, server.token("bulky")).session() as session:
        link = with_bulk(session)
        before = carried(server)
        session.push(array=array, tensor=tensor)
        # Made on the worker: a pull of what the client pushed would send only names of what it holds.
        assert session.execute("array2, tensor2 = array * 2, tensor * 2").ok
        back = session.pull("array2", "tensor2")
        after = carried(server)
        assert np.array_equal(back["array2"], array * 2) and torch.equal(back["tensor2"], tensor * 2)
        moved = array.nbytes + tensor.numel() * 4
        assert after["received"] - before["received"] >= moved  # pushed on the stream
        assert after["sent"] - before["sent"] >= moved  # pulled on it
        assert link.bulk is not None and link.bulk.sent_bytes >= moved and link.bulk.received_bytes >= moved
        # Small values go on the websocket as ever, and still arrive.
        session.push(small=np.arange(10))
        assert np.array_equal(session.pull("small")["small"], np.arange(10))


def test_pushes_of_two_users_taking_turns_arrive_whole_through_the_servers_reused_pieces(server: ServerProcess) -> None:
    """The server receives pushes into pieces that it reuses once their bytes are in a
    worker's ring: pushes of two users' sessions, taking turns, each arrive as sent."""
    with Client(server.url, server.token("turns-a")).session() as a, \
            Client(server.url, server.token("turns-b")).session() as b:
        with_bulk(a), with_bulk(b)
        for round_ in range(3):
            for i, session in enumerate((a, b)):
                value = np.random.default_rng(10 * round_ + i).random(24 * MIB // 8)  # more than the pool keeps
                session.push(value=value)
                said: list[str] = []
                assert session.execute("print(value[:2].tobytes().hex(), float(value.sum()))",
                                       on_output=lambda out: said.append(out.content.get("text", ""))).ok
                assert "".join(said).split() == [value[:2].tobytes().hex(), str(float(value.sum()))]


def test_a_link_opens_its_bulk_stream_after_its_first_large_transfer_and_not_before(server: ServerProcess) -> None:
    with Client(server.url, server.token("lazy")).session() as session:
        link = link_of(session)
        session.push(small=np.arange(100))
        assert session.execute("big = bytes(2 << 20)").ok
        assert session.pull("small")["small"].tolist() == list(range(100))
        assert link.bulk_opening is None and link.bulk is None  # nothing large went yet
        session.pull("big")
        wait_for(lambda: link.bulk is not None, what="the bulk stream to open")
        sent = link.bulk.sent_bytes if link.bulk is not None else 0
        session.push(again=np.zeros(2 << 20, np.uint8))
        assert link.bulk is not None and link.bulk.sent_bytes - sent >= 2 << 20


def test_a_client_told_not_to_opens_no_bulk_stream_and_moves_everything_on_the_websocket(
        server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BULK_ENV, "0")
    array = np.random.default_rng(2).random(2 * MIB)
    with Client(server.url, server.token("plain")).session() as session:
        link = link_of(session)
        before = carried(server)
        session.push(array=array)
        assert np.array_equal(session.pull("array")["array"], array)
        assert link.limits.get("bulk") == 1  # offered, not taken
        assert link.bulk is None and link.bulk_opening is None
        assert carried(server) == before


def websocket_with_ticket(url: str, token: str, ticket: str) -> int:
    """The status a bulk-stream handshake with ``ticket`` gets (101: it opened, and is closed again)."""
    try:
        with connect(url, additional_headers={"Authorization": f"Bearer {token}", TICKET_HEADER: ticket},
                     open_timeout=30, ping_interval=None):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_a_ticket_opens_one_stream_for_its_own_connection_and_user_only(server: ServerProcess) -> None:
    alice, mallory = server.token("alice-bulk"), server.token("mallory-bulk")
    value = np.random.default_rng(3).random(2 * MIB)
    with RawClient(server.url, alice) as raw:
        raw.hello()
        raw.send(m.BulkOpen(7))
        ticket = raw.answer(7, m.BulkTicket)
        assert isinstance(ticket, m.BulkTicket) and ticket.seconds > 0
        opened = carried(server)["opened"]
        # Another user with the ticket (stolen from the wire or a log) is refused.
        assert websocket_with_ticket(server.url, mallory, ticket.ticket) == 403
        # Taken once, it is gone: its owner cannot use it after the attempt either.
        assert websocket_with_ticket(server.url, alice, ticket.ticket) == 403
        # Made up, or a real one with a character changed.
        assert websocket_with_ticket(server.url, alice, "x" * 43) == 403
        raw.send(m.BulkOpen(8))
        fresh = raw.answer(8, m.BulkTicket)
        assert isinstance(fresh, m.BulkTicket)
        forged = fresh.ticket[:-1] + ("A" if fresh.ticket[-1] != "A" else "B")
        assert websocket_with_ticket(server.url, alice, forged) == 403
        assert carried(server)["opened"] == opened  # none of them opened a stream
    # A victim's session goes on, on its own stream, with its own bytes.
    with Client(server.url, alice).session() as session:
        link = with_bulk(session)
        session.push(value=value)
        assert np.array_equal(session.pull("value")["value"], value)
        assert link.bulk is not None and link.bulk.sent_bytes >= value.nbytes


def test_tickets_expire_and_lapse_with_their_connection() -> None:
    now = [100.0]
    tickets = BulkTickets(clock=lambda: now[0])
    owner = ConnectionBulk("alice", tickets, lambda: None, lambda req, code, text: None)
    late = tickets.issue("alice", owner)
    now[0] += 31
    assert "expired" in str(tickets.take(late, "alice"))
    gone = tickets.issue("alice", owner)
    owner.closed = True
    assert "not for this token's connection" in str(tickets.take(gone, "alice"))


def test_a_push_that_says_its_bytes_come_on_a_stream_that_is_not_open_is_refused_and_the_session_goes_on(
        server: ServerProcess) -> None:
    with RawClient(server.url, server.token("streamless")) as raw:
        raw.hello()
        raw.lease()
        push = m.Push(2, ["x"], [1])
        for frame in encode_head(push, [MIB], flags=FLAG_BULK):
            raw.send_raw(frame)
        refused = raw.answer(2, m.PushDone)
        assert isinstance(refused, m.Error) and "none is open" in refused.message
        raw.send(m.Execute(3, "y = 41 + 1"))
        assert isinstance(raw.answer(3, m.ExecuteDone, timeout=60), m.ExecuteDone)


def cut_at(link: Link, crossed: int, sent: bool) -> None:
    """Abort the link's bulk stream, on its own loop, as soon as ``crossed`` more bytes
    went out on it (``sent``) or came in: wherever the transfer is then, not after a time."""
    stream = link.bulk
    assert stream is not None
    start = stream.sent_bytes if sent else stream.received_bytes
    if sent:
        write_piece = stream.write_piece

        async def cutting_write(piece: memoryview) -> None:
            if stream.sent_bytes - start >= crossed:
                stream.close("cut by the test")
            await write_piece(piece)

        stream.write_piece = cutting_write  # type: ignore[method-assign]
    else:
        buffer_updated = stream.buffer_updated

        def cutting_read(nbytes: int) -> None:
            buffer_updated(nbytes)
            if stream.received_bytes - start >= crossed and stream.closed is None:
                stream.close("cut by the test")

        stream.buffer_updated = cutting_read  # type: ignore[method-assign]


def test_a_bulk_stream_cut_in_the_middle_fails_only_that_transfer_and_the_rest_goes_on_the_websocket(
        server: ServerProcess) -> None:
    size = 128 * MIB
    value = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    digest = hashlib.sha256(value).hexdigest()
    proxy = TcpProxy.for_url(server.url)
    try:
        with Client(proxy.url, server.token("cut")).session() as session:
            session.on_progress = None
            link = with_bulk(session)
            cut_at(link, size // 2, sent=True)
            with pytest.raises(BulkStreamLost, match="session goes on"):
                session.push(value=value)
            assert link.bulk is None and session._session.connected  # noqa: SLF001
            session.push(value=value)  # on the websocket now
            result = session.execute(f"import hashlib\nassert hashlib.sha256(value).hexdigest() == {digest!r}\n"
                                     "back = value[::-1].copy()")  # made there: a pull of it moves every byte
            assert result.ok, result.error
            # A pull cut on its bulk stream: again, and only the rest comes (on the websocket).
            assert link.reconnect is not None
            assert run_on_link(session, link.open_bulk()) and link.bulk is not None
            cut_at(link, size // 2, sent=False)
            with pytest.raises(BulkStreamLost):
                session.pull("back")
            before = proxy.down
            assert np.array_equal(session.pull("back")["back"], value[::-1])
            assert proxy.down - before <= size - size // 2 + 32 * MIB, "the cut pull was not resumed"
    finally:
        proxy.close()


def run_on_link(session: Session, coro: Any) -> Any:
    """Run ``coro`` on the session's I/O loop and wait for it."""
    import asyncio

    loop = session._session._link.task.get_loop()  # noqa: SLF001
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


def test_the_bulk_stream_rides_the_same_tls_port(tmp_path: Path) -> None:
    server = self_signed_server(tmp_path)
    try:
        cafile = self_signed_cert(server)
        value = np.random.default_rng(5).random(2 * MIB)
        with Client(server.url, server.token("tls-bulk"), cafile=str(cafile)).session() as session:
            link = with_bulk(session)
            session.push(value=value)
            assert np.array_equal(session.pull("value")["value"], value)
            assert link.bulk is not None and link.bulk.sent_bytes >= value.nbytes
            assert link.bulk.transport is not None and link.bulk.transport.get_extra_info("ssl_object") is not None
        assert carried(server, cafile)["received"] >= value.nbytes
    finally:
        server.stop()
