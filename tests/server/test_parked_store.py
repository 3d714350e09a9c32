"""Parked sessions in the store, on both backends: records, restarts, and usage that stops while parked."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from remote_gpu_core.ids import SessionId
from remote_gpu_server.store import ParkedRecord
from stores import BlockingStore, execute_raw


def parked(store: BlockingStore) -> Any:
    """``store.parked``'s coroutines as plain calls."""
    class Calls:
        def __getattr__(self, name: str) -> Any:
            method = getattr(store.store.parked, name)
            return lambda *args: store._run(method(*args))

    return Calls()


def record(session: str, when: float, **changes: Any) -> ParkedRecord:
    base = ParkedRecord(SessionId(session), "alice", "default", 1, "high", "/srv/sessions/0123", 4096,
                        ("x", "model"), {"f": "cannot save an open file ('/tmp/a')"}, when,
                        "idle for more than 60 s, --park-after", 7, 0, last_code="model.fit()")
    return dataclasses.replace(base, **changes)


def test_a_parked_session_is_kept_for_its_server_and_resumed_as_a_new_lease(store_location: str) -> None:
    now = time.time()
    with BlockingStore(store_location, server_id="a") as a, BlockingStore(store_location, server_id="b") as b:
        a.create_session(SessionId("s1"), "alice", ["cpu0"], "nb.ipynb")
        execute_raw(store_location, "UPDATE sessions SET created = ? WHERE id = 's1'", (now - 100,))
        parked(a).add(record("s1", now - 60))
        [found] = parked(a).mine()
        assert found == record("s1", now - 60, slots="cpu0", notebook="nb.ipynb")
        assert parked(b).mine() == []  # another server's files are not on this machine
        assert a.fail_interrupted_jobs("a restarted") == 0
        assert [s.id for s in a.open_sessions()] == ["s1"]  # a restart does not end it
        # Usage stopped when it was parked: 40 s held, however long it stays parked.
        assert a.gpu_seconds_by_user()["alice"] == pytest.approx(40, abs=1)

        parked(a).resumed(SessionId("s1"), ["cpu1"])
        assert parked(a).mine() == []
        rows = execute_raw(store_location, "SELECT id, slots, created, released, parked, reason FROM sessions "
                           "ORDER BY id")
        (sid, slots, created, released, was_parked, _), old = rows
        assert (sid, slots, released, was_parked) == ("s1", "cpu1", None, None) and created >= now
        assert old[:4] == ("s1/1", "cpu0", pytest.approx(now - 100), pytest.approx(now - 60))
        assert old[5] == "parked"
        assert a.gpu_seconds_by_user()["alice"] == pytest.approx(40, abs=2)


def test_releasing_a_parked_session_ends_its_lease_when_it_was_parked(store_location: str) -> None:
    now = time.time()
    with BlockingStore(store_location, server_id="a") as store:
        store.create_session(SessionId("s1"), "alice", ["cpu0"])
        execute_raw(store_location, "UPDATE sessions SET created = ? WHERE id = 's1'", (now - 30,))
        parked(store).add(record("s1", now - 20))
        store.release_session(SessionId("s1"), "released by the client")
        parked(store).remove(SessionId("s1"))
        assert parked(store).mine() == []
        [(released,)] = execute_raw(store_location, "SELECT released FROM sessions WHERE id = 's1'")
        assert released == pytest.approx(now - 20)
        assert store.gpu_seconds_by_user()["alice"] == pytest.approx(10, abs=1)


def test_a_released_session_is_not_found_parked(store_location: str) -> None:
    with BlockingStore(store_location, server_id="a") as store:
        store.create_session(SessionId("s1"), "alice", ["cpu0"])
        parked(store).add(record("s1", time.time()))
        execute_raw(store_location, "UPDATE sessions SET released = ? WHERE id = 's1'", (time.time(),))
        assert parked(store).mine() == []
