"""One client's connection on a real server: answers that come too late, too
many requests, and a client that stops reading. Each harms nobody else and
leaves the server serving."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from websockets.exceptions import ConnectionClosed

from remote_gpu_kernel import Client, Session
from remote_gpu_kernel.api import http_url
from remote_gpu_core.protocol import encode
from remote_gpu_core.protocol import messages as m
from raw_client import RawClient, stalled_socket
from servers import ServerProcess
from waiting import wait_for


def output_of(raw: RawClient, req: int, msg_type: str) -> m.Output:
    while True:
        msg = raw.answer(req, m.Output)
        assert isinstance(msg, m.Output), msg
        if msg.msg_type == msg_type:
            return msg


def test_an_input_answer_after_the_worker_died_or_the_release_is_dropped(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    with RawClient(fresh_server.url, fresh_server.token()) as raw:
        raw.hello()
        raw.lease()
        raw.send(m.Execute(2, "import os, threading\nthreading.Timer(0.5, lambda: os._exit(3)).start()\n"
                              "input('name? ')", allow_stdin=True))
        assert output_of(raw, 2, "input_request").content["prompt"] == "name? "
        died = raw.answer(2)
        assert isinstance(died, m.Error) and died.code is m.ErrorCode.WORKER_DIED
        raw.send(m.Input(0, "too late"))  # its worker is dead
        raw.send(m.Execute(3, "1 + 1"))  # the connection still answers, on a fresh worker
        done = raw.answer(3, m.ExecuteDone, timeout=60)
        assert isinstance(done, m.ExecuteDone) and done.status == "ok"
        raw.send(m.Release(4))
        assert isinstance(raw.answer(4, m.Released), m.Released)
        raw.send(m.Input(0, "after the release"))
        raw.send(m.Execute(5, "1"))
        refused = raw.answer(5)
        assert isinstance(refused, m.Error) and refused.code is m.ErrorCode.NO_LEASE
    assert not any("Traceback" in line for line in fresh_server.log)


def test_at_most_64_requests_are_in_flight_by_default(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    with RawClient(fresh_server.url, fresh_server.token()) as raw:
        raw.hello()
        raw.lease()
        raw.send(m.Execute(2, "x = 1\nimport time; time.sleep(2)"))
        raw.send_raw(b"".join(bytes(encode(m.Pull(req, ["x"]))[0]) for req in range(3, 103)))
        answers: dict[int, m.Message] = {}
        while len(answers) < 101:
            msg = raw.receive()
            if isinstance(msg, (m.Error, m.ExecuteDone, m.PullReply)):
                answers[msg.req] = msg
        refused = sorted(req for req, msg in answers.items() if isinstance(msg, m.Error))
        assert refused == list(range(66, 103))  # the cell and 63 pulls were in flight
        assert all(isinstance(answers[r], m.PullReply) for r in range(3, 66))


def test_a_client_that_floods_refused_requests_without_reading_is_disconnected(
        fresh_server: ServerProcess) -> None:
    fresh_server.start()
    token = fresh_server.token()
    flood = b"".join(bytes(encode(m.Released(0, "", ""))[0]) for _ in range(15_000))  # ~1 MiB
    with RawClient(fresh_server.url, token, sock=stalled_socket(fresh_server.url), max_queue=1) as raw:
        raw.hello()
        # 15,000 refusals that nobody reads: far past the 1,024 the server keeps.
        raw.send_raw(flood)
        fresh_server.wait_for_log("disconnecting alice: it sends requests that are refused", timeout=60)

        def hung_up() -> bool:
            try:
                raw.send_raw(flood)
            except ConnectionClosed:
                return True
            return False

        # The server hung up: sending fails once that arrives.
        wait_for(hung_up, 60, "a send to fail on the closed connection", every=0.05)
    with Client(fresh_server.url, token).session() as session:
        assert session.execute("1", on_output=lambda _: None).ok


class Waiter:
    """A client that asks for a lease in a thread; ``queued`` and ``granted`` are events."""

    def __init__(self, server: ServerProcess, token: str, **kw: Any) -> None:
        self.queued, self.granted = threading.Event(), threading.Event()
        self.session: Session | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.session = Client(server.url, token).session(on_queue=lambda _: self.queued.set(), **kw)
                self.granted.set()
            except BaseException as exc:  # reported by the test
                self.error = exc

        threading.Thread(target=run, daemon=True).start()


def stalled_with_a_pull(server: ServerProcess, token: str) -> tuple[RawClient, str]:
    """A raw client holding the only slot, that asked for 64 MiB and reads none of it."""
    raw = RawClient(server.url, token, sock=stalled_socket(server.url), max_queue=1)
    raw.hello()
    granted = raw.lease()
    raw.send(m.Execute(2, "big = b'x' * (64 << 20)"))
    assert isinstance(raw.answer(2, m.ExecuteDone), m.ExecuteDone)
    raw.send(m.Pull(3, ["big"]))  # and from here on it reads nothing
    raw.wait_until_stalled()
    return raw, granted.session


def test_a_stalled_client_delays_nobody_elses_grant(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    stalled, bob, carol = (fresh_server.token(u) for u in ("sam", "bob", "carol"))
    raw, _ = stalled_with_a_pull(fresh_server, stalled)
    try:
        first = Waiter(fresh_server, bob)
        assert first.queued.wait(30)
        raw.send(m.Release(4))  # bob gets the slot; sam's answer waits behind its pull
        raw.send(m.LeaseRequest(5, priority="low"))  # sam waits again, and hears positions
        assert first.granted.wait(60), first.error
        second = Waiter(fresh_server, carol)  # goes ahead of sam: sam's position changes
        assert second.queued.wait(30), second.error
        assert first.session is not None
        started = time.monotonic()
        first.session.release()  # the broker tells sam its new position: it must not wait on it
        assert second.granted.wait(30), second.error
        # Well before the keepalive (about 40 s) drops the stalled client.
        assert time.monotonic() - started < 15
        assert second.session is not None
        assert second.session.execute("1", on_output=lambda _: None).ok
        second.session.release()
    finally:
        raw.drain_and_close()


def test_a_stalled_client_does_not_hold_up_the_release_of_its_session(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    stalled, admin = fresh_server.token("sam"), fresh_server.token("root", "--admin")
    raw, session_id = stalled_with_a_pull(fresh_server, stalled)
    try:
        waiter = Waiter(fresh_server, admin)
        assert waiter.queued.wait(30)
        request = urllib.request.Request(http_url(fresh_server.url) + f"/api/sessions/{session_id}/release",
                                         method="POST", headers={"Authorization": f"Bearer {admin}"})
        with urllib.request.urlopen(request, timeout=20) as answer:  # the client is told without waiting
            assert answer.status == 200
        assert waiter.granted.wait(60), waiter.error
        assert waiter.session is not None
        waiter.session.release()
    finally:
        raw.drain_and_close()
