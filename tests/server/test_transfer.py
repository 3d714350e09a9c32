"""The worker data channel: its ring and filler, large transfers both ways,
and a push or a pull cut short by a disconnect."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_core.protocol import messages as m
from remote_gpu_server.worker_process.transfer import RING_SLOTS, SLOT_SIZE, Filler, Ring, create_ring, pieces
from raw_client import server_backlog
from servers import ServerProcess
from waiting import wait_for, wait_for_cpu


def test_filler_reassembles_pieces_across_buffers() -> None:
    data = [b"a" * 5, b"", b"b" * 7]
    filler = Filler([len(d) for d in data])
    for piece in [b"aaa", b"aab", b"bbbbbb"]:
        filler.add(piece)
    assert filler.done and [bytes(b) for b in filler.buffers] == data
    with pytest.raises(ProtocolError, match="more bytes"):
        filler.add(b"x")
    assert [bytes(p) for p in pieces([b"abcdefg"], 3)] == [b"abc", b"def", b"g"]


def test_ring_carries_pieces_between_two_mappings_and_skips_other_transfers() -> None:
    fd = create_ring()
    try:
        sender, receiver = Ring(fd), Ring(fd)
    finally:
        os.close(fd)
    sender.begin(7)
    receiver.begin(7)
    notes = [sender.put(bytes([i]) * (SLOT_SIZE if i else 10)) for i in range(RING_SLOTS)]
    assert not sender.free  # every slot is the receiver's until it hands them back
    for i, (kind, payload) in enumerate(notes):
        piece, freed = receiver.take(payload)  # type: ignore[misc]
        assert kind == b"D" and bytes(piece) == bytes([i]) * (SLOT_SIZE if i else 10)
        sender.freed(freed[1])
    assert len(sender.free) == RING_SLOTS
    sender.freed(notes[0][1][:6])  # a slot already free is not counted twice
    assert len(sender.free) == RING_SLOTS
    receiver.begin(8)
    assert receiver.take(notes[0][1]) is None  # a note of the transfer before
    sender.begin(8)
    kind, payload = sender.put(b"x")
    bad = payload[:4] + (RING_SLOTS).to_bytes(2, "big") + payload[6:]
    with pytest.raises(ProtocolError, match="outside the ring"):
        receiver.take(bad)
    sender.close()
    receiver.close()


def test_ring_memory_cannot_be_shrunk_under_the_server() -> None:
    # A worker runs its user's code: a truncated ring would crash the server
    # with SIGBUS at its next copy. The memfd is sealed against it.
    fd = create_ring()
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, RING_SLOTS * SLOT_SIZE * 2)
        assert os.fstat(fd).st_size == RING_SLOTS * SLOT_SIZE
    finally:
        os.close(fd)


def test_transfers_larger_than_the_ring_both_ways(server: ServerProcess, alice: str, torch: ModuleType) -> None:
    rng = np.random.default_rng(1)
    a = rng.random(5 * RING_SLOTS * SLOT_SIZE // 4 + 3, dtype=np.float32)  # five rings and a bit
    t = torch.from_numpy(rng.random(3 * SLOT_SIZE // 4, dtype=np.float32)).reshape(-1, 4)
    with Client(server.url, alice).session() as s:
        s.push(a=a, t=t, small=b"abc")
        s.execute("import os\nb = a[::-1].copy(); u = t * 2\n"
                  "ring_seen = os.environ.get('RGPU_DATA_RING_FD')", on_output=lambda _: None)
        back = s.pull("b", "u", "a", "small", "ring_seen")
    assert np.array_equal(back["b"], a[::-1]) and np.array_equal(back["a"], a)
    assert torch.equal(back["u"], t * 2) and back["small"] == b"abc"
    assert back["ring_seen"] is None  # the user's code is not handed the ring


def test_worker_that_dies_while_the_server_waits_for_the_ring(server: ServerProcess, alice: str) -> None:
    # A thread in the worker takes the GIL and keeps it (no switch for 1000 s),
    # so the kernel cannot read the push: the server fills every slot and
    # waits for one back. Then the worker exits. The push must fail at once
    # with the cause, not wait for a slot that never comes. The thread starts
    # once the cell's reply had time to leave; a worker that holds its GIL can
    # tell nobody, but its CPU time shows the thread spinning.
    starve = ("import os, sys, threading, time\n"
              "def hog():\n"
              "    time.sleep(0.3)\n"
              "    sys.setswitchinterval(1000)\n"
              "    end = time.monotonic() + 2\n"
              "    while time.monotonic() < end:\n"
              "        pass\n"
              "    os._exit(3)\n"
              "threading.Thread(target=hog, daemon=True).start()")
    notices: list[str] = []
    with Client(server.url, alice).session(on_notice=notices.append) as s:
        worker = int(s.execute("import os; print(os.getpid())", on_output=lambda _: None).stdout)
        assert s.execute(starve, on_output=lambda _: None).ok
        wait_for_cpu(worker, 0.1, "the thread that holds the worker's GIL to spin")
        started = time.monotonic()
        with pytest.raises(WorkerDied, match="exit code 3"):
            s.push(big=np.zeros(3 * RING_SLOTS * SLOT_SIZE, dtype=np.uint8))
        assert time.monotonic() - started < 10
        s.push(after=[1, 2])
        assert s.pull("after") == {"after": [1, 2]}
        assert any("restarted" in n for n in notices)  # shown with the push that follows


@contextmanager
def pull_unread(url: str, token: str, session_id: str, name: str) -> Iterator[ClientConnection]:
    """A raw connection that resumes ``session_id``, asks for ``name`` and
    reads only the pull's first frame; the test decides what comes next."""
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                 compression=None, max_size=None) as ws:
        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        ws.recv(timeout=30)
        ws.send(encode(m.LeaseRequest(1, resume=session_id))[0])
        ws.recv(timeout=30)
        ws.send(encode(m.Pull(2, [name]))[0])
        ws.recv(timeout=30)
        yield ws


def test_worker_killed_in_the_middle_of_a_pull(fresh_server: ServerProcess) -> None:
    # The client reads the pull's head and stops: the server's sends and the
    # worker's ring fill up. The worker is killed there. The pull cannot be
    # finished, so the connection closes saying why; the session resumes
    # with a fresh worker and says so.
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    token = fresh_server.token()
    first = Client(fresh_server.url, token).session()
    first.execute("import os, numpy as np; pid = os.getpid(); big = np.ones(64 << 20, np.uint8)",
                  on_output=lambda _: None)
    pid = first.pull("pid")["pid"]
    with pull_unread(fresh_server.url, token, first.id, "big") as ws:
        # The server blocks on this connection (its unsent bytes back up), the worker on the ring.
        wait_for(lambda: server_backlog(ws.socket) > 1 << 20, 30, "the pull's bytes to back up in the server",
                 every=0.05)
        os.kill(pid, signal.SIGKILL)
        fresh_server.wait_for_log("died")
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
        assert time.monotonic() - started < 10
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "worker died" in closed.value.rcvd.reason
    notices: list[str] = []
    session = Client(fresh_server.url, token).session(resume=first.id, on_notice=notices.append)
    assert session.resumed
    assert session.execute("'big' in globals()", on_output=lambda _: None).outputs[-1].content["data"][
        "text/plain"] == "False"
    assert any("died" in n and "SIGKILL" in n for n in notices)
    session.release()
    first.close()


def test_pull_cut_short_leaves_the_session_usable(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    token = fresh_server.token()
    first = Client(fresh_server.url, token).session()
    first.execute("import numpy as np; big = np.arange(6 << 20, dtype=np.float32)", on_output=lambda _: None)
    with pull_unread(fresh_server.url, token, first.id, "big") as ws:
        for _ in range(2):  # a couple of pieces of 24 MiB, then leave
            ws.recv(timeout=30)
    started = time.monotonic()
    session = Client(fresh_server.url, token).session(resume=first.id)
    assert session.resumed
    back = session.pull("big")["big"]
    # The worker was told to stop sending: it does not sit out its 60 s wait.
    assert time.monotonic() - started < 20
    assert np.array_equal(back, np.arange(6 << 20, dtype=np.float32))
    assert session.execute("1 + 1", on_output=lambda _: None).ok
    session.release()
    first.close()
    assert not any("Traceback" in line for line in fresh_server.log)


def test_push_cut_short_leaves_the_session_usable(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    token = fresh_server.token()
    with connect(fresh_server.url, additional_headers={"Authorization": f"Bearer {token}"},
                 compression=None, max_size=None) as ws:
        reader = Reader()

        def receive() -> m.Message:
            while True:
                reader.receive_data(ws.recv(timeout=30))
                events = reader.events_received()
                if events:
                    return events[0]

        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        receive()
        ws.send(encode(m.LeaseRequest(1))[0])
        granted = receive()
        assert isinstance(granted, m.LeaseGranted)
        frames = encode(m.Push(2, ["half"], [2], (b"pickle", b"x" * 5_000_000)))
        for frame in frames[:3]:
            ws.send(frame)
    session = Client(fresh_server.url, token).session(resume=granted.session)
    assert session.resumed
    from remote_gpu_kernel import RemoteError

    with pytest.raises(RemoteError, match="not defined"):
        session.pull("half")
    session.push(whole=list(range(5)))
    assert session.pull("whole") == {"whole": [0, 1, 2, 3, 4]}
    session.release()


def test_memory_kept_warm_is_never_under_a_value_still_held(fresh_server: ServerProcess, torch: ModuleType) -> None:
    # Received buffers go into memory kept warm across transfers: a block is
    # reused once the value made from it is gone, never while anything holds
    # it. Without a session cache every push lands there in the worker too.
    fresh_server.args = ["--session-cache", "none"]
    fresh_server.start()
    rng = np.random.default_rng(2)
    first, second, third = (rng.random(3 * SLOT_SIZE // 4, dtype=np.float32) for _ in range(3))
    with Client(fresh_server.url, fresh_server.token()).session() as s:
        s.push(v=first)
        s.execute("from remote_gpu_core.warm_memory import warm_memory as w\n"
                  "import torch\nkept, tail, t = v, v[5:], torch.from_numpy(v)", on_output=lambda _: None)
        s.push(v=second)  # first is still held three ways: a block of its own
        s.push(v=third)  # received while v is still second: a third block; then second's is free
        pulled_first = s.pull("kept")["kept"]
        pulled_third = s.pull("v")["v"]  # pulled_first is held here: a block of its own
        back = s.pull("kept", "tail", "t", "v")
        s.execute("del kept, tail, t, v", on_output=lambda _: None)
        s.push(v=second)  # into a block given back
        s.execute("counts = (w.reused, w.fresh)", on_output=lambda _: None)
        reused, fresh = s.pull("counts")["counts"]
    assert np.array_equal(pulled_first, first) and np.array_equal(pulled_third, third)
    assert np.array_equal(back["kept"], first) and np.array_equal(back["tail"], first[5:])
    assert torch.equal(back["t"], torch.from_numpy(first)) and np.array_equal(back["v"], third)
    assert reused >= 1 and fresh <= 3
