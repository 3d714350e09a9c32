"""The store's batch-job and usage tables, without a server, on each backend."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from remote_gpu_core.ids import SessionId
from remote_gpu_server.sessions.batch import JobRequest
from remote_gpu_server.errors import StoreError
from stores import BlockingStore


@pytest.fixture
def store(store_location: str) -> Iterator[BlockingStore]:
    s = BlockingStore(store_location)
    yield s
    s.close()


def batch(store: BlockingStore, retries: int = 0, name: str = "job") -> int:
    return store.create_batch_job("alice", "print(1)", name, 1, "normal", "default", None, retries)


def run_attempt(store: BlockingStore, job: int, slots: list[str]) -> int:
    session = SessionId(f"s{job}-{time.monotonic_ns()}")
    store.create_session(session, "alice", slots)
    return store.start_attempt(job, session, slots)


def test_attempts_are_numbered_and_kept(store: BlockingStore) -> None:
    job = batch(store, retries=1)
    spec = store.batch_spec(job)
    assert spec is not None and (spec.attempt, spec.retries, spec.name) == (0, 1, "job")
    assert store.job(job).state == "queued" and store.job(job).kind == "batch"
    first = run_attempt(store, job, ["cpu0"])
    assert store.job(job).state == "running" and store.job(job).slots == "cpu0"
    store.finish_attempt(job, first, "failed", "the worker died (exit code 3)")
    store.requeue_job(job, "attempt 1 failed")
    assert store.job(job).state == "queued"
    second = run_attempt(store, job, ["cpu1"])
    store.finish_attempt(job, second, "completed")
    store.finish_job(job, "completed")
    attempts = store.attempts(job)
    assert [(a.attempt, a.state, a.slots) for a in attempts] == [(1, "failed", "cpu0"), (2, "completed", "cpu1")]
    assert store.job(job).started == attempts[0].started  # the first start is kept
    with pytest.raises(StoreError):
        store.finish_attempt(job, 2, "exploded")


def test_recovery_requeues_in_order_and_retries_or_fails_running_jobs(store: BlockingStore) -> None:
    cell = store.create_job("alice", None, "1", ["cpu0"], running=True)
    once, again = batch(store, name="once"), batch(store, retries=1, name="again")
    run_attempt(store, once, ["cpu0"])
    run_attempt(store, again, ["cpu1"])
    queued = [batch(store, name=f"q{i}") for i in range(3)]
    done = batch(store)
    store.finish_job(done, "completed")

    assert store.fail_interrupted_jobs("server stopped") == 1  # the cell only
    assert store.recover_batch_jobs("the server stopped") == [again, *queued]
    assert store.job(cell).state == "failed"
    assert store.job(once).state == "failed" and store.job(once).error == "the server stopped"
    assert store.job(again).state == "queued"
    assert [a.state for a in store.attempts(again)] == ["failed"]
    assert store.job(done).state == "completed"
    assert store.job_counts()[("batch", "queued")] == 4


def test_gpu_seconds_per_user_and_job(store: BlockingStore) -> None:
    store.create_session(SessionId("two"), "alice", ["gpu0", "gpu1"])
    store.create_session(SessionId("one"), "bob", ["gpu2"])
    job = batch(store)
    run_attempt(store, job, ["gpu3"])
    time.sleep(0.4)  # time passing is the point: 0.4 s of use on every slot, which the store counts
    store.release_session(SessionId("two"), "done")
    store.release_session(SessionId("one"), "done")
    usage = store.gpu_seconds_by_user()
    assert usage["alice"] == pytest.approx(3 * 0.4, abs=0.3)  # two slots, then the job's one
    assert usage["bob"] == pytest.approx(0.4, abs=0.15)
    assert store.gpu_seconds_by_user(since=time.time() + 60) == {}
    assert store.job_gpu_seconds(store.job(job)) == pytest.approx(0.4, abs=0.15)


@pytest.mark.parametrize("data, words", [
    ([], "JSON object"),
    ({"code": ""}, "'code'"),
    ({"code": "x", "gpus": 0}, "'gpus'"),
    ({"code": "x", "gpus": True}, "'gpus'"),
    ({"code": "x", "timeout": -1}, "'timeout'"),
    ({"code": "x", "retries": 101}, "'retries'"),
    ({"code": "x", "priority": "urgent"}, "'priority'"),
    ({"code": "x", "colour": "red"}, "unknown job field(s): colour"),
])
def test_job_requests_are_checked(data: object, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        JobRequest.parse(data)


def test_job_request_defaults() -> None:
    assert JobRequest.parse({"code": "print(1)"}) == JobRequest("print(1)", "script", 1, "normal",
                                                                "default", None, 0)
