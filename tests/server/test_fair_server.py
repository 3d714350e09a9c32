"""The fair scheduler through a real server: several users and tokens on CPU slots.

Each test starts a server of its own (``fresh_server``) with the flags it
needs, queues requests from threads and checks who is served, in what order,
and what a refused request is told.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from remote_gpu_kernel import Client, LeaseError
from remote_gpu_core.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_core.protocol import messages as m
from servers import ServerProcess
from test_leases import raw, receive
from waiting import wait_for

QUIET = {"on_output": lambda _: None}


class Queued:
    """A lease asked for in a thread; ``order`` collects users as they are granted."""

    def __init__(self, server: ServerProcess, token: str, user: str, order: list[str], **options: Any) -> None:
        self.user = user
        self.positions: list[int] = []
        self.session: Any = None
        self.error: BaseException | None = None
        self.granted = threading.Event()
        self._order = order

        def run() -> None:
            try:
                self.session = Client(server.url, token).session(on_queue=self.positions.append, **options)
                self._order.append(user)
            except BaseException as exc:
                self.error = exc
            self.granted.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait(self, timeout: float = 20) -> Any:
        assert self.granted.wait(timeout), f"{self.user} was not granted within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.session


def queue_up(server: ServerProcess, token: str, user: str, order: list[str], **options: Any) -> Queued:
    """Queue a request and wait until the server has ranked it (or granted it)."""
    queued = Queued(server, token, user, order, **options)
    wait_for(lambda: queued.positions or queued.granted.is_set(), 10, f"a queue position for {user}", every=0.05)
    return queued


def test_a_high_request_is_served_before_an_earlier_low_one(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    holder = Client(fresh_server.url, alice).session()
    order: list[str] = []
    low = queue_up(fresh_server, bob, "bob", order, priority="low")
    high = queue_up(fresh_server, carol, "carol", order, priority="high")
    wait_for(lambda: len(low.positions) > 1, 10, "bob's new place behind carol", every=0.05)
    assert low.positions == [1, 2] and high.positions == [1]
    holder.release()
    high.wait()
    assert order == ["carol"] and low.positions == [1, 2, 1]
    fresh_server.stop()


def test_a_user_who_just_used_the_slot_waits_behind_one_who_has_not(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    used = Client(fresh_server.url, alice).session()
    time.sleep(1.0)  # time passing is the point: alice's use of the slot, which fair share counts
    used.release()
    holder = Client(fresh_server.url, bob).session()
    order: list[str] = []
    again = queue_up(fresh_server, alice, "alice", order)  # queued first
    fresh = queue_up(fresh_server, carol, "carol", order)
    wait_for(lambda: len(again.positions) > 1, 10, "alice's new place behind carol", every=0.05)
    assert again.positions == [1, 2] and fresh.positions == [1]
    holder.release()
    fresh.wait()
    assert order == ["carol"] and again.positions == [1, 2, 1]
    fresh_server.stop()


def test_gpu_quota_from_the_server_and_from_a_token(fresh_server: ServerProcess) -> None:
    fresh_server.slots = "cpu:3"
    fresh_server.args = ["--max-gpus", "1"]
    fresh_server.start()
    alice, bob = fresh_server.token("alice"), fresh_server.token("bob", "--max-gpus", "2")
    first = Client(fresh_server.url, alice).session()
    with pytest.raises(LeaseError, match=r"at most 1 GPU.*max_gpus=1"):
        Client(fresh_server.url, alice).session()
    both = [Client(fresh_server.url, bob).session() for _ in range(2)]
    assert sorted(s for session in both for s in session.slots) == ["cpu1", "cpu2"]
    assert first.execute("1", **QUIET).ok
    fresh_server.stop()


def test_waiting_quota_holds_for_a_token_that_raises_only_the_gpu_quota(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--max-waiting", "1"]
    fresh_server.start()
    alice, bob = fresh_server.token("alice"), fresh_server.token("bob", "--max-gpus", "3")
    holder = Client(fresh_server.url, alice).session()
    waiting = queue_up(fresh_server, bob, "bob", [])
    with pytest.raises(LeaseError, match=r"at most 1 request.*max_waiting=1"):
        Client(fresh_server.url, bob).session()
    assert waiting.positions == [1] and not waiting.granted.is_set()  # the first one still waits
    holder.release()
    assert waiting.wait().slots == ["cpu0"]
    fresh_server.stop()


def test_aging_puts_an_old_low_request_before_newer_normal_ones(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--max-wait", "1.5"]
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    holder = Client(fresh_server.url, alice).session()
    order: list[str] = []
    old = queue_up(fresh_server, bob, "bob", order, priority="low")
    time.sleep(2.0)  # time passing is the point: bob is overdue; carol will not be by the time the slot frees
    new = queue_up(fresh_server, carol, "carol", order)
    assert new.positions == [2]
    holder.release()
    old.wait()
    assert order == ["bob"] and not new.granted.is_set()
    fresh_server.stop()


def test_a_two_slot_lease_is_not_overtaken_and_pins_both_slots(fresh_server: ServerProcess) -> None:
    fresh_server.slots = "cpu:2"
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    holder = Client(fresh_server.url, alice).session()
    assert holder.slots == ["cpu0"]
    order: list[str] = []
    big = queue_up(fresh_server, bob, "bob", order, gpus=2)
    small = queue_up(fresh_server, carol, "carol", order)  # cpu1 is free, but bob is first
    assert small.positions == [2] and not small.granted.is_set()  # ranked behind bob, not granted cpu1
    holder.release()
    pair = big.wait()
    assert pair.slots == ["cpu0", "cpu1"] and not small.granted.is_set()
    pair.execute("import os; slots = os.environ['RGPU_SLOTS']", **QUIET)
    assert pair.pull("slots") == {"slots": "cpu0,cpu1"}
    assert small.positions == [2, 1]
    fresh_server.stop()


def test_a_pool_with_its_own_idle_timeout_and_an_unknown_pool(fresh_server: ServerProcess) -> None:
    fresh_server.slots = "cpu:2"
    fresh_server.args = ["--pool", "interactive=cpu0:idle=2"]
    fresh_server.start()
    alice, bob = fresh_server.token("alice"), fresh_server.token("bob")
    quick = Client(fresh_server.url, alice).session(pool="interactive")
    steady = Client(fresh_server.url, bob).session()
    assert quick.slots == ["cpu0"] and steady.slots == ["cpu1"]
    with pytest.raises(LeaseError, match=r"no pool 'gpus'.*interactive"):
        Client(fresh_server.url, alice).session(pool="gpus")
    wait_for(lambda: quick.released, 30, "the release of the idle session in pool 'interactive'")
    assert quick.released is not None and "idle for more than 2 s" in quick.released
    assert "pool 'interactive'" in quick.released
    assert steady.released is None and steady.execute("1", **QUIET).ok
    fresh_server.stop()


def test_a_client_that_leaves_the_queue_moves_the_others_up(fresh_server: ServerProcess) -> None:
    fresh_server.start()
    alice, bob, carol = (fresh_server.token(u) for u in ("alice", "bob", "carol"))
    holder = Client(fresh_server.url, alice).session()
    order: list[str] = []
    with raw(fresh_server, bob) as ws:
        reader = Reader()
        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        assert isinstance(receive(ws, reader), m.Welcome)
        ws.send(encode(m.LeaseRequest(1))[0])
        assert receive(ws, reader) == m.QueuePosition(1, 1)
        behind = queue_up(fresh_server, carol, "carol", order)
        assert behind.positions == [2]
    wait_for(lambda: behind.positions == [2, 1], 10, "carol moving up to 1", every=0.05)
    holder.release()
    behind.wait()
    assert order == ["carol"]
    fresh_server.stop()
