"""The data channel of a worker on another host: opened with mutual TLS, pinned
on both ends, then carried in sealed records.

The worker is started here by the local launcher's ``tcp`` transport, as a
Ray node's host actor starts it; the server's end connects over loopback.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import numpy as np
import pytest

from remote_gpu_core.protocol import dump_values, load_values
from remote_gpu_core.ids import SlotId
from remote_gpu_server.workers.local_launcher import LocalLauncher
from remote_gpu_server.worker_process.sealed import ACCEPT_TIMEOUT, pinned_context
from remote_gpu_server.workers.carriers import make_identity
from remote_gpu_server.gpus.slots import Slot
from remote_gpu_server.workers.worker import Worker

SLOT = Slot(SlotId("cpu0"), "cpu", 0, "CPU slot 0")


@contextlib.asynccontextmanager
async def tcp_worker() -> AsyncIterator[Worker]:
    """A worker of the ``tcp`` transport, killed at the end."""
    launcher = LocalLauncher(transport="tcp", ip="127.0.0.1")
    worker = await Worker.start(launcher, [SLOT], 120)
    try:
        yield worker
    finally:
        await worker.kill()
        await launcher.close()


async def _roundtrip(worker: Worker, value: object) -> object:
    names, counts, buffers = dump_values({"x": value})
    reply = await worker.push(names, counts, buffers)
    assert reply.get("ok"), reply
    reply, pieces = await worker.pull(["x"])
    assert pieces is not None, reply
    got = [bytes(piece) async for piece in pieces]
    joined = b"".join(got)
    out, pos = [], 0
    for size in reply["sizes"]:
        out.append(joined[pos:pos + size])
        pos += size
    return load_values(reply["names"], reply["counts"], out)["x"]


def test_values_cross_a_tls_data_channel_whole_and_a_stranger_is_refused() -> None:
    async def scenario() -> None:
        async with tcp_worker() as worker:
            address = worker.process.data.carrier
            host, port = address.host, address.port
            # Someone with a certificate of their own cannot reach the worker's data.
            # The stranger connects first: the worker refuses it in the
            # handshake and serves the server.
            stranger = pinned_context(False, *make_identity("client"), worker.process._spawned.data_cert)
            raw = socket.create_connection((host, port), timeout=60)

            def intrude() -> None:
                with raw, stranger.wrap_socket(raw) as tls:
                    tls.sendall(b"\0")
                    tls.recv(1)  # TLS 1.3: the refusal arrives with the first read

            array = np.random.default_rng(1).random(3 << 20)  # 24 MiB: many pieces, every slot used
            intruding = asyncio.ensure_future(asyncio.to_thread(intrude))
            back = await _roundtrip(worker, array)
            assert isinstance(back, np.ndarray) and np.array_equal(back, array)
            with pytest.raises((ssl.SSLError, ConnectionError)):  # refused, not a timeout
                await intruding
            assert await _roundtrip(worker, {"small": [1, 2, 3]}) == {"small": [1, 2, 3]}

    asyncio.run(scenario())


def test_strangers_that_connect_and_stall_do_not_hold_the_server_up() -> None:
    async def scenario() -> None:
        async with tcp_worker() as worker:
            carrier = worker.process.data.carrier
            with contextlib.ExitStack() as strangers:
                for _ in range(5):  # connected first, saying nothing
                    strangers.enter_context(socket.create_connection((carrier.host, carrier.port), timeout=60))
                started = asyncio.get_running_loop().time()
                assert await _roundtrip(worker, [1, 2, 3]) == [1, 2, 3]
                waited = asyncio.get_running_loop().time() - started
            # Each stranger has ACCEPT_TIMEOUT to prove itself, in its own
            # thread: one after another, five would have made the server's
            # handshake time out.
            assert waited < ACCEPT_TIMEOUT, waited

    asyncio.run(scenario())


def test_a_stream_that_broke_is_replaced_and_the_operations_go_on() -> None:
    # The worker's main loop watches the stream for the server's operations:
    # when the stream breaks (here the server's end is closed under it), the
    # server connects again with the next operation, and the worker must
    # take that new stream and answer on it.
    async def scenario() -> None:
        async with tcp_worker() as worker:
            assert await _roundtrip(worker, [1, 2, 3]) == [1, 2, 3]
            carrier = worker.process.data.carrier
            assert carrier._conn is not None
            carrier._conn.close()
            for value in ({"after": "the break"}, np.arange(3 << 20)):  # then many pieces, every slot used
                back = await asyncio.wait_for(_roundtrip(worker, value), 60)
                assert (np.array_equal(back, value) if isinstance(value, np.ndarray) else back == value)

    asyncio.run(scenario())


#: A hostile cell: a thread of it writes notes of 4 MiB on its own sealed
#: stream (1 GiB offered) while the server asks nothing, until a write
#: waits 3 s; ``flood`` holds what it got out.
TLS_FLOOD = """\
import gc, threading
from remote_gpu_server.worker_process.sealed import BlockingTls
from remote_gpu_server.worker_process.streams import note_parts
conn = [o for o in gc.get_objects() if isinstance(o, BlockingTls)][0]._conn
flood = {"notes": 0, "blocked": False}
def _flood():
    conn._sock.settimeout(3)
    parts = note_parts([b"R", b"x" * ((4 << 20) - 100)])
    try:
        for _ in range(256):
            conn.send_parts(parts)
            flood["notes"] += 1
    except TimeoutError:
        flood["blocked"] = True
_flooding = threading.Thread(target=_flood)
_flooding.start()
_flooding.join()
flood
"""


def test_a_cell_that_floods_its_sealed_stream_fills_its_own_memory_not_the_servers() -> None:
    from remote_gpu_server.workers.carriers import NOTES_AHEAD

    async def scenario() -> None:
        async with tcp_worker() as worker:
            assert await _roundtrip(worker, [1]) == [1]  # the stream is open, its reader reads
            shown: list[str] = []

            async def on_iopub(msg: dict[str, object]) -> None:
                content = msg.get("content")
                if msg.get("msg_type") == "execute_result" and isinstance(content, dict):
                    shown.append(str(content["data"]["text/plain"]))

            reply = await worker.execute(TLS_FLOOD, on_iopub)
            assert reply["status"] == "ok", reply
            flood = ast.literal_eval(shown[-1])  # a dict of an int and a bool, shown by the worker
            carrier = worker.process.data.carrier
            # Of 256 notes, at most NOTES_AHEAD wait here, one is being read, and
            # the rest fit in the two ends' socket buffers; none more came.
            assert flood["blocked"] and carrier._notes.qsize() <= NOTES_AHEAD
            assert flood["notes"] < 16, flood

    asyncio.run(scenario())
