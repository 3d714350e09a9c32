"""Leases on a server of the test's own (or the shared one, where a test changes nothing): queueing,
idle release, reconnects, restarts, which slot a lease takes."""

from __future__ import annotations

import json
import struct
import threading

import pytest
from websockets.sync.client import connect

from remote_gpu_kernel import Client, ConnectionLost, SessionReleased
from remote_gpu_kernel.api import ApiClient
from remote_gpu_core.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_core.protocol import messages as m
from postgres import BACKENDS
from servers import ServerProcess
from stores import BlockingStore
from waiting import wait_for
from warm_workers import all_free_and_warm, worker_waits


def raw(server: ServerProcess, token: str):  # type: ignore[no-untyped-def]
    return connect(server.url, additional_headers={"Authorization": f"Bearer {token}"},
                   compression=None, max_size=None)


def receive(ws, reader: Reader | None = None, timeout: float = 10) -> m.Message:  # type: ignore[no-untyped-def]
    reader = reader or Reader()
    while True:
        reader.receive_data(ws.recv(timeout=timeout))
        events = reader.events_received()
        if events:
            return events[0]


def test_a_lease_takes_a_warm_slot_not_the_one_just_released(server: ServerProcess, alice: str) -> None:
    # A kernel restart: its session is released and the next cell leases at
    # once, while the released slot's fresh worker is still starting.
    api = ApiClient(server.url, alice)
    wait_for(lambda: all_free_and_warm(api), what="both slots free, each with a warm worker")
    before = worker_waits(api)
    client = Client(server.url, alice)
    first = client.session()
    released = first.slots
    first.release()
    second = client.session()
    try:
        assert second.slots != released and len(second.slots) == 1  # the other slot, warm
        after = worker_waits(api)
        # Both leases took a started worker: neither waited for one to start.
        assert {found: after[found] - before[found] for found in after} == {"warm": 2, "starting": 0, "cold": 0}
        assert second.execute("1+1", on_output=lambda _: None).ok
    finally:
        second.release()


def test_queue_positions_then_lease_when_a_slot_frees(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    first = Client(fresh_server.url, alice).session()
    assert first.slots == ["cpu0"]
    positions: dict[str, list[int]] = {"bob": [], "carol": []}
    sessions: dict[str, object] = {}

    def wait(user: str, token: str) -> None:
        sessions[user] = Client(fresh_server.url, token).session(on_queue=positions[user].append)

    tb = threading.Thread(target=wait, args=("bob", bob))
    tb.start()
    wait_for(lambda: positions["bob"], 30, "bob's place in the queue")
    tc = threading.Thread(target=wait, args=("carol", carol))
    tc.start()
    wait_for(lambda: positions["carol"], 30, "carol's place in the queue")
    assert positions == {"bob": [1], "carol": [2]}
    first.release()
    tb.join(30)
    assert "bob" in sessions and "carol" not in sessions
    sessions["bob"].release()  # type: ignore[attr-defined]
    tc.join(30)
    assert positions["carol"] == [2, 1]
    assert sessions["carol"].execute("1", on_output=lambda _: None).ok  # type: ignore[attr-defined]
    sessions["carol"].release()  # type: ignore[attr-defined]


def test_a_lease_larger_than_the_server_is_refused(fresh_server: ServerProcess) -> None:
    from remote_gpu_kernel import LeaseError

    fresh_server.start(wait_warm=False)
    with pytest.raises(LeaseError, match="1 slot"):
        Client(fresh_server.url, fresh_server.token()).session(gpus=2)


def test_idle_session_is_released_and_the_client_is_told(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--idle-timeout", "2"]
    fresh_server.start()
    token = fresh_server.token()
    s = Client(fresh_server.url, token).session()
    s.execute("x = 1", on_output=lambda _: None)
    wait_for(lambda: s.released, 30, "the idle session's release")
    assert s.released is not None and "idle" in s.released
    with pytest.raises(SessionReleased, match="idle"):
        s.execute("x")
    # the slot came back with a fresh worker
    with Client(fresh_server.url, token).session() as again:
        assert again.slots == ["cpu0"]
        result = again.execute("'x' in globals()", on_output=lambda _: None)
        assert result.outputs[-1].content["data"]["text/plain"] == "False"


def test_reconnect_within_grace_keeps_variables_and_later_is_released(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "3"]
    fresh_server.start()
    token = fresh_server.token()
    client = Client(fresh_server.url, token)
    s = client.session()
    s.execute("kept = 'yes'", on_output=lambda _: None)
    s.close()  # the websocket drops; the lease stays for the grace period
    again = client.session(resume=s.id)
    assert again.resumed and again.id == s.id
    assert again.pull("kept") == {"kept": "yes"}
    again.close()
    fresh_server.wait_for_log(f"released session {s.id[:8]} of alice", 30)  # once the grace is over
    notices: list[str] = []
    third = client.session(resume=s.id, on_notice=notices.append)
    assert not third.resumed and third.id != s.id
    assert any("did not come back within 3 s" in n for n in notices)
    third.release()


def test_malformed_frames_get_a_protocol_error_and_the_server_lives(fresh_server: ServerProcess) -> None:
    fresh_server.start(wait_warm=False)
    token = fresh_server.token()
    with raw(fresh_server, token) as ws:
        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        assert isinstance(receive(ws), m.Welcome)
        body = json.dumps({"t": "execute", "req": 1, "code": 42}).encode()
        ws.send(struct.pack(">2sBBI", b"RG", 1, 0, len(body)) + body)  # bad field: stream stays in step
        err = receive(ws)
        assert isinstance(err, m.Error) and err.code is m.ErrorCode.PROTOCOL and "code" in err.message
        ws.send(encode(m.Execute(2, "1"))[0])  # and the connection still answers
        err = receive(ws)
        assert isinstance(err, m.Error) and err.code is m.ErrorCode.NO_LEASE
        ws.send(b"\x00garbage that is not a frame")
        err = receive(ws)
        assert isinstance(err, m.Error) and "magic" in err.message
    with raw(fresh_server, token) as ws:
        ws.send("text is not allowed")
        err = receive(ws)
        assert isinstance(err, m.Error) and "text frames" in err.message
    with raw(fresh_server, token) as ws:  # a message cut short by a disconnect
        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        receive(ws)
        frames = encode(m.Push(1, ["a"], [1], (b"x" * 3_000_000,)))
        ws.send(frames[0])
        ws.send(frames[1])
    with raw(fresh_server, token) as ws:  # request before hello
        ws.send(encode(m.Execute(1, "1"))[0])
        err = receive(ws)
        assert isinstance(err, m.Error) and "hello" in err.message
    with Client(fresh_server.url, token).session() as s:
        assert s.execute("1 + 1", on_output=lambda _: None).ok
    assert fresh_server.proc is not None and fresh_server.proc.poll() is None


def test_version_mismatch_is_a_clear_error(fresh_server: ServerProcess) -> None:
    fresh_server.start(wait_warm=False)
    with raw(fresh_server, fresh_server.token()) as ws:
        ws.send(encode(m.Hello(PROTOCOL_VERSION + 41))[0])
        err = receive(ws)
        assert isinstance(err, m.Error) and err.code is m.ErrorCode.VERSION_MISMATCH
        assert f"speaks {PROTOCOL_VERSION + 41}" in err.message and "same remote-gpu-kernel" in err.message


def test_client_that_disconnects_mid_cell_loses_nothing(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    token = fresh_server.token()
    client = Client(fresh_server.url, token)
    s = client.session()
    printed = threading.Event()
    closing = threading.Thread(target=lambda: printed.wait(30) and s.close())
    closing.start()
    with pytest.raises(ConnectionLost):  # the connection drops once the cell has printed its first line
        s.execute("import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.5)\nfinished = True",
                  on_output=lambda _: printed.set())
    closing.join()
    with BlockingStore(fresh_server.db) as store:  # the cell runs on without its client
        wait_for(lambda: store.jobs(limit=1)[0].state == "completed", 30, "the cell's end")
    again = client.session(resume=s.id)
    assert again.pull("finished") == {"finished": True}
    with BlockingStore(fresh_server.db) as store:
        [job] = store.jobs(limit=1)
        assert job.state == "completed"
        texts = [content["text"] for _, msg_type, content in store.outputs(job.id) if msg_type == "stream"]
    assert "".join(texts) == "0\n1\n2\n"
    again.release()


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_restart_marks_jobs_left_running_as_failed(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    token = fresh_server.token()
    s = Client(fresh_server.url, token).session()
    threading.Thread(target=lambda: _swallow(lambda: s.execute("import time; time.sleep(60)",
                                                               on_output=lambda _: None)),
                     daemon=True).start()
    with BlockingStore(fresh_server.db) as store:
        wait_for(lambda: [job.state for job in store.jobs(limit=1)] == ["running"], 30, "the cell's job")
    fresh_server.kill()  # no clean shutdown: the job stays 'running' in the store
    with BlockingStore(fresh_server.db) as store:
        assert [job.state for job in store.jobs(limit=1)] == ["running"]
    restarted = ServerProcess(fresh_server.tmp, "cpu:1", db=fresh_server.db).start(wait_warm=False)
    try:
        restarted.wait_for_log("marked 1 job")
        with BlockingStore(fresh_server.db) as store:
            [job] = store.jobs(limit=1)
        assert job.state == "failed" and "server stopped" in str(job.error)
    finally:
        restarted.stop()


def _swallow(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except Exception:
        pass


def test_slots_fall_back_to_cpu_with_one_log_line(fresh_server: ServerProcess) -> None:
    fresh_server.slots = "auto"
    fresh_server.start(wait_warm=False)
    line = fresh_server.wait_for_log("falling back to")
    assert "CPU slot" in line and "NVML" in line
    assert sum("falling back" in entry for entry in fresh_server.log) == 1


def test_a_client_gone_before_its_lease_is_delivered_gives_the_slots_back(fresh_server: ServerProcess) -> None:
    fresh_server.slots = "cpu:2"
    fresh_server.start()
    token = fresh_server.token()
    with raw(fresh_server, token) as ws:
        reader = Reader()
        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        assert isinstance(receive(ws, reader), m.Welcome)
        ws.send(encode(m.LeaseRequest(1, gpus=2))[0])  # granted at once; its worker starts cold
        fresh_server.wait_for_log(r"w\d+-cpu0\+cpu1", timeout=10)  # leave while it starts
    line = fresh_server.wait_for_log("released session .* before its lease was delivered", timeout=30)
    assert "alice" in line
    with Client(fresh_server.url, token).session(gpus=2) as s:
        assert s.slots == ["cpu0", "cpu1"]


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_a_reconnected_client_can_replay_what_it_missed(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    client = Client(fresh_server.url, fresh_server.token())
    s = client.session()
    s.execute("print('seen')", on_output=lambda _: None)
    seen = s.last_seq
    printed = threading.Event()
    closing = threading.Thread(target=lambda: printed.wait(30) and s.close())
    closing.start()
    with pytest.raises(ConnectionLost):  # the connection drops once the cell has printed its first line
        s.execute("import time\nfor i in range(4):\n    print('missed', i, flush=True); time.sleep(0.4)",
                  on_output=lambda _: printed.set())
    closing.join()
    again = client.session(resume=s.id)
    # the cell is still running: the replay waits for it, and has it all
    texts = [o.content["text"] for o in again.replay(seen) if o.msg_type == "stream"]
    assert "".join(texts) == "".join(f"missed {i}\n" for i in range(4))
    assert again.replay(again.last_seq) == []
    again.release()


def test_client_of_another_protocol_version_gets_a_clear_error(fresh_server: ServerProcess,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from remote_gpu_kernel import VersionMismatch

    fresh_server.start(wait_warm=False)
    monkeypatch.setattr("remote_gpu_kernel.link.PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(VersionMismatch, match="same remote-gpu-kernel version"):
        Client(fresh_server.url, fresh_server.token()).session()
